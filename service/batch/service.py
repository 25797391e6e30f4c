"""The API side of batch jobs: check a job, cut it into shards, submit, read it back.

Everything a job needs is checked here, before it is accepted, so a job that is
accepted can run: models and options are resolved exactly as a sampling request of
one shard would be, and uploaded candidates must match the discriminator's inputs.
Routes turn the `service.errors` types into statuses.

Example:
    >>> job = await jobs.create_generate(GenerateJobCreate(type="generate", generator="toy25",
    ...                                                      n=10_000))
    >>> job["state"], job["counts"]["shards"]
    ('queued', 3)
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch

from classifiers.upload_data import BadData, DataLimits
from service.batch import classifier_jobs
from service.batch.schemas import (
    JOB_TYPES,
    ClassifierJobCreate,
    FilterJobCreate,
    GenerateJobCreate,
)
from service.batch.shards import filter_log_ratio, shard_sizes
from service.batch.store import FILTER_ARRAYS, JobStore
from service.errors import Forbidden, InvalidRequest, ModelConflict, ModelNotFound, check_limit
from service.metrics import Metrics
from service.models.registry import Registry
from service.online.schemas import request_dict
from service.online.service import SamplingService
from service.settings import Settings

NPY_MAGIC = b"\x93NUMPY"
CANDIDATE_NAMES = ("candidates", "samples", "x")  # tensor names tried in a .safetensors file


class JobNotFound(ModelNotFound):
    """No job has this id (or it has expired): 404."""


class JobConflict(ModelConflict):
    """The job is not in a state that allows this (result of an unfinished job): 409."""


@dataclass(frozen=True)
class JobAccess:
    """Who asks: the job token they sent (if any), and whether they are the admin.

    A job belongs to the token it was created with: only that token (or the admin token)
    reads its state, events and result, cancels it, or sees it in the listing.
    """

    token: str | None = None
    admin: bool = False

    @property
    def owner(self) -> str:
        """The digest stored with a job: the token itself is never kept."""
        return hashlib.sha256(self.token.encode()).hexdigest() if self.token else ""

    def may_see(self, job: dict[str, Any]) -> bool:
        return self.admin or (bool(self.token) and secrets.compare_digest(
            job.get("owner", ""), self.owner))  # fmt: skip


def new_token() -> str:
    return secrets.token_urlsafe(24)


class JobService:
    def __init__(
        self,
        store: JobStore,
        registry: Registry,
        sampling: SamplingService,
        settings: Settings,
        metrics: Metrics,
    ):
        self.store, self.registry, self.sampling = store, registry, sampling
        self.settings, self.metrics = settings, metrics

    async def create_generate(self, spec: GenerateJobCreate, access: JobAccess) -> dict[str, Any]:
        check_limit(spec.n, self.settings.max_job_n, ("n",))
        if spec.seed is None:
            spec = spec.model_copy(update={"seed": secrets.randbits(63)})
        rows = self.settings.job_shard_rows
        probe = spec.shard_request(min(spec.n, rows), spec.seed)  # what every shard will run
        resolved = await self.sampling.resolve(probe, stream=False)
        proposals = spec.n * resolved.proposals_per_chain
        what = "proposals: n x steps x proposals per step (drs: x its budget)"
        check_limit(proposals, self.settings.max_job_proposals, ("steps",), what)
        sizes = shard_sizes(spec.n, rows)
        shape = tuple(resolved.generator.manifest.sample_shape)
        job_id = await self.store.create(
            "generate", request_dict(spec), spec.n, sizes, shape, owner=access.owner
        )
        self.metrics.jobs_submitted.labels("generate").inc()
        return await self.get(job_id, access)

    async def create_filter(
        self, spec: FilterJobCreate, upload: IO[bytes], access: JobAccess
    ) -> dict[str, Any]:
        if spec.seed is None:
            spec = spec.model_copy(update={"seed": secrets.randbits(63)})
        log_ratio = filter_log_ratio(self.registry, spec)
        discriminator = self.registry.get(spec.discriminator, kind="discriminator")
        generator = self.registry.get(discriminator.manifest.generator, kind="generator")
        shape = tuple(generator.manifest.sample_shape)
        candidates = await asyncio.to_thread(read_candidates, upload)
        if candidates.shape[1:] != shape:
            raise InvalidRequest(
                f"candidates have shape {tuple(candidates.shape)}; {discriminator.ref} scores "
                f"samples of shape {shape} (so (N, {', '.join(map(str, shape))}))",
                ("candidates",),
            )
        check_limit(len(candidates), self.settings.max_job_n, ("candidates",), "candidates")
        if not np.isfinite(candidates).all():
            raise InvalidRequest("candidates contain NaN or infinite values", ("candidates",))
        await asyncio.to_thread(_smoke_test, log_ratio, candidates[:2], self.registry.device)
        sizes = shard_sizes(len(candidates), self.settings.filter_shard_rows)
        starts = np.cumsum([0, *sizes[:-1]])
        inputs = {str(k): candidates[start : start + size]
                  for k, (start, size) in enumerate(zip(starts, sizes, strict=True))}  # fmt: skip
        job_id = await self.store.create(
            "filter", request_dict(spec), len(candidates), sizes,
            shape, inputs, owner=access.owner,
        )  # fmt: skip
        self.metrics.jobs_submitted.labels("filter").inc()
        return await self.get(job_id, access)

    async def create_classifier_job(
        self, spec: ClassifierJobCreate, uploads: dict[str, bytes], access: JobAccess
    ) -> dict[str, Any]:
        """An sbn-fit or sbp-prune job, checked whole before it is accepted."""
        model = self.registry.get(spec.classifier, kind="classifier")
        limits = DataLimits(self.settings.max_upload_bytes, self.settings.max_job_n)

        def prepare() -> dict[str, np.ndarray]:
            try:
                data = classifier_jobs.read_uploads(uploads, model, limits)
            except BadData as error:
                raise classifier_jobs.as_invalid(error) from None
            return classifier_jobs.check(spec, model, data)

        arrays = await asyncio.to_thread(prepare)
        pinned = {**request_dict(spec), "classifier": model.ref}
        rows = len(arrays["data.x"])
        job_id = await self.store.create(
            spec.type, pinned, rows, [rows], (), arrays, owner=access.owner
        )
        self.metrics.jobs_submitted.labels(spec.type).inc()
        return await self.get(job_id, access)

    async def get(self, job_id: str, access: JobAccess) -> dict[str, Any]:
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or expired)")
        if not access.may_see(job):
            raise Forbidden(
                f"job {job_id} belongs to the token it was created with: send it as "
                "X-IMH-Job-Token (or the admin token as Authorization: Bearer)"
            )
        return job

    async def list(self, limit: int, state: str | None, access: JobAccess) -> list[dict[str, Any]]:
        """The caller's jobs, newest first (everyone's for the admin; none without a token)."""
        if not (access.admin or access.token):
            return []
        owner = None if access.admin else access.owner
        return await self.store.list(limit, state, owner)

    async def delete(self, job_id: str, access: JobAccess) -> dict[str, Any]:
        """Cancel the job if it runs, and forget it; returns it as it ended."""
        await self.get(job_id, access)
        job = await self.store.delete(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or expired)")
        return job

    async def result(self, job_id: str, array: str | None, safetensors: bool, access: JobAccess):
        job = await self.get(job_id, access)
        if job["state"] != "succeeded":
            raise JobConflict(
                f"job {job_id} is {job['state']}; its result exists once it has succeeded"
            )
        if job["type"] not in ("generate", "filter"):
            raise JobConflict(
                f"a {job['type']} job's result is the classifier {job['output']}: use "
                f"/v1/classifiers/{job['output']}"
            )
        if job["type"] == "generate":
            array = None  # one array: its samples
        elif array is not None and array not in FILTER_ARRAYS:
            raise InvalidRequest(
                f"a filter job's result has arrays {list(FILTER_ARRAYS)}", ("array",), "query"
            )
        return await self.store.result(job, array, safetensors)

    async def update_gauges(self) -> None:
        counts = await self.store.state_counts()
        gauge = self.metrics.jobs
        for job_type in JOB_TYPES:
            for state in ("queued", "running", "succeeded", "failed", "cancelled"):
                gauge.labels(job_type, state).set(counts.get((job_type, state), 0))


def read_candidates(upload: IO[bytes]) -> np.ndarray:
    """An (N, ...) float32 array from .npy or .safetensors bytes (format from the content)."""
    upload.seek(0)
    head = upload.read(8)
    upload.seek(0)
    try:
        if head.startswith(NPY_MAGIC):
            array = np.load(upload, allow_pickle=False)
        else:
            from safetensors.numpy import load

            tensors = load(upload.read())
            if len(tensors) == 1:
                [array] = tensors.values()
            else:
                name = next((n for n in CANDIDATE_NAMES if n in tensors), None)
                if name is None:
                    raise ValueError(
                        f"the file holds {sorted(tensors)}; name the candidates one of "
                        f"{list(CANDIDATE_NAMES)}"
                    )
                array = tensors[name]
    except Exception as error:  # noqa: BLE001 - any parse failure of untrusted bytes is a 422
        raise InvalidRequest(
            f"candidates must be a .npy (np.save) or .safetensors file: {error}", ("candidates",)
        ) from None
    if array.ndim < 2 or len(array) == 0:
        raise InvalidRequest(
            f"candidates must be a non-empty (N, ...) array, got shape {array.shape}",
            ("candidates",),
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidRequest(f"candidates must be numbers, got {array.dtype}", ("candidates",))
    return np.ascontiguousarray(array, dtype=np.float32)


def _smoke_test(log_ratio, candidates: np.ndarray, device: torch.device) -> None:
    try:
        with torch.inference_mode():
            out = log_ratio(torch.from_numpy(candidates.copy()).to(device))
        if tuple(out.shape) != (len(candidates),):
            raise ValueError(f"one score per candidate expected, got shape {tuple(out.shape)}")
    except (RuntimeError, ValueError, TypeError) as error:
        raise InvalidRequest(
            f"the discriminator cannot score these candidates: {error}", ("candidates",)
        ) from None
