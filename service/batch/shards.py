"""The worker side of batch jobs: run one shard, and finish a filter job.

A generate shard is an ordinary final-mode sampling request (n = its rows, its own seed)
that goes through the worker's engine, so shards of several jobs and online requests
share batches. A filter shard scores its candidates with the calibrated discriminator.
When a filter job's last shard is written, the worker that sees it runs the chain (or
DRS) over all scores at once (samplers/finite.py): exact over the whole set, whatever
the sharding, and cheap next to the scoring.

Shard seeds derive from the job's seed and the shard number, so a redelivered shard
reproduces the same output.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samplers.finite import drs_filter, mh_filter
from service.batch.classifier_jobs import ClassifierJobRunner
from service.batch.schemas import TERMINAL, FilterJobCreate, GenerateJobCreate
from service.batch.store import JobStore
from service.distributed.connection import retrying
from service.distributed.keys import JOBS
from service.distributed.queue import Message
from service.errors import InvalidRequest, ServiceError
from service.metrics import Metrics
from service.models.registry import Registry
from service.online.plan import calibrated_logit
from service.online.resolve import calibration_for
from service.online.service import SamplingService

log = logging.getLogger("imh.shards")
SCORE_ROWS = 4096  # candidates per discriminator call
GIVE_UP_S = 60.0  # how long failing a job waits for Redis


def shard_seed(seed: int, shard: int) -> int:
    return int(np.random.SeedSequence([seed, shard]).generate_state(1, np.uint64)[0] >> 1)


def shard_sizes(n: int, rows: int) -> list[int]:
    return [min(rows, n - first) for first in range(0, n, rows)]


class ShardRunner:
    """The "shard" handler of `service.distributed.worker.Worker`."""

    kind, stream = "shard", JOBS

    def __init__(
        self,
        store: JobStore,
        sampling: SamplingService,
        registry: Registry,
        metrics: Metrics,
        model_store: Path | None = None,
        announce: Callable[[str, str, str], Awaitable[None]] | None = None,
    ):
        self.store, self.sampling, self.registry, self.metrics = store, sampling, registry, metrics
        self.classifier_jobs = ClassifierJobRunner(store, registry, model_store or Path("store"))
        self.announce = announce

    async def handle(self, message: Message) -> None:
        job_id, shard = message.text("job"), int(message.text("shard"))
        try:
            job_type, outcome = await self.run(job_id, shard)
        except ServiceError as error:
            job_type, outcome, reason = "unknown", "failed", error.message
            log.warning("job %s shard %d failed: %s", job_id, shard, reason)
            await retrying(lambda: self.store.fail(job_id, reason), GIVE_UP_S, "failing the job")
        self.metrics.job_shards.labels(job_type, outcome).inc()

    async def wanted(self, messages: list[Message]) -> list[bool]:
        states = await self.store.states([message.text("job") for message in messages])
        return [state is not None and state not in TERMINAL for state in states]

    async def give_up(self, message: Message, reason: str) -> None:
        await self.store.fail(message.text("job"), f"shard {message.text('shard')} {reason}")

    async def run(self, job_id: str, shard: int) -> tuple[str, str]:
        """Run a shard (unless done already); returns (job type, outcome) for the metrics.

        Raises ServiceError when the job cannot run (the caller fails the job).
        """
        job = await self.store.start_shard(job_id)
        if job is None:
            return "unknown", "cancelled"
        job_type = job["type"]
        if job_type in ("sbn-fit", "sbp-prune"):
            return job_type, await self._classifier_job(job)
        if await self.store.is_done(job_id, shard):
            outcome, last = "duplicate", job["counts"]["shards_done"] == job["counts"]["shards"]
        else:
            if job_type == "generate":
                output, proposals, accepted, steps = await self._generate(job, shard)
            else:
                output, proposals, accepted = await self._score(job, shard)
                steps = 0  # a chain over the scores runs once every shard is in
            outcome, last = await self.store.complete_shard(
                job_id, shard, output, proposals, accepted, steps
            )
            if outcome == "done":
                self.metrics.job_items.labels(job_type).inc(len(output))
        if job_type == "filter" and last and outcome != "ignored":
            await self._finish_filter(job)
        return job_type, outcome

    async def _classifier_job(self, job: dict[str, Any]) -> str:
        """One shard that is the whole job; the new classifier is announced to every
        process that shares the model store."""

        def emit(data: dict[str, Any]) -> None:
            asyncio.ensure_future(self.store.progress(job["id"], data))

        done = await self.classifier_jobs.run(job, emit)
        if not await self.store.finish_classifier_job(job["id"], done["output"], done["report"]):
            return "ignored"
        if self.announce is not None:
            name, _, version = done["output"].partition(":")
            await self.announce("install", name, version)
        return "done"

    async def _generate(self, job: dict[str, Any], shard: int) -> tuple[np.ndarray, int, int, int]:
        spec = GenerateJobCreate.model_validate(job["spec"])
        rows = job["shard_sizes"][shard]
        body = spec.shard_request(rows, shard_seed(spec.seed, shard))
        # Shards step in the bulk lane: online requests never wait for their steps.
        answer = await self.sampling.sample(body, bulk=True)
        stats = answer.stats
        return (
            answer.samples.float().numpy(),
            stats["proposals"],
            stats["accepted"],
            stats["chain_steps"],
        )

    async def _score(self, job: dict[str, Any], shard: int) -> tuple[np.ndarray, int, int]:
        spec = FilterJobCreate.model_validate(job["spec"])
        candidates = await self.store.shard_input(job["id"], shard)
        log_ratio = filter_log_ratio(self.registry, spec)
        device = self.registry.device

        def score() -> np.ndarray:
            out = []
            with torch.inference_mode():
                for first in range(0, len(candidates), SCORE_ROWS):
                    x = torch.from_numpy(candidates[first : first + SCORE_ROWS].copy()).to(device)
                    out.append(log_ratio(x).float().cpu())
            return torch.cat(out).numpy()

        scores = await asyncio.to_thread(score)
        return scores, len(candidates), 0

    async def _finish_filter(self, job: dict[str, Any]) -> None:
        spec = FilterJobCreate.model_validate(job["spec"])
        parts = [
            await self.store.shard_output(job["id"], k) for k in range(job["counts"]["shards"])
        ]
        log_ratio = np.concatenate(parts).astype(np.float64)
        if spec.method == "imh":
            result = mh_filter(log_ratio, spec.chain_length or len(log_ratio), spec.seed)
        else:
            result = drs_filter(
                log_ratio, spec.seed, gamma=spec.gamma, gamma_percentile=spec.gamma_percentile
            )
        arrays = {
            "indices": np.flatnonzero(result.accepted).astype(np.int64),
            "scores": (1.0 / (1.0 + np.exp(-log_ratio))).astype(np.float32),
            "log_ratio": log_ratio.astype(np.float32),
            "final": np.asarray(result.final, dtype=np.int64),
        }
        # The job's acceptance rate is the chains' own: a chain's start is no proposal.
        accepted = int(result.accepted.sum())
        await self.store.finish_filter(job["id"], arrays, accepted, result.proposals)


def filter_log_ratio(registry: Registry, spec: FilterJobCreate):
    """The calibrated log-ratio function of a filter job's discriminator (ServiceError if
    it cannot be used: unknown, a pair discriminator, an unknown calibration)."""
    discriminator = registry.get(spec.discriminator, kind="discriminator")
    if discriminator.manifest.input != "sample":
        raise InvalidRequest(
            f"{discriminator.ref} is a pair discriminator d(x, y); filtering needs D(x)",
            ("discriminator",),
        )
    return calibrated_logit(discriminator, calibration_for(discriminator, spec.calibration))
