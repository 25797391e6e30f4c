"""The classifier service layer: describe classifiers, predict with uncertainty, fit SBN.

Routes parse the body (JSON or `.npy` bytes, see `read_npy`), then call `predict`,
`describe` or `fit_sbn`. No FastAPI here; errors are `service.errors` types. Model work
runs in a worker thread, never on the event loop.

- uncertainty "sbn" (manifest `"transform": "sbn"`): classifiers.sbn.predict, K stochastic
  passes per input in one virtual batch, a torch.Generator seeded from the request;
- anything else: one deterministic pass (plain BN, SBP-compressed nets), MI = 0.

Example:
    >>> service = ClassifierService(registry, settings, metrics)
    >>> answer = await service.predict("digits04-sbn", x, samples=32, seed=0)
    >>> answer["predictions"][0]["mutual_information"]
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import Counter, Histogram
from pydantic import ValidationError
from torch import nn

from classifiers import sbn
from service.classifiers.schemas import ClassifierPublic, SbpReport
from service.errors import EngineFailure, InvalidRequest
from service.metrics import LATENCY_BUCKETS, Metrics
from service.models.loading import LoadedModel
from service.models.manifests import NAME_PATTERN, valid_name
from service.models.registry import Registry
from service.settings import Settings

MAX_INPUTS = 4096  # inputs per predict request
MAX_ROWS = 2**17  # inputs x samples per request: 4096 inputs at the default K (digits04-sbn
# runs about 10k rows per second on one shared CPU thread)
DEFAULT_SAMPLES = 32  # K when neither the request nor the manifest says
DEFAULT_FIT_BATCH_SIZE = 32  # when the manifest names no training batch size
SBN_MOMENTUM = 0.1  # the smoothing classifiers.sbn and the zoo models use
MIN_FIT_BATCHES = 8  # the spread of the statistics is estimated across batches: need several
MAX_FIT_EPOCHS = 100
MAX_FIT_ROWS = 2**22  # inputs x epochs of one sbn-fit: keeps a synchronous fit short
NUMERIC_KINDS = "fiu"  # numpy dtype kinds accepted as inputs (no bool, complex, objects)


class ClassifierService:
    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics):
        self.registry, self.settings = registry, settings
        labels, r = ("model",), metrics.registry
        self.requests = Counter(
            "imh_classifier_requests_total",
            "Predict requests that named a loaded classifier (any outcome)",
            labels,
            registry=r,
        )
        self.inputs = Counter(
            "imh_classifier_inputs_total", "Inputs classified", labels, registry=r
        )
        self.duration = Histogram(
            "imh_classifier_duration_seconds",
            "Predict time of a successful request: input checks and model passes",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    # Reading -------------------------------------------------------------------------

    def resolve(self, ref: str) -> LoadedModel:
        """The classifier `ref` ("name" or "name:version"); ModelNotFound otherwise."""
        return self.registry.get(ref, kind="classifier")

    def all(self) -> list[LoadedModel]:
        return [model for model in self.registry.all() if model.kind == "classifier"]

    def describe(self, model: LoadedModel) -> ClassifierPublic:
        manifest, extra = model.manifest, model.manifest.public()
        versions = self.registry.versions(model.name)
        stochastic = _uses_sbn(model)
        return ClassifierPublic(
            name=model.name,
            version=model.version,
            description=manifest.description,
            source=model.source,
            latest=bool(versions) and versions[-1] is model,
            uncertainty="sbn" if stochastic else "none",
            classes=manifest.classes,
            input_shape=manifest.input_shape,
            samples={"default": _default_samples(model), "max": _max_samples(model)}
            if stochastic
            else None,
            metrics=manifest.metrics,
            sbn=extra.get("sbn_fit") if isinstance(extra.get("sbn_fit"), dict) else None,
            sbp=_sbp_report(extra),
            original=_text_or_none(extra.get("original")),
            compressed=_text_or_none(extra.get("compressed")),
        )

    # Prediction ----------------------------------------------------------------------

    async def predict(
        self, ref: str, inputs: Any, samples: int | None = None, seed: int | None = None
    ) -> dict[str, Any]:
        """Classify `inputs` (nested lists or an array, (N, *input_shape) or one input).

        Returns the JSON-able answer (see ClassifyPublic). Raises ModelNotFound,
        InvalidRequest (field "inputs", "samples"), EngineFailure when the model fails.
        """
        model = self.resolve(ref)
        self.requests.labels(model.name).inc()
        started = time.perf_counter()
        stochastic = _uses_sbn(model)
        if stochastic:
            samples = _default_samples(model) if samples is None else samples
            if not 1 <= samples <= _max_samples(model):
                raise InvalidRequest(
                    f"samples must be between 1 and {_max_samples(model)} for {model.ref}, "
                    f"got {samples}",
                    ("samples",),
                )
            seed = secrets.randbits(63) if seed is None else seed
        else:  # deterministic: one pass; samples is only range-checked, seed unused
            if samples is not None and not 1 <= samples <= sbn.MAX_SAMPLES:
                raise InvalidRequest(
                    f"samples must be between 1 and {sbn.MAX_SAMPLES}, got {samples}", ("samples",)
                )
            samples, seed = 1, None
        answer = await asyncio.to_thread(self._predict, model, inputs, samples, seed)
        self.inputs.labels(model.name).inc(len(answer["predictions"]))
        self.duration.labels(model.name).observe(time.perf_counter() - started)
        return answer

    def _predict(
        self, model: LoadedModel, inputs: Any, samples: int, seed: int | None
    ) -> dict[str, Any]:
        x = as_inputs(inputs, model.manifest.input_shape, "inputs")
        if len(x) > MAX_INPUTS:
            raise InvalidRequest(f"at most {MAX_INPUTS} inputs per request, got {len(x)}",
                                 ("inputs",))  # fmt: skip
        if len(x) * samples > MAX_ROWS:
            raise InvalidRequest(
                f"inputs x samples must be at most {MAX_ROWS}, got {len(x)} x {samples}",
                ("samples",),
            )
        classes = model.manifest.classes
        shape = tuple(model.manifest.input_shape)
        try:
            if seed is None:
                prediction = sbn.predict_deterministic(model.module, x, input_shape=shape)
            else:
                generator = torch.Generator(device=self.registry.device).manual_seed(seed)
                prediction = sbn.predict(model.module, x, samples, generator, input_shape=shape)
        except Exception as error:  # noqa: BLE001 - inputs were checked: this is the model
            raise EngineFailure(f"{model.ref} failed: {type(error).__name__}: {error}") from None
        if tuple(prediction.probs.shape) != (len(x), len(classes)):
            raise EngineFailure(
                f"{model.ref} returned {tuple(prediction.probs.shape[1:])} scores per input; "
                f"its manifest lists {len(classes)} classes"
            )
        columns = [
            prediction.probs.double().cpu().tolist(),
            prediction.label.cpu().tolist(),
            prediction.entropy.double().cpu().tolist(),
            prediction.mutual_information.double().cpu().tolist(),
        ]
        return {
            "model": model.ref,
            "uncertainty": "sbn" if seed is not None else "none",
            "samples": samples,
            "seed": seed,
            "predictions": [
                {"probs": p, "label": classes[k], "entropy": h, "mutual_information": mi}
                for p, k, h, mi in zip(*columns, strict=True)
            ],
        }

    # SBN fit ---------------------------------------------------------------------------

    async def fit_sbn(
        self,
        ref: str,
        inputs: np.ndarray,
        *,
        store: Path,
        batch_size: int | None = None,
        epochs: int = 3,
        seed: int = 0,
        target: str | None = None,
    ) -> LoadedModel:
        """Fit SBN statistics of the plain BN classifier `ref` on training `inputs` and
        register the result as a new version of `target` (default "<name>-sbn") in `store`.

        Batches are `batch_size` rows (default: the manifest's training batch size, else
        32) drawn without replacement, `epochs` shuffled passes, incomplete batches dropped.
        Raises InvalidRequest (fields inputs, batch_size, epochs, target) or
        ModelNotFound; the stored model is a zoo manifest with "transform": "sbn".
        """
        source = self.resolve(ref)
        manifest = source.manifest
        if manifest.format != "zoo":
            raise InvalidRequest(
                f"{source.ref} is a torch.export program; SBN needs a zoo-format classifier "
                "(architecture plus safetensors) whose BatchNorm layers can be replaced",
                ("name",),
            )
        if _uses_sbn(source):
            raise InvalidRequest(f"{source.ref} already has SBN statistics", ("name",))
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in source.module.modules()):
            raise InvalidRequest(
                f"{source.ref} has no BatchNorm layers: SBN needs a batch-normalised network",
                ("name",),
            )
        batch_size = batch_size or _training_batch_size(source)
        target = target or f"{source.name}-sbn"
        self._check_target(target)
        if not 1 <= epochs <= MAX_FIT_EPOCHS:
            raise InvalidRequest(f"epochs must be between 1 and {MAX_FIT_EPOCHS}", ("epochs",))
        if not 0 <= seed < 2**63:
            raise InvalidRequest("seed must be in [0, 2^63)", ("seed",))
        x = await asyncio.to_thread(as_inputs, inputs, manifest.input_shape, "inputs")
        if batch_size < 2 or len(x) < MIN_FIT_BATCHES * batch_size:
            raise InvalidRequest(
                f"need batch_size >= 2 and at least {MIN_FIT_BATCHES} batches of training "
                f"inputs ({MIN_FIT_BATCHES} x {batch_size}), got {len(x)} inputs",
                ("inputs",) if batch_size >= 2 else ("batch_size",),
            )
        if len(x) * epochs > MAX_FIT_ROWS:
            raise InvalidRequest(
                f"inputs x epochs must be at most {MAX_FIT_ROWS}, got {len(x)} x {epochs}",
                ("epochs",),
            )
        fit = {"batch_size": batch_size, "momentum": SBN_MOMENTUM, "epochs": epochs,
               "seed": seed, "inputs": len(x), "source": source.ref}  # fmt: skip
        return await asyncio.to_thread(self._fit_and_install, source, x, fit, target, store)

    def _check_target(self, target: str) -> None:
        if not valid_name(target):
            raise InvalidRequest(f"target must match {NAME_PATTERN}", ("target",))
        others = {model.kind for model in self.registry.versions(target)} - {"classifier"}
        if others:
            raise InvalidRequest(f"{target} names a {others.pop()}, not a classifier", ("target",))

    def _fit_and_install(
        self, source: LoadedModel, x: torch.Tensor, fit: dict[str, Any], target: str, store: Path
    ) -> LoadedModel:
        from architectures import save_weights

        module = sbn.convert(copy.deepcopy(source.module))
        generator = torch.Generator().manual_seed(fit["seed"])
        batch_size = fit["batch_size"]

        def batches():
            for _ in range(fit["epochs"]):
                order = torch.randperm(len(x), generator=generator)
                for first in range(0, len(x) - batch_size + 1, batch_size):
                    yield x[order[first : first + batch_size]]

        try:
            sbn.fit_statistics(module, batches(), momentum=SBN_MOMENTUM)
        except Exception as error:  # noqa: BLE001 - the inputs were checked: this is the model
            raise EngineFailure(f"fitting {source.ref} failed: {error}") from None
        manifest = source.manifest.public()
        for key in ("metrics", "evaluation", "compressed", "sbn_fit"):
            manifest.pop(key, None)  # measured for the source model, not for this one
        manifest.update(
            uncertainty="sbn",
            transform="sbn",
            description=f"{manifest.get('description') or source.ref}, with SBN statistics "
            f"fitted on {fit['inputs']} uploaded inputs",
            default_samples=DEFAULT_SAMPLES,
            max_samples=sbn.MAX_SAMPLES,
            original=source.ref,
            sbn_fit=fit,
        )
        manifest["weights"] = "weights.safetensors"
        with tempfile.TemporaryDirectory(prefix="imh-sbn-fit-") as folder:
            files = {"manifest.json": Path(folder) / "manifest.json",
                     "weights.safetensors": Path(folder) / "weights.safetensors"}  # fmt: skip
            files["manifest.json"].write_text(json.dumps(manifest, indent=2))
            save_weights(module, files["weights.safetensors"])
            return self.registry.install(store, target, None, files, replace=False)


# Inputs --------------------------------------------------------------------------------


def read_npy(data: bytes, field: str = "inputs") -> np.ndarray:
    """An array from `.npy` bytes (np.save format), never unpickling; InvalidRequest else.

    The header is read first, so a header that promises more data than was sent is refused
    before anything is allocated.
    """
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
            raise ValueError(f"dtype {dtype} is not a plain number type")
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > len(data) - stream.tell():
            raise ValueError(f"the header promises shape {shape} but the data is shorter")
        stream.seek(0)
        array = np.load(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as error:
        raise InvalidRequest(f"{field} is not a readable .npy array: {error}", (field,)) from None
    if not isinstance(array, np.ndarray):
        raise InvalidRequest(f"{field} must be one .npy array, not an archive", (field,))
    return array


def as_inputs(inputs: Any, input_shape: list[int], field: str) -> torch.Tensor:
    """(N, *input_shape) float32 from nested lists or an array; one input gets N = 1.

    Raises InvalidRequest naming `field` for ragged or non-numeric values (booleans and
    strings included), a wrong shape, and NaN or infinite values (also after the cast
    to float32).
    """
    try:
        array = np.asarray(inputs)
    except (ValueError, TypeError):
        raise InvalidRequest(f"{field} must be a rectangular array of numbers", (field,)) from None
    if array.dtype.kind not in NUMERIC_KINDS:
        raise InvalidRequest(
            f"{field} must be a rectangular array of numbers (got {array.dtype.name} values)",
            (field,),
        )
    expected = tuple(input_shape)
    if array.shape == expected:
        array = array[None]
    if array.shape[1:] != expected or array.shape[0] == 0:
        shape = ", ".join(map(str, expected))
        raise InvalidRequest(
            f"{field} must have shape (N, {shape}), or ({shape}) for one input; got {array.shape}",
            (field,),
        )
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise InvalidRequest(f"{field} contains NaN or infinite values (as float32)", (field,))
    return x


# Manifest reading ----------------------------------------------------------------------


def _uses_sbn(model: LoadedModel) -> bool:
    return model.manifest.uncertainty == "sbn" and bool(sbn.sbn_layers(model.module))


def _max_samples(model: LoadedModel) -> int:
    value = model.manifest.public().get("max_samples")
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return min(value, sbn.MAX_SAMPLES) if valid else sbn.MAX_SAMPLES


def _default_samples(model: LoadedModel) -> int:
    value = model.manifest.public().get("default_samples")
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return min(value if valid else DEFAULT_SAMPLES, _max_samples(model))


def _training_batch_size(model: LoadedModel) -> int:
    """The batch size the manifest says the net was trained (or SBN-fitted) with, else 32."""
    extra = model.manifest.public()
    for section in ("sbn_fit", "training"):
        value = extra.get(section)
        size = value.get("batch_size") if isinstance(value, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size >= 2:
            return size
    return DEFAULT_FIT_BATCH_SIZE


def _sbp_report(extra: dict[str, Any]) -> SbpReport | dict[str, Any] | None:
    report = extra.get("sbp")
    if not isinstance(report, dict):
        return None
    metrics = extra.get("metrics") if isinstance(extra.get("metrics"), dict) else {}
    speed = report.get("speed") if isinstance(report.get("speed"), dict) else {}
    sizes = speed.get("batch_sizes") if isinstance(speed.get("batch_sizes"), dict) else {}
    original_error = metrics.get("original_error")
    fields = {
        "accuracy": metrics.get("accuracy"),
        "original_accuracy": 1.0 - original_error
        if isinstance(original_error, int | float)
        else None,
        "speedup": {
            str(size): entry["speedup"]
            for size, entry in sizes.items()
            if isinstance(entry, dict) and "speedup" in entry
        },
    }
    try:
        return SbpReport.model_validate({**report, **fields})
    except ValidationError:  # a hand-written manifest: show it as it is
        return report


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
