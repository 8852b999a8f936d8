"""Sampler: greedy, top-k, top-p, temperature, seeds, and the sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch

from moeyard.attention.sampler import sample
from moeyard.attention.sequence import SamplingParams, Sequence


def _seqs(n: int, **params) -> list[Sequence]:
    seed = params.pop("seed", None)
    return [Sequence(f"s{i}", [1], SamplingParams(seed=None if seed is None else seed + i, **params))
            for i in range(n)]


def _logits(b: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = _logits(6, 50)
    assert sample(logits, _seqs(6)) == logits.argmax(-1).tolist()


def test_greedy_ties_and_nans_pick_as_argmax_does():
    """The first of tied maxima, the first NaN, at the engine's sizes too."""
    logits = _logits(64, 32000, seed=5)
    logits[:, 700] = logits.max() + 1
    logits[:, 90] = logits[:, 700]            # a tie: the earlier index
    logits[3, 5] = logits[3, 9] = float("nan")
    got = sample(logits, _seqs(64))
    assert got == logits.argmax(-1).tolist() and got[0] == 90 and got[3] == 5


def test_top_k_one_is_greedy():
    logits = _logits(8, 40, seed=1)
    for seed in range(5):
        got = sample(logits, _seqs(8, temperature=1.0, top_k=1, seed=100 * seed))
        assert got == logits.argmax(-1).tolist()


def test_tiny_top_p_is_greedy():
    logits = _logits(8, 40, seed=2)
    for seed in range(5):
        got = sample(logits, _seqs(8, temperature=1.5, top_p=1e-6, seed=10 * seed))
        assert got == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [dict(temperature=1e-300), dict(temperature=5e-324),
                                    dict(temperature=1.0, top_p=1e-300), dict(temperature=1e-300, top_p=1e-300)])
def test_values_that_round_to_zero_in_fp32_mean_their_limit(params):
    # temperature -> 0 is greedy; top_p -> 0 keeps the top token; neither may turn a row into NaN
    logits = _logits(4, 30, seed=3)
    assert sample(logits, _seqs(4, seed=1, **params)) == logits.argmax(-1).tolist()


def test_non_finite_logits_fall_back_to_argmax_for_that_row_only():
    logits = _logits(3, 20, seed=4)
    logits[1, 5] = float("nan")
    got = sample(logits, _seqs(3, temperature=1.0, top_k=1, seed=2))
    assert got[0] == logits[0].argmax().item() and got[2] == logits[2].argmax().item()


def test_greedy_rows_unaffected_by_sampled_rows():
    logits = _logits(4, 30, seed=3)
    seqs = _seqs(4)
    seqs[1] = Sequence("r", [1], SamplingParams(temperature=1.0, seed=0))
    seqs[3] = Sequence("r2", [1], SamplingParams(temperature=2.0, seed=1))
    got = sample(logits, seqs)
    want = logits.argmax(-1).tolist()
    assert [got[0], got[2]] == [want[0], want[2]]


def _draw(seq: Sequence, logits: torch.Tensor, n: int) -> list[int]:
    return [sample(logits, [seq])[0] for _ in range(n)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    flat = torch.zeros(1, 100)  # uniform over 100 tokens
    p = dict(temperature=1.0)
    a = _draw(Sequence("a", [1], SamplingParams(seed=1234, **p)), flat, 40)
    b = _draw(Sequence("b", [1], SamplingParams(seed=1234, **p)), flat, 40)
    c = _draw(Sequence("c", [1], SamplingParams(seed=4321, **p)), flat, 40)
    assert a == b
    assert a != c  # equal with probability 100**-40
    assert len(set(a)) > 20  # and the draws actually vary


def _frequencies(logits_row: torch.Tensor, n: int, **params) -> torch.Tensor:
    """Empirical distribution of ``n`` draws, one sequence per draw (seeds 0..n-1), one call."""
    seqs = _seqs(n, seed=0, **params)
    toks = sample(logits_row.expand(n, -1).contiguous(), seqs)
    return torch.bincount(torch.tensor(toks), minlength=logits_row.shape[-1]).double()


def _chi2_ok(counts: torch.Tensor, probs: list[float]) -> None:
    """Pearson's chi-square against ``probs``; zero-probability tokens must never appear."""
    p = torch.tensor(probs, dtype=torch.float64)
    n = counts.sum()
    assert counts[p == 0].sum() == 0, f"sampled a token outside the allowed set: {counts.tolist()}"
    keep = p > 0
    expected = n * p[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    # well above the 99.9% quantile for <= 4 degrees of freedom (18.5)
    assert stat < 20.0, f"chi2={stat:.1f} dof={dof}: {counts.tolist()} vs {expected.tolist()}"


P = [0.5, 0.25, 0.15, 0.1]
LOGP = torch.tensor([math.log(x) for x in P])


def test_frequencies_match_distribution():
    _chi2_ok(_frequencies(LOGP, 4000, temperature=1.0), P)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        w = [x ** (1 / t) for x in P]
        _chi2_ok(_frequencies(LOGP, 4000, temperature=t), [x / sum(w) for x in w])


def test_top_k_renormalises_over_k_best():
    _chi2_ok(_frequencies(LOGP, 3000, temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0, 0])


@pytest.mark.parametrize("top_p,allowed", [(0.5, 1), (0.6, 2), (0.7, 2), (0.8, 3), (0.95, 4)])
def test_top_p_keeps_smallest_nucleus(top_p, allowed):
    # the nucleus is the smallest prefix (by probability) whose mass reaches top_p
    mass = 0.0
    n = 0
    while mass < top_p - 1e-12:
        mass += P[n]
        n += 1
    assert n == allowed
    kept = P[:allowed] + [0.0] * (len(P) - allowed)
    _chi2_ok(_frequencies(LOGP, 3000, temperature=1.0, top_p=top_p), [x / sum(kept) for x in kept])


def test_top_k_and_top_p_together():
    # top_k=3 renormalises to [0.5, .25, .15]/0.9; top_p=0.8 then keeps the first two (0.556 + 0.278)
    _chi2_ok(_frequencies(LOGP, 3000, temperature=1.0, top_k=3, top_p=0.8), [2 / 3, 1 / 3, 0, 0])
