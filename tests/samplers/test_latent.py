"""pCN and MALA in latent space: G(z) = 3 z, so p_G = N(0, 9) and x = G(z) ~ p exactly."""

import torch

from samplers import Noise, mala, pcn, run_final
from tests.samplers import targets

ROWS = 4000


def _pcn(beta=0.6, steps=120, seed=0):
    noise = Noise.seeded(seed, ROWS)
    state = pcn.init(targets.generator, targets.log_ratio, noise, 1, beta)
    return run_final(pcn.build(targets.generator, targets.log_ratio), state, noise, steps)


def _mala(step_size=0.05, steps=150, seed=0):
    noise = Noise.seeded(seed, ROWS)
    state = mala.init(targets.generator, targets.log_ratio, noise, 1, step_size)
    return run_final(mala.build(targets.generator, targets.log_ratio), state, noise, steps)


def test_pcn_matches_target_with_exact_ratio():
    result = _pcn()
    assert targets.ks_pvalue(result.samples) > targets.PASS_P
    assert 0.2 < result.acceptance_rate < 0.9


def test_pcn_with_flipped_ratio_fails(monkeypatch):
    real_accept = pcn.accept
    monkeypatch.setattr(pcn, "accept", lambda log_ratio, noise: real_accept(-log_ratio, noise))
    assert targets.ks_pvalue(_pcn().samples) < targets.FAIL_P


def test_mala_matches_target_with_exact_ratio():
    result = _mala()
    assert targets.ks_pvalue(result.samples) > targets.PASS_P
    assert result.acceptance_rate > 0.5


def test_mala_without_proposal_correction_fails(monkeypatch):
    monkeypatch.setattr(mala, "_log_q", lambda to, frm, grad, eps: torch.zeros(len(to)))
    result = _mala(step_size=0.3)
    assert targets.ks_pvalue(result.samples) < targets.FAIL_P


def test_mala_gradients_flow_through_a_torch_export_program():
    module = torch.nn.Linear(1, 1)
    with torch.no_grad():
        module.weight.fill_(3.0)
        module.bias.zero_()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module, (torch.zeros(4, 1),), dynamic_shapes=({0: batch},))
    generator = program.module()
    noise = Noise.seeded(0, 64)
    state = mala.init(generator, targets.log_ratio, noise, 1, 0.05)
    state, info = mala.build(generator, targets.log_ratio).step(state, noise)
    assert torch.isfinite(state.grad).all() and state.grad.abs().sum() > 0
