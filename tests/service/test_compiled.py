"""Compiled models (service.models.compiled): exact chains, same samples as eager up to
rounding, gradients, no recompiles, fallbacks, the manifest field, and the service.

The exactness tests follow tests/samplers/test_local_global.py: G(z) = 2.5 z with the
exact log p / p_G as the discriminator, so the latent chains pushed through G sample p
exactly; here G and D are nn.Modules compiled at load, and a deliberately wrong compiled
discriminator must fail the same test. Models are tiny: compiling them costs seconds.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from samplers import Noise, run_final
from samplers.methods import Models, prepare
from service.models import compiled
from service.models.compiled import CompiledModule, compile_model, requested
from service.models.loading import load_model
from service.models.manifests import parse_manifest
from tests.samplers.targets import FAIL_P, ONE_MODE, PASS_P, TWO_MODES

STEPS = 20  # the service's default steps per chain
ROWS = 20_000
CPU = torch.device("cpu")
LATENT = [("inference", (((1,), "normal"),)), ("grad", (((1,), "normal"),))]
SAMPLE = [("inference", (((1,), "uniform"),)), ("grad", (((1,), "uniform"),))]


class Slope(nn.Module):
    """G(z) = 2.5 z with the slope as a parameter, like a loaded generator's weights."""

    def __init__(self):
        super().__init__()
        self.slope = nn.Parameter(torch.tensor(2.5))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.slope * z


class ExactLogRatio(nn.Module):
    """The target's exact log p / p_G as a discriminator; `sign` -1 is a broken one."""

    def __init__(self, target, sign: float = 1.0):
        super().__init__()
        self.target, self.sign = target, sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sign * self.target.log_ratio(x)


def _compiled(module: nn.Module, wanted) -> CompiledModule:
    return CompiledModule.build(module, wanted, CPU, timed=False)


@pytest.fixture(scope="module")
def generator():
    return _compiled(Slope(), LATENT)


@pytest.fixture(scope="module")
def ratios():
    return {
        "two": _compiled(ExactLogRatio(TWO_MODES), SAMPLE),
        "one": _compiled(ExactLogRatio(ONE_MODE), SAMPLE),
    }


def _run(method, target, generator, log_ratio, rows=ROWS, params=None, seed=0):
    models = Models(generator=generator, latent_dim=1, log_ratio=log_ratio)
    noise = Noise.seeded(seed, rows)
    kernel, state = prepare(method, models, params or {}, noise, steps=STEPS)
    return run_final(kernel, state, noise, STEPS)


# Exact chains --------------------------------------------------------------------------


def test_compiled_imh_matches_the_target(generator, ratios):
    calls = generator.calls["compiled"]
    result = _run("imh", TWO_MODES, generator, ratios["two"], params={"init": "generator"})
    assert TWO_MODES.ks_pvalue(result.samples) > PASS_P
    assert generator.calls["compiled"] > calls, "the chains did not run the compiled code"


def test_a_wrong_compiled_discriminator_fails_the_same_test(generator):
    broken = _compiled(ExactLogRatio(TWO_MODES, sign=-1.0), SAMPLE)
    result = _run("imh", TWO_MODES, generator, broken, params={"init": "generator"})
    assert TWO_MODES.ks_pvalue(result.samples) < FAIL_P


def test_compiled_mala_matches_the_target(generator, ratios):
    calls = dict(generator.calls)
    result = _run("mala", ONE_MODE, generator, ratios["one"])
    assert ONE_MODE.ks_pvalue(result.samples) > PASS_P
    assert 0.4 < result.acceptance_rate < 0.9  # as eager: the gradients are right
    assert generator.calls["compiled"] > calls["compiled"]


def test_mala_with_a_tiny_fixed_step_fails_compiled_too(generator, ratios):
    result = _run("mala", ONE_MODE, generator, ratios["one"], params={"step_size": 1e-4})
    assert ONE_MODE.ks_pvalue(result.samples) < FAIL_P


# Same seed, compiled against eager ------------------------------------------------


class Wiggly(nn.Module):
    """2.5 z plus a small random MLP: enough matmuls and tanh for compiled rounding to
    differ from eager's (G(z) = 2.5 z and the exact ratio agree bit for bit)."""

    def __init__(self, target=None):
        super().__init__()
        torch.manual_seed(3 if target is None else 4)
        self.target = target
        self.net = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.target is None:  # a generator
            return 2.5 * v + 0.1 * self.net(v)
        return self.target.log_ratio(v) + 0.05 * self.net(v).squeeze(-1)


@pytest.mark.parametrize(
    "method,target,params,rtol,beyond",
    [("imh", TWO_MODES, {"init": "generator"}, 1e-5, 0), ("mala", ONE_MODE, {}, 1e-4, 0.01)],
)
def test_the_same_seed_gives_the_same_samples_up_to_rounding(method, target, params, rtol, beyond):
    """Measured: imh rows agree to 2.4e-7 (a few ulps) with no accept flip; mala rows
    drift apart by rounding along the chain (the step size adapts to each step's
    acceptance probability), 0.2% of rows beyond 1e-4 (at most 2e-2), no accept flip."""
    chains = {}
    for side, (g, d) in {
        "eager": (Wiggly(), Wiggly(target)),
        "compiled": (_compiled(Wiggly(), LATENT), _compiled(Wiggly(target), SAMPLE)),
    }.items():
        models = Models(generator=g, latent_dim=1, log_ratio=d)
        noise = Noise.seeded(7, ROWS)
        kernel, state = prepare(method, models, params, noise, steps=STEPS)
        accepted = []
        for _ in range(STEPS):
            state, info = kernel.step(state, noise)
            accepted.append(info.is_accepted)
        chains[side] = (kernel.output(state), torch.stack(accepted))
    (ours, our_moves), (theirs, their_moves) = chains["compiled"], chains["eager"]
    flips = int((our_moves != their_moves).sum())
    assert flips <= ROWS * STEPS // 10_000, f"{flips} accept decisions flipped"
    close = torch.isclose(ours, theirs, rtol=rtol, atol=rtol / 10).reshape(ROWS, -1).all(1)
    assert int((~close).sum()) <= beyond * ROWS, f"{int((~close).sum())} rows differ"


# Gradients, modes and batch sizes ---------------------------------------------------


def test_gradients_flow_through_compiled_models_in_both_modes(generator, ratios):
    d = ratios["two"]
    eager_d = ExactLogRatio(TWO_MODES)
    z = torch.randn(300, 1)
    with torch.enable_grad():
        mine = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(d(generator(mine)).sum(), mine)
        theirs = z.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(eager_d(2.5 * theirs).sum(), theirs)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        out = d(generator(z))
    torch.testing.assert_close(out, eager_d(2.5 * z), rtol=1e-5, atol=1e-5)
    assert generator.routes.keys() == {
        ("inference", (((1,), torch.float32, False),)),
        ("grad", (((1,), torch.float32, True),)),
    }


def test_new_batch_sizes_never_recompile(generator):
    compiles, calls = generator.compiles, generator.calls["compiled"]
    for rows in (16, 17, 100, 1000, 5000, 28_672):  # 28 672: i-SIR's 4096 x 7 particles
        z = torch.randn(rows, 1)
        with torch.inference_mode():
            generator(z)
        with torch.enable_grad():
            generator(z.requires_grad_(True)).sum().backward()
        with torch.compiler.set_stance("fail_on_recompile"):  # the cached graph fits
            with torch.inference_mode():
                generator._compiled(torch.randn(rows, 1))
    assert generator.compiles == compiles
    assert generator.calls["compiled"] == calls + 12
    eager_calls = generator.calls["eager"]
    with torch.inference_mode():
        generator(torch.randn(15, 1))  # under 16 rows: eager
        generator(torch.randn(64, 2))  # a shape it was not warmed for: eager, no compile
    with torch.no_grad():
        generator(torch.randn(64, 1))  # no_grad outside inference mode: not warmed
    assert generator.calls["eager"] == eager_calls + 3 and generator.compiles == compiles


def test_a_torch_export_program_compiles_with_gradients():
    from service.models.safe_files import ExportedModule

    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(Slope(), (torch.zeros(4, 1),), dynamic_shapes=({0: batch},))
    module = _compiled(ExportedModule(program.module()), LATENT)
    z = torch.randn(50, 1, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(module(z).sum(), z)
    torch.testing.assert_close(grad, torch.full_like(z, 2.5))
    assert module.calls["compiled"] == 1


# Fallbacks and the manifest field --------------------------------------------------


class BatchOfSixteen(nn.Module):
    """Branches on the batch size: eager runs any size, a dynamic batch cannot compile."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * 2 if z.shape[0] == 16 else z * 3


def _generator_manifest(**fields):
    return parse_manifest(json.dumps({
        "kind": "generator", "format": "zoo", "architecture": "a:B", "weights": "w.safetensors",
        "latent_dim": 1, "sample_shape": [1], **fields,
    }))  # fmt: skip


def test_a_module_that_cannot_compile_runs_eager_and_says_why(caplog):
    module = BatchOfSixteen()
    with caplog.at_level(logging.WARNING, logger="imh.compile"):
        outcome = compile_model(module, _generator_manifest(), "sixteen:1", CPU, True)
    assert outcome.module is module and not outcome.compiled
    assert outcome.note.startswith("eager: compiling failed: ConstraintViolationError")
    assert len([r for r in caplog.records if "sixteen:1 runs eager" in r.message]) == 1


def test_a_compiler_error_leaves_the_model_eager(monkeypatch):
    import torch._inductor.compile_fx as inductor

    def fails(graph, example_inputs, **kwargs):
        raise RuntimeError("no C++ compiler here\nmore lines")

    monkeypatch.setattr(inductor, "compile_fx", fails)
    outcome = compile_model(Slope(), _generator_manifest(compile=True), "err:1", CPU, False)
    assert not outcome.compiled and outcome.note.startswith("eager: compiling failed: ")
    assert "no C++ compiler here" in outcome.note


def test_a_compiled_output_off_eager_falls_back(monkeypatch, caplog):
    import torch._inductor.compile_fx as inductor

    def off_by_a_little(graph, example_inputs, **kwargs):
        return lambda *args: tuple(out + 0.01 for out in graph(*args))

    monkeypatch.setattr(inductor, "compile_fx", off_by_a_little)
    module = Slope()
    with caplog.at_level(logging.WARNING, logger="imh.compile"):
        outcome = compile_model(module, _generator_manifest(compile=True), "off:1", CPU, False)
    assert outcome.module is module and not outcome.compiled
    assert "differs from eager" in outcome.note and "tolerance" in outcome.note
    assert len([r for r in caplog.records if "off:1 runs eager" in r.message]) == 1


def test_the_manifest_field_overrides_the_setting():
    for field, setting, expected in [
        (None, False, None), (None, True, "auto"), (True, False, "forced"),
        (True, True, "forced"), (False, True, None), (False, False, None),
    ]:  # fmt: skip
        manifest = _generator_manifest(**({} if field is None else {"compile": field}))
        assert requested(manifest, setting) == expected, (field, setting)
    classifier = parse_manifest(json.dumps({
        "kind": "classifier", "format": "zoo", "architecture": "a:B", "weights": "w.safetensors",
        "classes": [0, 1], "input_shape": [2], "compile": True,
    }))  # fmt: skip
    assert requested(classifier, True) is None  # classifiers stay eager


def test_a_discriminator_before_its_generator_runs_eager_and_says_why():
    manifest = parse_manifest(json.dumps({
        "kind": "discriminator", "format": "zoo", "architecture": "a:B",
        "weights": "w.safetensors", "generator": "never-loaded", "compile": True,
    }))  # fmt: skip
    outcome = compile_model(Slope(), manifest, "lonely-d:1", CPU, False)
    assert not outcome.compiled and "'never-loaded' was not loaded before it" in outcome.note


# Through the service -----------------------------------------------------------------


def _store(root: Path) -> Path:
    from architectures import save_weights
    from discriminators.architectures import MLPDiscriminator
    from zoo.toy25 import Generator

    def write(name, module, architecture, config, **manifest):
        folder = root / name / "1"
        folder.mkdir(parents=True)
        torch.manual_seed(0)
        save_weights(module(**config), folder / "weights.safetensors")
        (folder / "manifest.json").write_text(json.dumps({
            "format": "zoo", "architecture": architecture, "config": config,
            "weights": "weights.safetensors", **manifest,
        }))  # fmt: skip

    small = {"latent_dim": 2, "width": 8, "depth": 1}
    write("cg", Generator, "zoo.toy25:Generator", small, kind="generator", latent_dim=2,
          sample_shape=[2], discriminator="cg-d", compile=True)  # fmt: skip
    mlp = {"input_dim": 2, "width": 8, "depth": 1}
    write("cg-d", MLPDiscriminator, "discriminators.architectures:MLPDiscriminator", mlp,
          kind="discriminator", generator="cg")  # fmt: skip
    write("cg-eager", Generator, "zoo.toy25:Generator", small, kind="generator", latent_dim=2,
          sample_shape=[2], discriminator="cg-d", compile=False)  # fmt: skip
    return root


def test_a_compiled_model_answers_through_the_service(tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(zoo=False, model_store=_store(tmp_path), compile=True))
    with TestClient(app, base_url="http://127.0.0.1") as local:
        deadline = time.monotonic() + 240
        while local.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, local.get("/readyz").text
            time.sleep(0.1)
        shown = local.get("/v1/models/cg").json()["versions"][0]
        assert shown["compiled"] is True and shown["compile_note"] is None
        assert shown["manifest"]["compile"] is True
        eager = local.get("/v1/models/cg-eager").json()["versions"][0]
        assert eager["compiled"] is False and eager["compile_note"] is None
        d = local.get("/v1/models/cg-d").json()["versions"][0]  # IMH_COMPILE: timed
        assert d["compiled"] or d["compile_note"].startswith("eager: compiled was not faster")
        module = app.state.imh.runtime.registry.get("cg").module
        before = module.calls["compiled"]
        for method in ("imh", "mala"):
            body = {"generator": "cg", "method": method, "n": 300, "steps": 4, "seed": 1}
            answer = local.post("/v1/sample", json=body)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["samples"]) == 300
        assert module.calls["compiled"] > before


def test_the_sample_shape_of_a_generator_reaches_its_partners(tmp_path):
    store = _store(tmp_path)
    load_model(store / "cg" / "1", "cg", "1", "store", CPU)  # compile off: shapes noted
    assert compiled.signatures(parse_manifest((store / "cg-d/1/manifest.json").read_text()),
                               "cg-d") == SAMPLE_2  # fmt: skip


SAMPLE_2 = [("inference", (((2,), "uniform"),)), ("grad", (((2,), "uniform"),))]
