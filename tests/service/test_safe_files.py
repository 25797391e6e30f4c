"""Model files load without running code hidden in them (torch.export.load alone would)."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from service.errors import BadModelFile, UnsafeModelFile
from service.models.safe_files import check_pt2, load_exported, load_npz, load_safetensors
from tests.service.toy_models import MLP, Pair, export, seeded


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "generator.pt2"
    torch.export.save(export(seeded(MLP, [2, 8, 2], (2,)), torch.randn(4, 2)), str(path))
    return path


class Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def rewrite(source: Path, target: Path, change) -> Path:
    """Copy a zip, passing each (name, bytes) through `change` (None drops the entry)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info.filename))
            if data is not None:
                new.writestr(info, data)
    return target


def test_a_plain_exported_program_loads_and_keeps_its_dynamic_batch(program):
    check_pt2(program, "generator.pt2")
    module = load_exported(program, "generator.pt2", torch.device("cpu"))
    assert module(torch.zeros(1, 2)).shape == (1, 2) and module(torch.zeros(5, 2)).shape == (5, 2)


def test_pair_programs_with_two_inputs_load(tmp_path):
    path = tmp_path / "pair.pt2"
    x = torch.randn(4, 2)
    torch.export.save(export(seeded(Pair, 2), x, x), str(path))
    assert load_exported(path, "pair.pt2", torch.device("cpu"))(x, x).shape == (4,)


def test_pickle_bytes_are_refused_whatever_the_name(tmp_path):
    marker = tmp_path / "ran"
    for name in ("model.pt2", "weights.safetensors", "stats.npz"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(UnsafeModelFile, match="pickle"):
            {"pt2": check_pt2, "safetensors": load_safetensors, "npz": load_npz}[
                name.split(".")[1]
            ](
                *(
                    (path, name, torch.device("cpu"))
                    if name.endswith("safetensors")
                    else (path, name)
                )
            )
    assert not marker.exists()


def test_pickled_sample_inputs_are_refused_before_torch_could_unpickle_them(program, tmp_path):
    # torch.export.load reads sample inputs with weights_only=True and, when that fails,
    # again with weights_only=False: this payload would run there.
    marker = tmp_path / "ran"
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)

    def swap(name, data):
        return evil.getvalue() if "sample_inputs" in name else data

    crafted = rewrite(program, tmp_path / "evil.pt2", swap)
    with pytest.raises(UnsafeModelFile, match="sample inputs"):
        check_pt2(crafted, "evil.pt2")
    assert not marker.exists()


def test_payloads_marked_for_pickle_are_refused(program, tmp_path):
    def mark(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            for payload in config["config"].values():
                payload["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    with pytest.raises(UnsafeModelFile, match="pickled"):
        check_pt2(rewrite(program, tmp_path / "p.pt2", mark), "p.pt2")


def test_graph_targets_outside_the_allowlist_are_refused(program, tmp_path):
    # The deserializer resolves "torch.os.system" to os.system by walking attributes.
    def retarget(name, data):
        return data.replace(b"torch.ops.aten.tanh.default", b"torch.os.system")

    with pytest.raises(UnsafeModelFile, match="torch.os.system"):
        check_pt2(rewrite(program, tmp_path / "t.pt2", retarget), "t.pt2")


def test_legacy_and_compiled_archives_are_refused(program, tmp_path):
    legacy = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(legacy, "w") as archive:
        archive.writestr("legacy/serialized_exported_program.json", "{}")
        archive.writestr("legacy/serialized_state_dict.pt", pickle.dumps({}))
    with pytest.raises(UnsafeModelFile, match="layout"):
        check_pt2(legacy, "legacy.pt2")

    def add_library(name, data):
        return data

    compiled = rewrite(program, tmp_path / "aoti.pt2", add_library)
    root = zipfile.ZipFile(program).namelist()[0].split("/")[0]
    with zipfile.ZipFile(compiled, "a") as archive:
        archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(UnsafeModelFile, match="compiled"):
        check_pt2(compiled, "aoti.pt2")


def test_files_that_are_not_archives_are_bad_not_crashes(tmp_path):
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"definitely not a zip")
    with pytest.raises(BadModelFile, match="not a torch.export archive"):
        check_pt2(path, "junk.pt2")
