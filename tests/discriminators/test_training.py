"""Post-hoc discriminator training recovers known log density ratios on 1-D toys.

p = N(1, 0.8^2) (real), p_G = N(0, 1) (frozen "generator"): log p/p_G is a known
quadratic, so the learned logit can be compared with it on generator samples.
"""

import math

import pytest
import torch

from discriminators.architectures import MLPDiscriminator, PairDiscriminator
from discriminators.calibration import fit_and_report
from discriminators.training import train_discriminator, train_pair_discriminator

REAL_MEAN, REAL_STD = 1.0, 0.8


def real_log_density(x: torch.Tensor) -> torch.Tensor:
    return -((x[:, 0] - REAL_MEAN) ** 2) / (2 * REAL_STD**2) - math.log(REAL_STD)


def generator_log_density(x: torch.Tensor) -> torch.Tensor:
    return -(x[:, 0] ** 2) / 2


def sample_generator(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 1, generator=gen, device=gen.device)


def sample_real(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return REAL_MEAN + REAL_STD * torch.randn(n, 1, generator=gen)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def logits_on(module: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    device = next(module.parameters()).device
    with torch.no_grad():
        return module(*(x.to(device) for x in inputs)).cpu()


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.nn.Module]:
    """One discriminator per loss, trained once for the tests of this module."""
    discriminators = {}
    for loss in ("bce", "implicit_mh"):
        torch.manual_seed(0)
        discriminators[loss] = MLPDiscriminator(input_dim=1, width=64, depth=2)
        train_discriminator(
            discriminators[loss],
            sample_generator,
            sample_real(20_000, seed=1),
            loss=loss,
            steps=600,
            lr=3e-3,
        )
    return discriminators


def generator_samples_and_true_log_ratio() -> tuple[torch.Tensor, torch.Tensor]:
    y = sample_generator(5_000, torch.Generator().manual_seed(2))
    return y, real_log_density(y) - generator_log_density(y)


def test_bce_logit_recovers_the_log_density_ratio_including_its_constant(trained):
    y, true_log_ratio = generator_samples_and_true_log_ratio()
    logit = logits_on(trained["bce"], y)
    assert correlation(logit, true_log_ratio) > 0.95
    # The BCE optimum is log p/p_G itself, not up to a constant.
    assert abs((logit - true_log_ratio).mean().item()) < 0.3


def test_implicit_mh_logit_recovers_the_log_density_ratio_up_to_a_constant(trained):
    y, true_log_ratio = generator_samples_and_true_log_ratio()
    logit = logits_on(trained["implicit_mh"], y)
    assert correlation(logit, true_log_ratio) > 0.95
    residual = logit - true_log_ratio
    assert residual.std().item() < 0.3, "the residual should be (nearly) a constant"


def test_calibrating_an_implicit_mh_discriminator_fixes_its_constant(trained):
    # The implicit-MH loss cannot tell l from l + 2: both are optimal. Calibration must
    # bring either back to log p/p_G.
    def shifted_logits(x: torch.Tensor) -> torch.Tensor:
        return logits_on(trained["implicit_mh"], x) + 2.0

    held_out_real = shifted_logits(sample_real(4_000, seed=3))
    fresh_fake = shifted_logits(sample_generator(4_000, torch.Generator().manual_seed(4)))
    calibrators, report = fit_and_report(held_out_real, fresh_fake)
    assert report["logistic"]["ece"] < 0.03 < report["none"]["ece"]
    y, true_log_ratio = generator_samples_and_true_log_ratio()
    assert (shifted_logits(y) - true_log_ratio).mean().item() > 1.5
    calibrated = calibrators["logistic"](shifted_logits(y))
    assert abs((calibrated - true_log_ratio).mean().item()) < 0.2


def test_pair_discriminator_learns_the_log_mh_ratio_of_a_symmetric_proposal():
    # For symmetric q the optimum of the Markov bound is log d(y,x) - log d(x,y) = log p(y)/p(x).
    step_size = 0.5

    def propose(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x + step_size * torch.randn(x.shape, generator=gen, device=gen.device)

    torch.manual_seed(0)
    pair = PairDiscriminator(input_dim=1, width=64, depth=2, b=1e-3)
    train_pair_discriminator(pair, propose, sample_real(20_000, seed=1), steps=600, lr=3e-3)
    x = sample_real(5_000, seed=2)
    y = propose(x, torch.Generator().manual_seed(3))
    learned = logits_on(pair, y, x) - logits_on(pair, x, y)
    assert correlation(learned, real_log_density(y) - real_log_density(x)) > 0.9


def small_run(seed: int, loss: str = "implicit_mh") -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    discriminator = MLPDiscriminator(input_dim=1, width=8, depth=1)
    history = train_discriminator(
        discriminator,
        sample_generator,
        sample_real(100, seed=1),
        loss=loss,
        steps=5,
        batch_size=16,
        seed=seed,
    )
    return history, torch.cat([p.detach().cpu().flatten() for p in discriminator.parameters()])


def test_training_is_deterministic_given_the_seed():
    history, weights = small_run(seed=7)
    history_again, weights_again = small_run(seed=7)
    other_history, _ = small_run(seed=8)
    assert history == history_again and torch.equal(weights, weights_again)
    assert history != other_history
    assert len(history) == 5 and all(math.isfinite(v) for v in history)


def test_generator_is_frozen_and_sampled_without_gradients():
    generator = torch.nn.Linear(1, 1)
    grad_enabled_during_sampling = []

    def sample_fake(n: int, gen: torch.Generator) -> torch.Tensor:
        grad_enabled_during_sampling.append(torch.is_grad_enabled())
        return generator.to(gen.device)(torch.randn(n, 1, generator=gen, device=gen.device))

    before = [p.detach().clone() for p in generator.parameters()]
    discriminator = MLPDiscriminator(input_dim=1, width=8, depth=1).eval()
    train_discriminator(discriminator, sample_fake, sample_real(100, seed=1), steps=3, batch_size=8)
    assert grad_enabled_during_sampling == [False] * 3
    assert all(p.grad is None for p in generator.parameters())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(before, generator.parameters(), strict=True))
    assert not discriminator.training, "the module's train/eval mode is restored"


def test_unknown_loss_is_refused():
    with pytest.raises(AssertionError, match="loss must be one of"):
        train_discriminator(
            MLPDiscriminator(1, 4, 1), sample_generator, sample_real(10, 0), loss="wgan", steps=1
        )
