"""Turn one model folder (`manifest.json` plus files) into a `LoadedModel`.

Example:
    >>> model = load_model(Path("store/mygan/1"), "mygan", "1", "store", torch.device("cpu"))
    >>> model.module(torch.zeros(4, model.manifest.latent_dim)).shape

Everything here may be slow (reads weights, runs a smoke test), so callers run it off
the event loop. Failures raise BadModelFile / UnsafeModelFile with a message that names
the file and what is wrong with it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from service.errors import BadModelFile
from service.models import safe_files
from service.models.compiled import compile_model
from service.models.manifests import (
    ClassifierManifest,
    DiscriminatorManifest,
    GeneratorManifest,
    Manifest,
    parse_manifest,
)

_load_counter = itertools.count(1)


@dataclass(eq=False)
class LoadedModel:
    """A model ready to run. `uid` differs between two loads of the same name and version,
    so schedulers never mix a replaced model's chains with its successor's."""

    name: str
    version: str
    source: str  # "zoo" or "store"
    directory: Path
    manifest: Manifest
    module: torch.nn.Module
    uid: int = field(default_factory=lambda: next(_load_counter))
    real_samples: torch.Tensor | None = None  # generator: chain starts only, never returned
    reference: Any = None  # generator: evaluation.FrechetReference for the running FID
    calibrators: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    compiled: bool = False  # `module` runs torch.compile'd code (service.models.compiled)
    compile_note: str | None = None  # where it runs eager instead, and why

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def ref(self) -> str:
        """ "name:version", the form requests and stats use."""
        return f"{self.name}:{self.version}"


def load_model(
    directory: Path,
    name: str,
    version: str,
    source: str,
    device: torch.device,
    compile: bool = False,
) -> LoadedModel:
    """Read, check and build the model in `directory`; `compile` is IMH_COMPILE (the
    manifest's own "compile" wins)."""
    manifest = read_manifest(directory / "manifest.json", f"{name}/{version}/manifest.json")
    for file_name in manifest.files():
        path = directory / file_name
        if not path.is_file():
            raise BadModelFile(
                f"{name}/{version}: the manifest names {file_name}, which is missing"
            )
        safe_files.refuse_pickle(path, f"{name}/{version}/{file_name}")
    module = _build_module(directory, manifest, f"{name}/{version}", device)
    model = LoadedModel(name, version, source, directory, manifest, module)
    if isinstance(manifest, ClassifierManifest):
        _check_classifier(model, device)
    if isinstance(manifest, GeneratorManifest):
        _check_generator(model, device)
        model.real_samples = _real_samples(model, device)
        model.reference = _reference(model)
    elif isinstance(manifest, DiscriminatorManifest):
        model.calibrators = _calibrators(model)
    outcome = compile_model(model.module, manifest, model.ref, device, compile)
    model.module, model.compiled, model.compile_note = outcome
    return model


def read_manifest(path: Path, shown_name: str) -> Manifest:
    if not path.is_file():
        raise BadModelFile(f"{shown_name} is missing")
    try:
        return parse_manifest(path.read_bytes())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "manifest"
        raise BadModelFile(f"{shown_name}: {where}: {first['msg']}") from None


def _build_module(
    directory: Path, manifest: Manifest, shown: str, device: torch.device
) -> torch.nn.Module:
    if manifest.format == "torch.export":
        return safe_files.load_exported(
            directory / manifest.file, f"{shown}/{manifest.file}", device
        )
    from architectures import ArchitectureError, build, parameter_bytes

    if manifest.weights is None:  # the architecture carries its own parameters
        try:
            return build(manifest.architecture, manifest.config, device=device)
        except ArchitectureError as error:
            raise BadModelFile(f"{shown}: {error}") from None
    path = directory / manifest.weights
    try:  # a config that asks for far more than the weights hold is refused unbuilt
        needed = parameter_bytes(manifest.architecture, manifest.config)
    except ArchitectureError as error:
        raise BadModelFile(f"{shown}: {error}") from None
    if needed > 2 * path.stat().st_size + 2**20:
        raise BadModelFile(
            f"{shown}: its config builds {needed} bytes of parameters, far more than "
            f"{manifest.weights} holds ({path.stat().st_size} bytes)"
        )
    weights = safe_files.load_safetensors(path, f"{shown}/{manifest.weights}", device)
    try:
        model = build(manifest.architecture, manifest.config)
        if isinstance(manifest, ClassifierManifest) and manifest.transform == "sbn":
            from classifiers.sbn import convert  # only SBN classifiers need it

            model = convert(model)
        model.load_state_dict(weights, strict=True)
    except (ArchitectureError, RuntimeError, TypeError) as error:
        raise BadModelFile(f"{shown}: {error}") from None
    return model.to(device).eval()


@torch.inference_mode()
def _check_generator(model: LoadedModel, device: torch.device) -> None:
    manifest: GeneratorManifest = model.manifest
    for batch in (1, 3):  # two sizes: a program exported with a fixed batch fails here
        try:
            out = model.module(torch.zeros(batch, manifest.latent_dim, device=device))
        except Exception as error:
            raise BadModelFile(
                f"{model.ref}: the generator fails on a batch of {batch} latents of size "
                f"{manifest.latent_dim} (export it with a dynamic batch dimension): {error}"
            ) from None
        expected = (batch, *manifest.sample_shape)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BadModelFile(
                f"{model.ref}: the generator returned {shape} for {batch} latents; "
                f"the manifest's sample_shape says {expected}"
            )


@torch.inference_mode()
def _check_classifier(model: LoadedModel, device: torch.device) -> None:
    """A classifier answers one score per class for batches of 1 and 3 inputs."""
    manifest: ClassifierManifest = model.manifest
    for batch in (1, 3):
        shape = (batch, *manifest.input_shape)
        try:
            out = model.module(torch.zeros(shape, device=device))
        except Exception as error:
            raise BadModelFile(
                f"{model.ref}: the classifier fails on inputs of shape {shape} (export it with "
                f"a dynamic batch dimension and the manifest's input_shape): {error}"
            ) from None
        expected = (batch, len(manifest.classes))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BadModelFile(
                f"{model.ref}: the classifier returned {shape} for {batch} inputs; the "
                f"manifest's {len(manifest.classes)} classes say {expected}"
            )


def _real_samples(model: LoadedModel, device: torch.device) -> torch.Tensor | None:
    manifest: GeneratorManifest = model.manifest
    if manifest.real_samples is None:
        return None
    path = model.directory / manifest.real_samples
    shown = f"{model.ref}/{manifest.real_samples}"
    if path.suffix == ".npz":
        arrays = {k: torch.from_numpy(v) for k, v in safe_files.load_npz(path, shown).items()}
    else:
        arrays = safe_files.load_safetensors(path, shown, device)
    x = arrays.get("x", next(iter(arrays.values())) if len(arrays) == 1 else None)
    if x is None or tuple(x.shape[1:]) != tuple(manifest.sample_shape) or len(x) == 0:
        shape = ", ".join(map(str, manifest.sample_shape))
        raise BadModelFile(f"{shown}: needs a tensor 'x' of shape (N, {shape})")
    return x.to(device=device, dtype=torch.float32)


def _reference(model: LoadedModel) -> Any:
    manifest: GeneratorManifest = model.manifest
    if manifest.reference_stats is None:
        return None
    from evaluation.frechet import FrechetReference

    shown = f"{model.ref}/{manifest.reference_stats}"
    arrays = safe_files.load_npz(model.directory / manifest.reference_stats, shown)
    try:
        return FrechetReference(arrays["mu"], arrays["sigma"])
    except (KeyError, ValueError) as error:
        raise BadModelFile(
            f"{shown}: needs pytorch-fid arrays 'mu' and 'sigma' ({error})"
        ) from None


def _calibrators(model: LoadedModel) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    manifest: DiscriminatorManifest = model.manifest
    calibrators: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"none": _identity}
    if manifest.calibration is not None:
        if manifest.input == "pair":
            raise BadModelFile(f"{model.ref}: pair discriminators take no calibration file")
        from discriminators.calibration import load_calibration

        shown = f"{model.ref}/{manifest.calibration}"
        safe_files.load_json(model.directory / manifest.calibration, shown)  # clear JSON errors
        try:
            fitted, _report = load_calibration(model.directory / manifest.calibration)
        except (KeyError, ValueError, TypeError, AssertionError) as error:
            raise BadModelFile(f"{shown}: not a calibration file ({error!r})") from None
        calibrators.update(fitted)
    default = manifest.default_calibration
    if default is not None and default not in calibrators:
        raise BadModelFile(
            f"{model.ref}: default_calibration {default!r} is not one of {sorted(calibrators)}"
        )
    return calibrators


def _identity(raw_logit: torch.Tensor) -> torch.Tensor:
    return raw_logit
