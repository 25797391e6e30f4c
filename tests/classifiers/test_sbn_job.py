"""sbn-fit on an uploaded program: SBN statistics, the report and the stored model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from architectures import build
from classifiers import sbn
from classifiers.job_common import JobCancelled
from classifiers.sbn_job import SbnFitSettings, run_sbn_fit
from classifiers.upload_data import Dataset
from tests.classifiers.conftest import DIGITS_SPEC

SETTINGS = SbnFitSettings(batch_size=32, epochs=2, seed=5, samples=16)


def out_of_domain(n: int = 200) -> Dataset:
    """Uniform noise images: nothing like a digit."""
    return Dataset(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(9)), None)


@pytest.fixture(scope="module")
def fitted(user_classifier):
    progress = []
    result = run_sbn_fit(
        user_classifier.program,
        DIGITS_SPEC,
        user_classifier.train,
        user_classifier.held_out,
        out_of_domain(),
        SETTINGS,
        progress=lambda fraction, info: progress.append((fraction, info)),
    )
    return result, progress


def test_sbn_keeps_accuracy_and_nll_and_reports_ood_auroc(fitted):
    result, progress = fitted
    plain, stochastic = result.report["plain"], result.report["sbn"]
    # Within a few of the 450 held-out digits: the trained weights differ in the last
    # bits between CPUs' kernels, which moves a handful of borderline predictions.
    assert stochastic["accuracy"] >= plain["accuracy"] - 0.015
    assert stochastic["nll"] <= plain["nll"] + 0.02
    for value in (plain["ood_auroc_entropy"], stochastic["ood_auroc_entropy"],
                  stochastic["ood_auroc_mutual_information"]):  # fmt: skip
        assert 0.0 <= value <= 1.0
    fractions = [fraction for fraction, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_sbn_fit_agrees_with_classifiers_sbn_on_the_users_own_network(fitted, user_classifier):
    """The same batches (seeded as the synchronous sbn-fit draws them) through the user's
    own class, converted in-process, give the same statistics and predictions."""
    result, _ = fitted
    model = sbn.convert(copy.deepcopy(user_classifier.module))
    x = user_classifier.train.x
    generator = torch.Generator().manual_seed(SETTINGS.seed)

    def batches():
        for _ in range(SETTINGS.epochs):
            order = torch.randperm(len(x), generator=generator)
            for first in range(0, len(x) - 31, 32):
                yield x[order[first : first + 32]]

    sbn.fit_statistics(model, batches(), momentum=SETTINGS.momentum)
    for ours, theirs in zip(sbn.sbn_layers(result.model), sbn.sbn_layers(model), strict=True):
        assert torch.allclose(ours.batch_log_var_avg, theirs.batch_log_var_avg, atol=1e-4)
        assert torch.allclose(ours.batch_mean_avg, theirs.batch_mean_avg, atol=1e-4)
    held_out = user_classifier.held_out.x[:64]
    ours = sbn.predict(result.model, held_out, 16, torch.Generator().manual_seed(1))
    theirs = sbn.predict(model, held_out, 16, torch.Generator().manual_seed(1))
    assert (ours.probs - theirs.probs).abs().max() < 1e-4
    assert (ours.mutual_information - theirs.mutual_information).abs().max() < 1e-4


def test_the_result_loads_as_the_registry_loads_sbn_zoo_models(fitted, tmp_path):
    result, _ = fitted
    paths = result.write(tmp_path)
    manifest = json.loads(paths["manifest.json"].read_text())
    assert manifest["format"] == "zoo" and manifest["transform"] == "sbn"
    assert manifest["architecture"] == "classifiers.lifted:LiftedNet"
    assert manifest["sbn_fit"]["batch_size"] == 32 and manifest["uncertainty"] == "sbn"
    model = sbn.convert(build(manifest["architecture"], manifest["config"]))
    model.load_state_dict(load_file(str(paths["weights.safetensors"])), strict=True)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    loaded = sbn.predict(model.eval(), x, 8, torch.Generator().manual_seed(3))
    original = sbn.predict(result.model, x, 8, torch.Generator().manual_seed(3))
    assert torch.equal(loaded.probs, original.probs)
    assert (loaded.mutual_information > 0).all()


def test_sbn_fit_stops_when_asked(user_classifier):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(JobCancelled):
        run_sbn_fit(user_classifier.program, DIGITS_SPEC, user_classifier.train,
                    settings=SETTINGS, should_stop=should_stop)  # fmt: skip
