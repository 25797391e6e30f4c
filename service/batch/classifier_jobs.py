"""sbn-fit and sbp-prune jobs: a user's classifier, rewritten from its exported graph.

The algorithms live in classifiers/ (sbn_job, sbp_job); this module is what the job
system needs around them:

- `check(...)` (API side, before the job is accepted): the classifier, its graph and the
  uploaded data are checked by the same code the job runs (`check_sbn_fit`,
  `check_sbp_prune`), so a graph the rewrite cannot handle (no batch norm, a residual
  add joining pruned channels, ...) or bad data is a 422 naming the node or field, and
  nothing is queued or registered;
- `run(...)` (worker side): the work in a thread, with progress events, cancellation
  (the job deleted) and, for sbp-prune, checkpoints in the job store every few hundred
  steps, so a worker killed mid-training loses at most the steps since the last one and
  the redelivered shard resumes from it; then the result is installed in the model
  store as a new classifier version (`output`, default "<classifier>-sbn" / "-sbp").

The classifier's program comes from its `.pt2` file (read through the same archive
checks as any upload) or, for a built-in zoo classifier, from exporting its network.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from classifiers.job_common import ClassifierSpec, JobCancelled
from classifiers.lift import UnsupportedGraph
from classifiers.program_export import export_classifier
from classifiers.sbn_job import SbnFitSettings, check_sbn_fit, run_sbn_fit
from classifiers.sbp_job import PruneSettings, check_sbp_prune, run_sbp_prune
from classifiers.sbp_resumable import Checkpoint
from classifiers.upload_data import BadData, DataLimits, Dataset, read_dataset
from service.batch.schemas import ClassifierJobCreate, SbnFitJobCreate
from service.errors import InvalidRequest
from service.models.loading import LoadedModel
from service.models.registry import Registry
from service.models.safe_files import load_program

FILES = ("data", "heldout", "ood")  # multipart file parts: labelled, labelled, inputs only


def classifier_spec(model: LoadedModel) -> ClassifierSpec:
    manifest = model.manifest
    value_range = tuple(manifest.value_range) if manifest.value_range else (0.0, 1.0)
    return ClassifierSpec(tuple(manifest.input_shape), list(manifest.classes), value_range)


def program_of(model: LoadedModel) -> ExportedProgram:
    """The classifier as a torch.export program, whatever format it was stored in."""
    if model.manifest.format == "torch.export":
        return load_program(model.directory / model.manifest.file, model.ref)
    return export_classifier(model.module.cpu(), tuple(model.manifest.input_shape))


def settings_of(spec: ClassifierJobCreate) -> SbnFitSettings | PruneSettings:
    fields = spec.settings()
    return (
        SbnFitSettings(**fields) if isinstance(spec, SbnFitJobCreate) else PruneSettings(**fields)
    )


def read_uploads(
    uploads: dict[str, bytes], model: LoadedModel, limits: DataLimits
) -> dict[str, Dataset]:
    """The uploaded files as checked datasets (BadData naming the part and array)."""
    spec = classifier_spec(model)
    return {
        part: read_dataset(
            uploads[part],
            part,
            input_shape=spec.input_shape,
            classes=len(spec.classes),
            value_range=spec.value_range,
            limits=limits,
            labelled=part != "ood",
        )  # fmt: skip
        for part in FILES
        if part in uploads
    }


def check(
    spec: ClassifierJobCreate, model: LoadedModel, data: dict[str, Dataset]
) -> dict[str, np.ndarray]:
    """Every check of the job (InvalidRequest naming the node or field); returns the
    arrays to store with the job ("data.x", "data.y", ...)."""
    if "data" not in data:
        raise InvalidRequest("the job needs a `data` file with x and y", ("data",))
    checker = check_sbn_fit if isinstance(spec, SbnFitJobCreate) else check_sbp_prune
    try:
        checker(program_of(model), classifier_spec(model), data["data"], data.get("heldout"),
                settings_of(spec))  # fmt: skip
    except (UnsupportedGraph, BadData) as error:
        raise as_invalid(error) from None
    arrays = {}
    for part, dataset in data.items():
        arrays[f"{part}.x"] = dataset.x.numpy()
        if dataset.y is not None:
            arrays[f"{part}.y"] = dataset.y.numpy()
    return arrays


def as_invalid(error: UnsupportedGraph | BadData) -> InvalidRequest:
    if isinstance(error, BadData):
        return InvalidRequest(error.message, tuple(error.field.split(".")))
    return InvalidRequest(
        f"the classifier's graph cannot be rewritten at node {error.node!r}: {error.reason}",
        ("classifier",),
    )


class ClassifierJobRunner:
    """Runs one classifier job on a worker; `store` is the job store."""

    def __init__(self, store: Any, registry: Registry, model_store: Path):
        self.store, self.registry, self.model_store = store, registry, model_store

    async def run(self, job: dict[str, Any], emit: Callable[[dict[str, Any]], Any]) -> dict:
        """The job's work; returns {"output": "name:version", "report": {...}}.

        Raises asyncio.CancelledError when cancelled (the thread stops at its next step).
        """
        spec = _parse(job["spec"])
        model = self.registry.get(spec.classifier, kind="classifier")
        data = {part: await self._dataset(job["id"], part) for part in FILES}
        data = {part: dataset for part, dataset in data.items() if dataset is not None}
        saved = await self.store.checkpoint(job["id"])
        stop, loop = threading.Event(), asyncio.get_running_loop()

        def progress(fraction: float, info: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(emit, {"progress": fraction, **_small(info)})

        def checkpoint(state: Checkpoint) -> None:
            future = asyncio.run_coroutine_threadsafe(
                self.store.save_checkpoint(job["id"], state.to_bytes()), loop
            )
            future.result(timeout=60)

        def work() -> tuple[Any, dict[str, Any]]:
            program, classifier = program_of(model), classifier_spec(model)
            common = {"progress": progress, "should_stop": stop.is_set}
            if isinstance(spec, SbnFitJobCreate):
                result = run_sbn_fit(program, classifier, data["data"], data.get("heldout"),
                                     data.get("ood"), settings_of(spec), **common)  # fmt: skip
            else:
                resume = Checkpoint.from_bytes(saved) if saved else None
                result = run_sbp_prune(
                    program, classifier, data["data"], data.get("heldout"), settings_of(spec),
                    on_checkpoint=checkpoint, resume=resume, measure_speed=True, **common,
                )  # fmt: skip
            return result, self._install(spec, model, result)

        try:
            result, installed = await asyncio.to_thread(work)
        except asyncio.CancelledError:
            stop.set()
            raise
        except JobCancelled:
            raise asyncio.CancelledError from None
        except (UnsupportedGraph, BadData) as error:
            raise as_invalid(error) from None
        return {"output": installed.ref, "report": _small(result.report)}

    async def _dataset(self, job_id: str, part: str) -> Dataset | None:
        x = await self.store.input(job_id, f"{part}.x")
        if x is None:
            return None
        y = await self.store.input(job_id, f"{part}.y")
        return Dataset(torch.from_numpy(x), None if y is None else torch.from_numpy(y))

    def _install(self, spec: ClassifierJobCreate, model: LoadedModel, result: Any) -> LoadedModel:
        suffix = "sbn" if isinstance(spec, SbnFitJobCreate) else "sbp"
        output = spec.output or f"{model.name}-{suffix}"
        with tempfile.TemporaryDirectory(prefix=f"imh-{suffix}-") as folder:
            result.manifest.update(
                description=f"{model.ref} after {spec.type} on uploaded data", original=model.ref
            )
            files = {name: Path(path) for name, path in result.write(folder).items()}
            return self.registry.install(self.model_store, output, None, files, replace=False)


def _parse(spec: dict[str, Any]) -> ClassifierJobCreate:
    from service.batch.schemas import CLASSIFIER_JOBS

    return CLASSIFIER_JOBS.validate_python(spec)


def _small(value: Any) -> Any:
    """JSON-able copies of a report (floats, lists, dicts), NaN and inf as text."""
    if isinstance(value, dict):
        return {str(k): _small(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_small(v) for v in value]
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    if isinstance(value, int | str | bool) or value is None:
        return value
    if hasattr(value, "item"):
        return _small(value.item())
    if hasattr(value, "__dataclass_fields__"):
        return _small(asdict(value))
    return str(value)
