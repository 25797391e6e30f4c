"""sbp-prune on an uploaded program: pruning goals, the exported program, resuming."""

from __future__ import annotations

import json

import pytest
import torch

from classifiers import sbp
from classifiers.compress import BlockNet
from classifiers.job_common import JobCancelled
from classifiers.sbp_job import PROGRAM_FILE, PruneSettings, run_sbp_prune
from classifiers.sbp_resumable import Checkpoint, train_resumable
from classifiers.upload_data import Dataset
from tests.classifiers.conftest import DIGITS_SPEC, export, lenet5_bn, train

# A short run: noise parameters learn 100x faster than the weights (the zoo recipe's
# 60 epochs at 10x reach the same pruning; benchmarks/byo_classifier.py runs both).
FAST = PruneSettings(epochs=10, batch_size=32, sbp_lr_factor=100.0, kl_weight=1.0, seed=0)


@pytest.fixture(scope="module")
def pruned(user_classifier):
    progress = []
    result = run_sbp_prune(
        user_classifier.program,
        DIGITS_SPEC,
        user_classifier.train,
        user_classifier.held_out,
        FAST,
        progress=lambda fraction, info: progress.append((fraction, info)),
        measure_speed=False,
    )
    return result, progress


def test_pruning_keeps_the_error_and_cuts_flops_five_times(pruned):
    result, progress = pruned
    metrics = result.report["metrics"]
    assert metrics["error_increase"] <= 0.01
    assert metrics["flops_reduction"] >= 5.0
    assert metrics["units_before"] == [20, 50, 800, 500]
    assert all(a <= b for a, b in zip(metrics["units_after"], metrics["units_before"],
                                      strict=True))  # fmt: skip
    assert result.report["sbp"]["max_abs_diff_vs_sbp_network"] < 1e-4
    fractions = [fraction for fraction, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(info.get("phase") == "sbp" for _, info in progress)


def test_the_exported_program_loads_and_matches_the_compressed_network(pruned, tmp_path):
    result, _ = pruned
    paths = result.write(tmp_path)
    manifest = json.loads(paths["manifest.json"].read_text())
    assert manifest["format"] == "torch.export" and manifest["file"] == PROGRAM_FILE
    assert manifest["input_shape"] == [1, 8, 8] and manifest["classes"] == list(range(10))
    assert manifest["sbp"]["flops_after"] < manifest["sbp"]["flops_before"]
    assert all(op.startswith("torch.ops.aten.") for op in manifest["sbp"]["program_ops"])
    module = torch.export.load(str(paths[PROGRAM_FILE])).module()
    assert isinstance(result.compressed, BlockNet)
    for batch in (1, 7, 300):  # the batch dimension is dynamic
        x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert (module(x) - result.compressed(x)).abs().max() < 1e-5


def small_job() -> tuple[torch.export.ExportedProgram, Dataset, Dataset]:
    """A narrow network on part of the digits: a few dozen steps."""
    from zoo.data import load_digits_split

    split = load_digits_split()
    data = Dataset(torch.from_numpy(split.x_train[:320].copy()),
                   torch.from_numpy(split.y_train[:320].copy()))  # fmt: skip
    held_out = Dataset(torch.from_numpy(split.x_test[:100].copy()),
                       torch.from_numpy(split.y_test[:100].copy()))  # fmt: skip
    return export(train(lambda: lenet5_bn(4, 8, 16), data, epochs=2)), data, held_out


def test_a_run_resumed_from_its_last_checkpoint_ends_as_an_uninterrupted_run(tmp_path):
    program, data, held_out = small_job()
    settings = PruneSettings(epochs=3, batch_size=32, sbp_lr_factor=100.0, checkpoint_every=7)

    def job(**kwargs):
        return run_sbp_prune(program, DIGITS_SPEC, data, held_out, settings,
                             measure_speed=False, **kwargs)  # fmt: skip

    uninterrupted = job()
    steps = []

    def killed_after_step_17() -> bool:  # as if the worker died: only disk survives
        steps.append(1)
        return len(steps) > 17

    with pytest.raises(JobCancelled):
        job(on_checkpoint=lambda c: c.save(tmp_path), should_stop=killed_after_step_17)
    checkpoint = Checkpoint.load(tmp_path)
    assert checkpoint.step == 14  # the last multiple of checkpoint_every
    resumed = job(resume=checkpoint)
    for key, value in uninterrupted.compressed.state_dict().items():
        assert torch.equal(resumed.compressed.state_dict()[key], value), key
    assert resumed.report["metrics"] == uninterrupted.report["metrics"]
    assert resumed.report["sbp"]["history"] == uninterrupted.report["sbp"]["history"]


def test_resumable_training_is_classifiers_sbp_training_and_keeps_to_its_generators():
    program, data, _ = small_job()
    from classifiers.block_rewrite import to_block_net
    from classifiers.lift import lift

    blocks = to_block_net(lift(program, [1, 8, 8]))
    expected = sbp.train_sbp(blocks, data.x, data.y, epochs=2, batch_size=32, seed=3)
    noisy = sbp.add_sbp(blocks)

    def others_draw_too(fraction, info):  # another thread using torch's global generator
        torch.rand(100)

    settings = PruneSettings(epochs=2, batch_size=32, seed=3)
    train_resumable(noisy, data.x, data.y, settings, progress=others_draw_too)
    for key, value in expected.state_dict().items():
        assert torch.equal(noisy.state_dict()[key], value), key


def test_a_checkpoint_of_another_job_is_refused(tmp_path):
    program, data, held_out = small_job()
    settings = PruneSettings(epochs=1, batch_size=32, checkpoint_every=3)
    with pytest.raises(JobCancelled) as stopped:
        run_sbp_prune(program, DIGITS_SPEC, data, held_out, settings,
                      should_stop=lambda: True, measure_speed=False)  # fmt: skip
    checkpoint = stopped.value.checkpoint
    assert checkpoint.step == 0
    other = PruneSettings(epochs=1, batch_size=32, checkpoint_every=3, seed=1)
    with pytest.raises(ValueError, match="another job"):
        run_sbp_prune(program, DIGITS_SPEC, data, held_out, other, resume=checkpoint,
                      measure_speed=False)  # fmt: skip
    assert {"rng.noise", "rng.shuffle", "order"} <= set(checkpoint.tensors)
    copied = Checkpoint.from_bytes(checkpoint.to_bytes())  # one safetensors file
    assert copied.meta == json.loads(json.dumps(checkpoint.meta))
    assert all(torch.equal(copied.tensors[k], v) for k, v in checkpoint.tensors.items())
