"""The model registry: every loaded model by name and version, over one or more stores.

A store is laid out like Triton's model repository, `<store>/<name>/<version>/manifest.json`
plus files. The built-in zoo (zoo/store, inside the package) loads first, then the user
store (IMH_MODEL_STORE), whose models win on a name and version clash. A broken folder
is skipped with a logged error (listed in `load_errors`) rather than stopping the start.

Lookups return concrete `LoadedModel` objects: a request resolves its models once and
keeps them, and uploads or deletes swap the registry's table atomically, so a running
request never sees its model change under it.

Example:
    >>> registry = Registry(torch.device("cpu"))
    >>> registry.load_store(Path("store"), "store")
    >>> registry.get("mygan").ref
    'mygan:1'
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from service.errors import BadModelFile, ModelConflict, ModelNotFound
from service.models.loading import LoadedModel, load_model, read_manifest
from service.models.manifests import NAME_PATTERN, DiscriminatorManifest, valid_name

log = logging.getLogger("imh.registry")
ZOO_STORE = Path(__file__).resolve().parents[2] / "zoo" / "store"


def version_key(version: str) -> tuple[int, int, str]:
    """Numeric versions sort as numbers and after any non-numeric ones."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def split_ref(ref: str) -> tuple[str, str | None]:
    """ "name" or "name:version" -> (name, version or None)."""
    name, _, version = ref.partition(":")
    return name, version or None


class Registry:
    def __init__(self, device: torch.device, compile: bool = False):
        self.device = device
        self.compile = compile  # IMH_COMPILE: models run torch.compile'd where it pays
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._write_lock = threading.Lock()  # writers copy the table; readers never lock
        self._load_lock = threading.Lock()
        self.load_errors: dict[str, str] = {}  # folder -> why it was skipped
        # A worker's copy of IMH_MODEL_STORE, shared with the API: exact versions that are
        # not loaded yet are loaded from it on first use.
        self.shared_store: Path | None = None

    # Reading -------------------------------------------------------------------------

    def all(self) -> list[LoadedModel]:
        return sorted(self._models.values(), key=lambda m: (m.name, version_key(m.version)))

    def versions(self, name: str) -> list[LoadedModel]:
        return [model for model in self.all() if model.name == name]

    def get(self, ref: str, kind: str | None = None) -> LoadedModel:
        """The model `ref` ("name" for its latest version, or "name:version")."""
        name, version = split_ref(ref)
        if version is None:
            candidates = self.versions(name)
            model = candidates[-1] if candidates else None
        else:
            model = self._models.get((name, version))
        if model is None:
            known = sorted({m.name for m in self._models.values() if kind in (None, m.kind)})
            raise ModelNotFound(f"no model {ref!r} is loaded; loaded: {known}")
        if kind is not None and model.kind != kind:
            raise ModelNotFound(f"{model.ref} is a {model.kind}, not a {kind}")
        return model

    def load_missing(self, refs: list[str | None]) -> bool:
        """Load the exact versions among `refs` ("name:version") that are not loaded but
        lie in the shared store (a worker asked for versions the API already knows);
        returns whether any was loaded. Slow: run it off the event loop."""
        loaded = False
        for ref in refs:
            name, version = split_ref(ref or "")
            if self.shared_store is None or version is None or (name, version) in self._models:
                continue
            if not (valid_name(name) and valid_name(version)):
                continue
            if not (self.shared_store / name / version / "manifest.json").is_file():
                continue
            try:
                self.load_one(self.shared_store, name, version, "store")
                loaded = True
            except Exception as error:  # noqa: BLE001 - the caller reports the model as missing
                log.warning("could not load %s from the shared store: %s", ref, error)
        return loaded

    def discriminators_for(self, generator: LoadedModel, input: str) -> list[LoadedModel]:
        """Latest versions of the discriminators of `input` kind registered for a generator."""
        latest: dict[str, LoadedModel] = {}
        for model in self.all():
            manifest = model.manifest
            if isinstance(manifest, DiscriminatorManifest) and manifest.input == input:
                if split_ref(manifest.generator)[0] == generator.name:
                    latest[model.name] = model
        return [latest[name] for name in sorted(latest)]

    def missing_partners(self, model: LoadedModel) -> list[str]:
        """What `model`'s manifest names that is not loaded (yet): said at upload time."""
        manifest, problems = model.manifest, []
        wanted = {
            "discriminator": getattr(manifest, "discriminator", None),
            "features": getattr(manifest, "features", None),
            "generator": getattr(manifest, "generator", None),
        }
        for kind, ref in wanted.items():
            if ref is None:
                continue
            try:
                self.get(ref, kind=kind)
            except ModelNotFound:
                problems.append(
                    f"{model.ref} names {kind} {ref!r}, which is not loaded: upload it "
                    f"(kind {kind!r}) before sampling with {model.name}"
                )
        return problems

    # Loading -------------------------------------------------------------------------

    def load_store(self, root: Path, source: str) -> int:
        """Load every <root>/<name>/<version>/ folder; returns how many loaded."""
        if not root.is_dir():
            return 0
        loaded = 0
        for folder in sorted(p for p in root.glob("*/*") if p.is_dir()):
            name, version = folder.parent.name, folder.name
            if not (valid_name(name) and valid_name(version)):
                continue  # staging folders and stray files are not models
            try:
                self._put(self._load(folder, name, version, source))
                loaded += 1
            except Exception as error:  # noqa: BLE001 - one bad model must not stop the rest
                message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
                self.load_errors[str(folder)] = message
                log.error("skipped model %s/%s: %s", name, version, message)
        return loaded

    def load_one(self, root: Path, name: str, version: str, source: str) -> LoadedModel:
        """(Re)load one <root>/<name>/<version>/ folder, e.g. after another process wrote it."""
        if not (valid_name(name) and valid_name(version)):
            raise BadModelFile(f"name and version must match {NAME_PATTERN}")
        model = self._load(root / name / version, name, version, source)
        self._put(model)
        return model

    def install(
        self, store: Path, name: str, version: str | None, files: dict[str, Path], replace: bool
    ) -> LoadedModel:
        """Check, load and store an uploaded model; `files` maps file names to temp paths.

        The files are written to a staging folder inside the store, loaded from there
        (so a failure leaves nothing behind), and only then moved into place and swapped
        into the registry.
        """
        if not valid_name(name) or (version is not None and not valid_name(version)):
            raise BadModelFile(f"name and version must match {NAME_PATTERN}")
        if "manifest.json" not in files:
            raise BadModelFile("the upload needs a manifest")
        manifest = read_manifest(files["manifest.json"], "manifest")
        needed = set(manifest.files())
        extra = set(files) - needed - {"manifest.json"}
        missing = needed - set(files)
        if missing or extra:
            raise BadModelFile(
                f"the manifest names {sorted(needed)}; missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        with self._write_lock:  # one upload at a time picks versions and moves folders
            version = version or self._next_version(name, store)
            target = store / name / version
            if ((name, version) in self._models or target.exists()) and not replace:
                raise ModelConflict(f"{name}:{version} exists; send replace=true to replace it")
            store.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=store))
            try:
                for file_name, path in files.items():
                    shutil.copyfile(path, staging / file_name)
                model = self._load(staging, name, version, "store")
                if target.exists():
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(target)
                model.directory = target
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._put(model, locked=True)
        return model

    def remove(
        self, name: str, version: str, store: Path | None = None, allow_zoo: bool = False
    ) -> tuple[LoadedModel, bool]:
        """Unload a version, and delete its folder when it lives in `store` (the name's
        folder too once empty). Returns (the model, whether files were deleted).

        Built-in (zoo) models are refused unless `allow_zoo`; their files are never
        deleted, so they are back after a restart.
        """
        with self._write_lock:
            model = self._models.get((name, version))
            if model is None:
                raise ModelNotFound(f"no model {name}:{version} is loaded")
            if model.source == "zoo" and not allow_zoo:
                raise ModelConflict(
                    f"{model.ref} is a built-in model; start the server with "
                    "IMH_ALLOW_ZOO_DELETE=1 to unload it (or IMH_ZOO=0 to load none)"
                )
            table = dict(self._models)
            del table[(name, version)]
            self._models = table
            folder = model.directory.resolve()
            owned = store is not None and folder.parent.parent == store.resolve()
            if owned and model.source == "store":
                shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(OSError):
                    folder.parent.rmdir()  # only if no other version is left
                return model, True
        return model, False

    def _load(self, folder: Path, name: str, version: str, source: str) -> LoadedModel:
        # One load at a time: torch.export.load keeps global state while it reads a
        # program, so two threads loading at once break each other.
        with self._load_lock:
            return load_model(folder, name, version, source, self.device, self.compile)

    def _put(self, model: LoadedModel, locked: bool = False) -> None:
        if not locked:
            with self._write_lock:
                return self._put(model, locked=True)
        key = (model.name, model.version)
        if key in self._models:
            log.warning(
                "%s from %s replaces the %s copy", model.ref, model.source, self._models[key].source
            )
        self._models = {**self._models, key: model}

    def _next_version(self, name: str, store: Path) -> str:
        numbers = [int(m.version) for m in self.versions(name) if m.version.isdigit()]
        if (store / name).is_dir():
            numbers += [int(p.name) for p in (store / name).iterdir() if p.name.isdigit()]
        return str(max(numbers, default=0) + 1)
