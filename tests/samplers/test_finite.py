import math

import numpy as np
import pytest
import torch
from scipy import stats

from samplers import drs, finite
from samplers.finite import drs_filter, mh_filter

# Candidates from q = N(0, 1.5^2) scored for p = N(0.5, 1) with the exact log ratio; q is
# wider than p, so p / q is bounded (M = 1.66) and both filters can be exact.
P = stats.norm(0.5, 1.0)
Q = stats.norm(0.0, 1.5)
PASS_P = 0.01  # a correct filter passes at this level; a broken one fails far below it
FAIL_P = 1e-6
INF, NAN = math.inf, math.nan


def _candidates(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = Q.rvs(size=n, random_state=np.random.default_rng(seed))
    return x, P.logpdf(x) - Q.logpdf(x)


def _ks_pvalue(samples: np.ndarray) -> float:
    return float(stats.kstest(samples, P.cdf).pvalue)


def _mh_final_samples(chain_length: int = 100, chains: int = 20_000) -> np.ndarray:
    x, log_ratio = _candidates(chain_length * chains)
    result = mh_filter(log_ratio, chain_length, seed=1)
    assert len(result.final) == chains
    return x[result.final]


def test_mh_chains_end_distributed_as_target_with_exact_ratio():
    assert _ks_pvalue(_mh_final_samples()) > PASS_P


def _ignores_current(log_u, proposed, current):
    return log_u < proposed  # exp(l_j) instead of exp(l_j - l_state)


def _always(log_u, proposed, current):
    return log_u <= 0.0


def _flipped(log_u, proposed, current):
    return log_u < current - proposed


@pytest.mark.parametrize("broken", [_ignores_current, _always, _flipped])
def test_broken_mh_rule_fails_the_same_test(monkeypatch, broken):
    monkeypatch.setattr(finite, "_moves", broken)
    assert _ks_pvalue(_mh_final_samples()) < FAIL_P


def test_drs_with_zero_gamma_accepts_target_samples():
    x, log_ratio = _candidates(50_000)
    result = drs_filter(log_ratio, seed=1)
    assert len(result.final) > 25_000
    assert _ks_pvalue(x[result.final]) > PASS_P


def test_drs_acceptance_matches_ratio_over_set_maximum():
    _, log_ratio = _candidates(50_000)
    expected = np.exp(log_ratio - log_ratio.max()).mean()  # exact rejection sampling
    standard_error = math.sqrt(expected * (1 - expected) / len(log_ratio))
    assert drs_filter(log_ratio, seed=1).acceptance_rate == pytest.approx(
        expected, abs=4 * standard_error
    )


def test_drs_without_log1mexp_correction_fails_the_same_test(monkeypatch):
    # sigmoid(l - l_max) in place of exp(l - l_max)
    monkeypatch.setattr(drs, "log1mexp", lambda a: torch.zeros_like(a))
    x, log_ratio = _candidates(50_000)
    assert _ks_pvalue(x[drs_filter(log_ratio, seed=1).final]) < FAIL_P


@pytest.mark.parametrize("gamma", [2.0, -1.0])
def test_drs_with_shifted_gamma_fails_the_same_test(gamma):
    x, log_ratio = _candidates(50_000)
    assert _ks_pvalue(x[drs_filter(log_ratio, seed=1, gamma=gamma).final]) < FAIL_P


def test_drs_gamma_percentile_uses_the_sets_own_scores():
    x, log_ratio = _candidates(20_000)
    gamma = drs.gamma_for_percentile(torch.from_numpy(log_ratio), 10.0)
    assert gamma < 0  # a low percentile lowers the bar here
    by_percentile = drs_filter(log_ratio, seed=2, gamma_percentile=10.0)
    np.testing.assert_array_equal(
        by_percentile.accepted, drs_filter(log_ratio, seed=2, gamma=gamma).accepted
    )
    assert by_percentile.acceptance_rate > 1.3 * drs_filter(log_ratio, seed=2).acceptance_rate


@pytest.mark.parametrize(
    ("n", "chain_length"),
    [(1003, 10), (103, 10), (50, 50), (50, 1000), (7, 1), (1, 5)],
    ids=["many-chains", "few-chains", "exact-one", "longer-than-set", "length-one", "single"],
)
def test_mh_chains_stay_inside_their_blocks(n, chain_length):
    _, log_ratio = _candidates(n, seed=3)
    result = mh_filter(log_ratio, chain_length, seed=4)
    length = min(chain_length, n)
    chains = math.ceil(n / length)
    position = np.arange(n)
    assert result.accepted.shape == (n,) and result.accepted.dtype == np.bool_
    assert result.state.shape == (n,) and result.state.dtype == np.int64
    assert result.final.shape == (chains,) and result.final.dtype == np.int64
    starts = position % length == 0  # every logit is finite: each block starts at its first
    assert not result.accepted[starts].any()  # a start is not a move
    assert (result.state // length == position // length).all()
    assert (result.state <= position).all()
    assert (result.accepted | starts)[result.state].all()
    np.testing.assert_array_equal(result.state[result.accepted], position[result.accepted])
    last = np.minimum(np.arange(1, chains + 1) * length, n) - 1
    np.testing.assert_array_equal(result.final, result.state[last])
    np.testing.assert_array_equal(result.moved, result.final != position[starts])
    if n > chains:
        assert result.acceptance_rate == result.accepted.sum() / (n - chains)
        assert 0.0 < result.acceptance_rate < 1.0
    else:
        assert math.isnan(result.acceptance_rate)


def test_mh_one_chain_when_chain_length_covers_the_set():
    _, log_ratio = _candidates(500, seed=3)
    whole = mh_filter(log_ratio, 500, seed=4)
    np.testing.assert_array_equal(whole.accepted, mh_filter(log_ratio, 10**9, seed=4).accepted)
    assert whole.accepted.sum() > 100  # the chain keeps moving after its first candidate


def _with_nonfinite(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    log_ratio = rng.normal(size=n)
    log_ratio[rng.random(n) < 0.05] = NAN
    log_ratio[rng.random(n) < 0.05] = -INF
    log_ratio[rng.random(n) < 0.01] = INF
    return log_ratio


@pytest.mark.parametrize("chain_length", [7, 500])
def test_mh_column_and_candidate_loops_agree(monkeypatch, chain_length):
    log_ratio = _with_nonfinite(3000, seed=5)
    monkeypatch.setattr(finite, "FEW_CHAINS", 0)
    by_columns = mh_filter(log_ratio, chain_length, seed=6)
    monkeypatch.setattr(finite, "FEW_CHAINS", 10**9)
    by_candidates = mh_filter(log_ratio, chain_length, seed=6)
    for field in ("accepted", "state", "final", "moved"):
        np.testing.assert_array_equal(getattr(by_columns, field), getattr(by_candidates, field))
    assert by_columns.acceptance_rate == by_candidates.acceptance_rate
    assert by_columns.accepted.sum() > 2 * len(by_columns.final)  # the chains really moved


@pytest.mark.parametrize("few_chains", [0, 10**9], ids=["columns", "candidates"])
def test_mh_nonfinite_logits(monkeypatch, few_chains):
    monkeypatch.setattr(finite, "FEW_CHAINS", few_chains)
    log_ratio = np.array([NAN, -INF, 0.0, 0.0, INF, 3.0, INF, INF, NAN, -INF, NAN, -INF])
    result = mh_filter(log_ratio, 3, seed=0)
    # NaN and -inf skipped until the first finite logit starts the chain; +inf taken and
    # kept; a +inf start kept; a block of NaN and -inf has no chain at all.
    assert result.accepted.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert result.state.tolist() == [-1, -1, 2, 3, 4, 4, 6, 6, 6, -1, -1, -1]
    assert result.final.tolist() == [2, 4, 6, -1]
    assert result.moved.tolist() == [False, True, False, False]
    assert result.acceptance_rate == 1 / 4  # proposals: 0 + 2 + 2 + 0


def test_mh_never_accepts_nor_starts_at_nan_or_minus_inf():
    log_ratio = _with_nonfinite(3000, seed=7)
    bad = np.isnan(log_ratio) | np.isneginf(log_ratio)
    result = mh_filter(log_ratio, 10, seed=0)
    assert not (result.accepted & bad).any()
    assert not bad[result.state[result.state >= 0]].any()  # no chain ever sits on one
    assert result.accepted.sum() > 500


def test_mh_lists_only_moves_never_a_start_nor_nan():
    result = mh_filter(np.array([NAN, 1.0, 0.5, 0.2]), 4, seed=0)
    accepted = np.flatnonzero(result.accepted).tolist()
    assert 0 not in accepted and 1 not in accepted  # NaN, and the chain's start
    assert result.state[0] == -1 and result.state[1] == 1


@pytest.mark.parametrize("few_chains", [0, 10**9], ids=["columns", "candidates"])
def test_mh_acceptance_rate_is_moves_over_proposals(monkeypatch, few_chains):
    monkeypatch.setattr(finite, "FEW_CHAINS", few_chains)
    log_ratio = _with_nonfinite(1000, seed=11)
    log_ratio[np.isposinf(log_ratio)] = 0.0
    result = mh_filter(log_ratio, 25, seed=1)
    position = np.arange(1000)
    started = result.state >= 0
    is_start = started & (result.state == position) & ~result.accepted
    proposals = int((started & ~is_start).sum())
    assert result.acceptance_rate == result.accepted.sum() / proposals


def test_mh_chain_that_never_moves_is_flagged():
    result = mh_filter(np.array([5.0, -3.0, -4.0, 0.0, 1.0, 2.0]), 3, seed=0)
    assert result.final[0] == 0 and not result.moved[0]  # stays at its (unfiltered) start
    assert not result.accepted[:3].any()


def test_drs_never_accepts_nan_or_minus_inf_and_refuses_plus_inf():
    log_ratio = _with_nonfinite(3000, seed=8)
    log_ratio[np.isposinf(log_ratio)] = 0.0
    result = drs_filter(log_ratio, seed=0, gamma=-6.0)  # accepts most finite candidates
    assert not result.accepted[~np.isfinite(log_ratio)].any()
    assert result.accepted[np.isfinite(log_ratio)].mean() > 0.5
    assert not drs_filter(np.array([NAN, -INF]), seed=0).accepted.any()
    with pytest.raises(ValueError, match="finite maximum"):
        drs_filter(np.array([0.0, INF]), seed=0)


def test_drs_outputs_index_the_accepted_candidates():
    _, log_ratio = _candidates(1000, seed=9)
    result = drs_filter(log_ratio, seed=0)
    position = np.arange(1000)
    assert result.accepted.dtype == np.bool_ and result.state.dtype == np.int64
    np.testing.assert_array_equal(result.state, np.where(result.accepted, position, -1))
    np.testing.assert_array_equal(result.final, position[result.accepted])
    assert result.final.dtype == np.int64 and result.moved.all()
    assert result.acceptance_rate == result.accepted.mean()


@pytest.mark.parametrize("run", [lambda l, s: mh_filter(l, 10, s), drs_filter], ids=["mh", "drs"])
def test_same_seed_same_result_different_seed_differs(run):
    _, log_ratio = _candidates(2000, seed=10)
    first = run(log_ratio, 11)
    np.testing.assert_array_equal(first.accepted, run(log_ratio, 11).accepted)
    np.testing.assert_array_equal(first.accepted, run(torch.from_numpy(log_ratio), 11).accepted)
    assert (first.accepted != run(log_ratio, 12).accepted).any()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mh_filter(np.zeros((2, 3)), 2, 0), "1-D"),
        (lambda: mh_filter(np.zeros(0), 2, 0), "non-empty"),
        (lambda: drs_filter(torch.zeros(0), 0), "non-empty"),
        (lambda: mh_filter(np.zeros(4), 0, 0), "chain_length"),
        (lambda: mh_filter(np.zeros(4), 2.5, 0), "chain_length"),
        (lambda: mh_filter(np.zeros(4), True, 0), "chain_length"),
        (lambda: mh_filter(np.zeros(4), 2, "0"), "seed"),
        (lambda: drs_filter(np.zeros(4), 0, gamma=1.0, gamma_percentile=50.0), "at most one"),
        (lambda: drs_filter(np.zeros(4), 0, gamma_percentile=101.0), "gamma_percentile"),
        (lambda: drs_filter(np.zeros(4), 0, gamma=NAN), "gamma"),
        (lambda: drs_filter(np.zeros(4), 0, eps=-1.0), "eps"),
    ],
)
def test_invalid_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
