"""Bring-your-own models over HTTP: listing, upload (admin token), replace, delete."""

from __future__ import annotations

import asyncio
import io
import json
import pickle

import httpx
import pytest
import torch

from tests.service.conftest import metric
from tests.service.toy_models import MLP, export, seeded

GENERATOR_MANIFEST = {"kind": "generator", "format": "torch.export", "file": "generator.pt2",
                      "latent_dim": 2, "sample_shape": [2]}  # fmt: skip
DISCRIMINATOR_MANIFEST = {"kind": "discriminator", "format": "torch.export",
                          "file": "discriminator.pt2", "generator": "mygan", "input": "sample",
                          "output": "logit"}  # fmt: skip


def program_bytes(module: torch.nn.Module, *example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(export(module, *example), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gan_files():
    generator = program_bytes(seeded(MLP, [2, 8, 2], (2,)), torch.randn(4, 2))
    discriminator = program_bytes(seeded(MLP, [2, 8, 1]), torch.randn(4, 2))
    return generator, discriminator


def upload(client, headers, name, manifest, files, **form):
    return client.post(
        "/v1/models",
        headers=headers,
        data={"name": name, **form},
        files=[("manifest", ("manifest.json", json.dumps(manifest)))]
        + [("files", (file_name, content)) for file_name, content in files.items()],
    )


def test_the_store_models_are_listed_with_their_kinds(client):
    listing = client.get("/v1/models").json()
    kinds = {(m["name"], m["kind"]) for m in listing["models"]}
    assert {("toy", "generator"), ("toy-d", "discriminator"), ("toy-prop", "proposal"),
            ("img-features", "features")} <= kinds  # fmt: skip
    toy_d = client.get("/v1/models/toy-d").json()["versions"][0]
    assert toy_d["calibrations"] == ["beta", "isotonic", "logistic", "none"] and toy_d["latest"]
    assert client.get("/v1/models/nope").status_code == 404


def test_broken_model_folders_are_skipped_and_listed_with_the_reason(client):
    errors = client.get("/v1/models").json()["load_errors"]
    assert "manifest" in errors["broken/1"] and "pickle" in errors["pickled/1"]
    assert client.get("/v1/models/pickled").status_code == 404
    assert client.get("/readyz").status_code == 200


def test_uploads_need_the_admin_token(client, gan_files):
    files = {"generator.pt2": gan_files[0]}
    assert upload(client, {}, "x", GENERATOR_MANIFEST, files).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    assert upload(client, wrong, "x", GENERATOR_MANIFEST, files).status_code == 403
    assert client.delete("/v1/models/toy/1").status_code == 401


def test_an_uploaded_gan_samples_and_a_replace_keeps_running_requests(client, admin, gan_files):
    generator, discriminator = gan_files
    created = upload(client, admin, "mygan", GENERATOR_MANIFEST, {"generator.pt2": generator})
    assert created.status_code == 201, created.text
    assert created.json()["version"] == "1"
    created = upload(client, admin, "mygan-d", DISCRIMINATOR_MANIFEST,
                     {"discriminator.pt2": discriminator})  # fmt: skip
    assert created.status_code == 201, created.text

    body = {"generator": "mygan", "discriminator": "mygan-d", "method": "imh", "n": 64,
            "steps": 3000, "seed": 0, "params": {"chains": 8, "thin": 100}}  # fmt: skip
    with client.stream("POST", "/v1/sample/stream", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("id:")
        # Replace version 1 while its request runs: the request keeps its own models.
        conflict = upload(
            client, admin, "mygan", GENERATOR_MANIFEST, {"generator.pt2": generator}, version="1"
        )  # noqa: E501
        assert conflict.status_code == 409
        replaced = upload(client, admin, "mygan", GENERATOR_MANIFEST,
                          {"generator.pt2": generator}, version="1", replace="true")  # fmt: skip
        assert replaced.status_code == 201, replaced.text
        rest = "\n".join(lines)
    assert "event: done" in rest and "event: error" not in rest

    answer = client.post("/v1/sample", json={**body, "params": {}, "steps": 2, "n": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["stats"]["generator"] == "mygan:1"

    deleted = client.delete("/v1/models/mygan/1?purge=true", headers=admin)
    assert deleted.status_code == 200
    assert client.post("/v1/sample", json={"generator": "mygan"}).status_code == 404
    assert client.delete("/v1/models/mygan/1", headers=admin).status_code == 404


def test_pickles_are_refused_and_never_run(client, admin, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pickled = pickle.dumps(Payload())
    manifest = {**GENERATOR_MANIFEST, "file": "generator.pt2"}
    refused = upload(client, admin, "evil", manifest, {"generator.pt2": pickled})
    assert refused.status_code == 415 and "pickle" in refused.text
    as_pt = {**GENERATOR_MANIFEST, "file": "generator.pt"}
    refused = upload(client, admin, "evil", as_pt, {"generator.pt": pickled})
    assert refused.status_code == 400 and ".pt2" in refused.text
    torch_saved = io.BytesIO()
    torch.save(Payload(), torch_saved)  # a zip whose data.pkl runs the payload
    refused = upload(client, admin, "evil", manifest, {"generator.pt2": torch_saved.getvalue()})
    assert refused.status_code in (400, 415)
    assert not marker.exists()
    assert client.get("/v1/models/evil").status_code == 404


def test_bad_uploads_get_clear_client_errors(client, admin, gan_files):
    generator = {"generator.pt2": gan_files[0]}
    missing = upload(client, admin, "bad", GENERATOR_MANIFEST, {})
    assert missing.status_code == 400 and "missing" in missing.text
    extra = upload(client, admin, "bad", GENERATOR_MANIFEST, {**generator, "x.json": b"{}"})
    assert extra.status_code == 400 and "unexpected" in extra.text
    wrong_shape = upload(
        client, admin, "bad", {**GENERATOR_MANIFEST, "sample_shape": [3]}, generator
    )
    assert wrong_shape.status_code == 400 and "sample_shape" in wrong_shape.text
    bad_manifest = upload(client, admin, "bad", {"kind": "generator"}, generator)
    assert bad_manifest.status_code == 400
    bad_name = upload(client, admin, "../up", GENERATOR_MANIFEST, generator)
    assert bad_name.status_code == 400
    assert client.get("/healthz").status_code == 200


def test_without_a_configured_token_administration_is_refused(tmp_path):
    from service.api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(zoo=False, model_store=tmp_path, admin_token=None))

    async def delete():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as local:
            return await local.delete("/v1/models/a/1", headers={"Authorization": "Bearer x"})

    response = asyncio.run(delete())
    assert response.status_code == 403 and "IMH_ADMIN_TOKEN" in response.text


def test_models_gauge_counts_loaded_models(client):
    assert metric(client, "imh_models_loaded", kind="generator") >= 3


def test_safetensors_whose_header_length_starts_like_a_pickle_load(tmp_path):
    """A header of 0x280 bytes writes 0x80 first, as a pickle stream begins: still safe."""
    from safetensors.torch import load_file, save_file

    from service.models import safe_files

    path = tmp_path / "weights.safetensors"
    for size in range(1, 400):  # find tensor names whose header is 0x280 bytes long
        save_file({"w" * size: torch.zeros(1)}, str(path))
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    safe_files.refuse_pickle(path, "weights.safetensors")  # no error
    assert len(load_file(str(path))) == 1
    path.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(safe_files.UnsafeModelFile):
        safe_files.refuse_pickle(path, "weights.safetensors")
