"""POST /v1/sample against a real server: every method, seeds, formats, options."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from samplers.methods import METHODS


def sample(client, **body):
    response = client.post("/v1/sample", json=body)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_n_samples_and_stats(client, method):
    answer = sample(client, generator="toy", method=method, n=5, steps=4, seed=1).json()
    assert np.asarray(answer["samples"]).shape == (5, 2)
    stats = answer["stats"]
    assert stats["method"] == method and stats["n"] == 5 and stats["mode"] == "final"
    assert stats["generator"] == "toy:1"
    assert stats["proposals"] >= (5 if method in ("none", "drs") else 5 * 4)  # drs: until accepted
    assert 0 <= stats["accepted"] <= stats["chain_steps"] <= stats["proposals"]
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["chain_steps"])
    if method == "isir":  # a step proposes particles - 1 points (8 particles by default)
        assert stats["proposals"] == 7 * stats["chain_steps"]
    assert stats["discriminator"] == {"none": None, "markov": "toy-pair:1"}.get(method, "toy-d:1")


def test_same_seed_same_samples_and_another_seed_differs(client):
    body = {"generator": "toy", "method": "imh", "n": 300, "steps": 3}
    first = sample(client, **body, seed=5).json()
    again = sample(client, **body, seed=5).json()
    other = sample(client, **body, seed=6).json()
    assert first["samples"] == again["samples"]
    assert first["samples"] != other["samples"]
    assert first["stats"]["seed"] == 5


def test_imh_starts_from_real_samples_but_never_returns_them(client, model_store):
    from safetensors.torch import load_file

    real = load_file(str(model_store / "toy" / "1" / "real.safetensors"))["x"].numpy()
    answer = sample(client, generator="toy", method="imh", n=256, steps=1, seed=2).json()
    samples = np.asarray(answer["samples"], dtype=np.float32)
    assert answer["stats"]["restarted"] > 0  # one step: many chains never left their start
    assert not (samples[:, None, :] == real[None, :, :]).all(-1).any()


def test_stream_mode_through_the_json_path_returns_n_samples(client):
    answer = sample(
        client, generator="toy", method="pcn", n=40, steps=50, seed=3,
        params={"mode": "stream", "chains": 8, "beta": 0.3},
    ).json()  # fmt: skip
    assert len(answer["samples"]) == 40 and answer["stats"]["mode"] == "stream"


def test_npy_and_png_formats(client):
    npy = sample(client, generator="toy", method="drs", n=7, steps=2, seed=0, format="npy")
    array = np.load(io.BytesIO(npy.content), allow_pickle=False)
    assert array.shape == (7, 2) and array.dtype == np.float32
    assert json.loads(npy.headers["X-IMH-Stats"])["n"] == 7
    png = sample(client, generator="img", method="imh", n=9, steps=2, seed=0, format="png")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (4 * (3 * 9 + 1), 4 * (3 * 9 + 1))
    wide = sample(client, generator="img", method="imh", n=9, steps=2, seed=0, format="png",
                  png={"scale": 2, "columns": 9})  # fmt: skip
    assert Image.open(io.BytesIO(wide.content)).size == (2 * (9 * 9 + 1), 2 * (8 + 2))


def test_png_is_refused_for_a_model_that_makes_no_images(client):
    response = client.post("/v1/sample", json={"generator": "toy", "format": "png"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "format"]


def test_calibrations_are_chosen_by_name_and_unknown_ones_listed(client):
    answer = sample(client, generator="toy", n=4, steps=2, seed=0, calibration="isotonic").json()
    assert answer["stats"]["calibration"] == "isotonic"
    response = client.post("/v1/sample", json={"generator": "toy", "calibration": "platt"})
    assert response.status_code == 422
    assert "isotonic" in response.text and response.json()["detail"][0]["loc"][-1] == "calibration"


def test_markov_uses_a_learned_proposal_or_the_independent_case(client):
    body = {"generator": "toy", "method": "markov", "n": 4, "steps": 3, "seed": 0}
    learned = sample(client, **body, discriminator="toy-pair-cond").json()
    assert learned["stats"]["discriminator"] == "toy-pair-cond:1"
    independent = sample(client, **body, discriminator="toy-d").json()
    assert independent["stats"]["discriminator"] == "toy-d:1"
    refused = client.post(
        "/v1/sample",
        json={"generator": "toy", "method": "markov", "discriminator": "toy-d",
              "params": {"proposal": "gaussian"}},
    )  # fmt: skip
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "proposal"


def test_drs_gamma_shifts_acceptance(client):
    body = {"generator": "toy", "method": "drs", "n": 200, "steps": 2, "seed": 0}
    exact = sample(client, **body).json()["stats"]
    # Same seed: the same proposals and uniforms, each accepted with a higher probability.
    shifted = sample(client, **body, params={"gamma": -3.0}).json()["stats"]
    assert shifted["accepted"] >= exact["accepted"]
    assert sample(client, **body, params={"gamma_percentile": 80}).json()["stats"]["n"] == 200


def test_a_zoo_format_model_from_the_store_samples(client):
    answer = sample(client, generator="toy-zoo", method="none", n=3, seed=0).json()
    assert np.asarray(answer["samples"]).shape == (3, 2)


def test_mala_takes_gradients_through_a_calibrator_other_methods_used_first(client):
    # Calibrators cache lookup tables; one built under inference mode by an imh group
    # must not break the gradients mala takes through the same calibration.
    body = {"generator": "toy", "n": 8, "steps": 3, "seed": 0, "calibration": "isotonic"}
    sample(client, **body, method="imh")
    answer = sample(client, **body, method="mala").json()
    assert answer["stats"]["calibration"] == "isotonic" and len(answer["samples"]) == 8


def test_a_client_that_gives_up_on_a_final_request_frees_its_chains(client, server):
    import time

    import httpx

    from tests.service.conftest import metric

    labels = {"model": "img", "method": "mala"}  # no other test samples img with mala
    body = {"generator": "img", "method": "mala", "n": 64, "steps": 10_000, "seed": 0}
    with pytest.raises(httpx.ReadTimeout):  # left alone, this runs for many seconds
        httpx.post(f"{server.url}/v1/sample", json=body, timeout=httpx.Timeout(30, read=1.0))
    deadline = time.monotonic() + 30
    while (
        metric(client, "imh_sample_requests_total", outcome="cancelled", **labels) < 1
        or metric(client, "imh_active_chains", **labels) != 0
    ):
        assert time.monotonic() < deadline, "the chains of a gone client were not freed"
        time.sleep(0.05)
    assert metric(client, "imh_sample_requests_total", outcome="ok", **labels) == 0


def test_the_readme_drs_example_returns_drs_samples_without_fallbacks(client):
    """README: {"generator": "toy25", "method": "drs", "n": 1000, "format": "npy"}."""
    answer = client.post(
        "/v1/sample", json={"generator": "toy25", "method": "drs", "n": 1000, "format": "npy"}
    )
    assert answer.status_code == 200
    stats = json.loads(answer.headers["X-IMH-Stats"])
    samples = np.load(io.BytesIO(answer.content), allow_pickle=False)
    assert samples.shape == (1000, 2) and stats["n"] == 1000
    assert stats["fallback"] == 0 and stats["accepted"] == 1000
