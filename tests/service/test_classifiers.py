"""Classifier endpoints against a real server: SBN uncertainty, SBP-compressed nets, npy
bodies, bad input, and the admin SBN fit."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.service.conftest import metric
from zoo.data import load_digits_split
from zoo.digits04 import digits04_data

ZOO_CLASSIFIERS = {"digits04-bn", "digits04-sbn", "digits-lenet5", "digits-lenet5-sbp",
                   "digits-mlp", "digits-mlp-sbp"}  # fmt: skip


@pytest.fixture(scope="module")
def digits04():
    return digits04_data()


def predict(client, name, **body):
    response = client.post(f"/v1/classifiers/{name}/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def columns(answer) -> dict[str, np.ndarray]:
    predictions = answer["predictions"]
    return {key: np.asarray([p[key] for p in predictions]) for key in predictions[0]}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_models_and_classifiers_list_the_zoo_classifiers(client):
    models = client.get("/v1/models").json()["models"]
    kinds = {m["name"]: m["kind"] for m in models if m["name"] in ZOO_CLASSIFIERS}
    assert kinds == dict.fromkeys(ZOO_CLASSIFIERS, "classifier")
    listed = {c["name"] for c in client.get("/v1/classifiers").json()["classifiers"]}
    assert ZOO_CLASSIFIERS <= listed


def test_sbn_predicts_probabilities_with_more_uncertainty_out_of_domain(client, digits04):
    x, y = digits04.x_test[:64], digits04.y_test[:64]
    answer = predict(client, "digits04-sbn", inputs=x.tolist(), samples=16, seed=0)
    assert answer["model"] == "digits04-sbn:1" and answer["uncertainty"] == "sbn"
    assert answer["samples"] == 16 and answer["seed"] == 0
    got = columns(answer)
    assert got["probs"].shape == (64, 5)
    np.testing.assert_allclose(got["probs"].sum(1), 1.0, atol=1e-5)
    assert set(got["label"]) <= {0, 1, 2, 3, 4} and (got["label"] == y).mean() >= 0.95
    assert (got["entropy"] >= got["mutual_information"]).all()
    assert (got["mutual_information"] >= 0).all() and got["mutual_information"].max() > 0
    ood = columns(predict(client, "digits04-sbn", inputs=digits04.x_ood[:64].tolist(),
                          samples=16, seed=0))  # fmt: skip
    # digits 5-9 were never seen: SBN's mutual information separates them (AUROC ~0.99)
    assert np.median(ood["mutual_information"]) > 10 * np.median(got["mutual_information"])


def test_same_seed_same_answer_and_another_seed_differs(client, digits04):
    body = {"inputs": digits04.x_test[:8].tolist(), "samples": 8}
    first = predict(client, "digits04-sbn", **body, seed=1)
    assert predict(client, "digits04-sbn", **body, seed=1) == first
    other = predict(client, "digits04-sbn", **body, seed=2)
    assert columns(other)["probs"].tolist() != columns(first)["probs"].tolist()
    unseeded = predict(client, "digits04-sbn", inputs=body["inputs"])
    assert unseeded["samples"] == 32 and isinstance(unseeded["seed"], int)


def test_plain_bn_is_deterministic_with_zero_mutual_information(client, digits04):
    x = digits04.x_test[:32].tolist()
    answer = predict(client, "digits04-bn", inputs=x, samples=64, seed=3)
    assert answer["uncertainty"] == "none" and answer["samples"] == 1 and answer["seed"] is None
    got = columns(answer)
    assert (got["mutual_information"] == 0).all() and (got["entropy"] > 0).all()
    assert (got["label"] == digits04.y_test[:32]).mean() >= 0.95
    description = client.get("/v1/classifiers/digits04-bn").json()
    assert description["uncertainty"] == "none" and description["samples"] is None


def test_one_input_without_a_batch_dimension(client, digits04):
    answer = predict(client, "digits04-sbn", inputs=digits04.x_test[0].tolist(), seed=0)
    assert len(answer["predictions"]) == 1
    assert answer["predictions"][0]["label"] == digits04.y_test[0]


def test_sbp_net_agrees_with_its_original_and_reports_its_compression(client):
    split = load_digits_split()
    x = split.x_test.tolist()
    small = columns(predict(client, "digits-lenet5-sbp", inputs=x))["label"]
    large = columns(predict(client, "digits-lenet5", inputs=x))["label"]
    assert (small == large).mean() >= 0.97
    described = client.get("/v1/classifiers/digits-lenet5-sbp").json()
    # the manifest's accuracy was measured on the same held-out split
    assert (small == split.y_test).mean() == pytest.approx(described["metrics"]["accuracy"],
                                                           abs=1.5 / len(x))  # fmt: skip
    sbp = described["sbp"]
    assert sbp["units_before"] == [20, 50, 800, 500] and len(sbp["units_after"]) == 4
    assert all(a <= b for a, b in zip(sbp["units_after"], sbp["units_before"], strict=True))
    assert sbp["params_after"] < sbp["params_before"] and sbp["flops_after"] < sbp["flops_before"]
    assert set(sbp["speedup"]) == {"1", "256"} and sbp["speedup"]["256"] > 1
    assert sbp["accuracy"] == described["metrics"]["accuracy"] and sbp["original_accuracy"] > 0.9
    assert described["original"] == "digits-lenet5"
    assert client.get("/v1/classifiers/digits-lenet5").json()["compressed"] == "digits-lenet5-sbp"


def test_npy_body_gives_the_json_answer(client, digits04):
    x = digits04.x_test[:6]
    by_json = predict(client, "digits04-sbn", inputs=x.tolist(), samples=4, seed=7)
    for content_type in ("application/x-npy", "application/octet-stream"):
        response = client.post(
            "/v1/classifiers/digits04-sbn/predict?samples=4&seed=7",
            content=npy(x),
            headers={"content-type": content_type},
        )
        assert response.status_code == 200, response.text
        assert response.json() == by_json


def post_json(client, name, raw):
    return client.post(f"/v1/classifiers/{name}/predict", content=raw,
                       headers={"content-type": "application/json"})  # fmt: skip


IMAGE = [[[0.5] * 8] * 8]


@pytest.mark.parametrize(
    "body,field",
    [
        ({"inputs": [[[0.5] * 8] * 7]}, "inputs"),  # wrong shape
        ({"inputs": [[1.0, 2.0]]}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [IMAGE, [[[0.5] * 8] * 7]]}, "inputs"),  # ragged
        ({"inputs": [[[["a"] * 8] * 8]]}, "inputs"),  # not numbers
        ({"inputs": [[[[True] * 8] * 8]]}, "inputs"),
        ({"inputs": [[[[1e39] * 8] * 8]]}, "inputs"),  # overflows float32
        ({"inputs": [IMAGE] * 4097}, "inputs"),  # more than the per-request limit
        ({"inputs": [IMAGE], "samples": 0}, "samples"),
        ({"inputs": [IMAGE], "samples": 1025}, "samples"),
        ({"inputs": [IMAGE], "samples": "many"}, "samples"),
        ({"inputs": [IMAGE] * 200, "samples": 1024}, "samples"),  # rows over the limit
        ({"inputs": [IMAGE], "seed": -1}, "seed"),
        ({"inputs": [IMAGE], "temperature": 2}, "temperature"),
    ],
)
def test_bad_inputs_and_options_get_a_422_naming_the_field(client, body, field):
    response = client.post("/v1/classifiers/digits04-sbn/predict", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"][0]["loc"], response.json()


def test_nan_inputs_bad_npy_and_unknown_models_are_refused(client):
    raw = json.dumps({"inputs": [IMAGE]}).replace("0.5", "NaN", 1)
    nan = post_json(client, "digits04-sbn", raw)
    assert nan.status_code == 422 and "NaN" in nan.text
    assert post_json(client, "digits04-sbn", b"{not json").status_code == 422
    headers = {"content-type": "application/x-npy"}
    url = "/v1/classifiers/digits04-sbn/predict"
    assert client.post(url, content=b"\x93NUMPY garbage", headers=headers).status_code == 422
    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused = client.post(url, content=objects.getvalue(), headers=headers)
    assert refused.status_code == 422
    shorter = npy(np.zeros((4, 1, 8, 8), np.float32))[:-100]  # header promises more data
    assert client.post(url, content=shorter, headers=headers).status_code == 422
    too_many = client.post(url + "?samples=5000", content=npy(np.zeros((1, 1, 8, 8))),
                           headers=headers)  # fmt: skip
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"][0] == "query"
    assert client.post(url, content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/v1/classifiers/nope/predict", json={"inputs": [IMAGE]}).status_code == 404
    generator = client.post("/v1/classifiers/toy/predict", json={"inputs": [[0.0, 0.0]]})
    assert generator.status_code == 404 and "not a classifier" in generator.text
    assert client.get("/v1/classifiers/toy-d").status_code == 404
    assert client.get("/healthz").status_code == 200
    predict(client, "digits04-sbn", inputs=[IMAGE], samples=2, seed=0)  # still serving


def test_predictions_are_counted_per_model(client):
    before = metric(client, "imh_classifier_inputs_total", model="digits-mlp-sbp")
    predict(client, "digits-mlp-sbp", inputs=[IMAGE] * 3)
    assert metric(client, "imh_classifier_inputs_total", model="digits-mlp-sbp") == before + 3
    assert metric(client, "imh_classifier_requests_total", model="digits-mlp-sbp") >= 1
    assert metric(client, "imh_classifier_duration_seconds_count", model="digits-mlp-sbp") >= 1


def fit(client, headers, name, x, **form):
    return client.post(
        f"/v1/classifiers/{name}/sbn-fit",
        headers=headers,
        data={key: str(value) for key, value in form.items()},
        files={"inputs": ("train.npy", npy(x), "application/x-npy")},
    )


def test_admin_sbn_fit_creates_an_sbn_classifier_that_predicts(client, admin, digits04):
    x_train = digits04.x_train
    assert fit(client, {}, "digits04-bn", x_train).status_code == 401
    wrong = {"Authorization": "Bearer not-the-admin-token"}
    assert fit(client, wrong, "digits04-bn", x_train).status_code == 403
    created = fit(client, admin, "digits04-bn", x_train, batch_size=32, epochs=2)
    assert created.status_code == 201, created.text
    model = created.json()
    assert model["name"] == "digits04-bn-sbn" and model["uncertainty"] == "sbn"
    assert model["sbn"]["batch_size"] == 32 and model["sbn"]["inputs"] == len(x_train)
    assert model["original"] == "digits04-bn:1" and model["source"] == "store"
    listed = {(m["name"], m["kind"]) for m in client.get("/v1/models").json()["models"]}
    assert ("digits04-bn-sbn", "classifier") in listed

    ref = f"digits04-bn-sbn:{model['version']}"
    answer = predict(client, ref, inputs=digits04.x_test[:32].tolist(), samples=8, seed=0)
    got = columns(answer)
    assert answer["uncertainty"] == "sbn" and got["mutual_information"].max() > 0
    assert (got["label"] == digits04.y_test[:32]).mean() >= 0.9
    assert predict(client, ref, inputs=digits04.x_test[:32].tolist(), samples=8, seed=0) == answer


def test_sbn_fit_refuses_nets_without_bn_and_too_few_inputs(client, admin, digits04):
    no_bn = fit(client, admin, "digits-lenet5", digits04.x_train)
    assert no_bn.status_code == 422 and "BatchNorm" in no_bn.text
    few = fit(client, admin, "digits04-bn", digits04.x_train[:100], batch_size=32)
    assert few.status_code == 422 and few.json()["detail"][0]["loc"] == ["body", "inputs"]
    already = fit(client, admin, "digits04-sbn", digits04.x_train)
    assert already.status_code == 422
    wrong_shape = fit(client, admin, "digits04-bn", digits04.x_train[:, :, :4])
    assert wrong_shape.status_code == 422
    bad_target = fit(client, admin, "digits04-bn", digits04.x_train, target="../x")
    assert bad_target.status_code == 422
    assert fit(client, admin, "nope", digits04.x_train).status_code == 404
