"""The exact group-sequential signed-rank test: the enumerated chain against the known null
distribution, boundaries against scipy's exact test, the statistic against scipy's ranks, and
the error rate under noise that is symmetric but far from normal."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from ablate.sequential import SequentialRule, critical_values, obrien_fleming, simulate
from ablate.signed_rank import _centred_of_masks, _grow, boundaries, centred_paths


def test_centred_statistic_matches_scipy_ranks_with_ties_and_zeros():
    d = np.array([[0.4, -1.2, 0.4, 3.0, 0.0, -0.1, 2.2, -5.0]])
    v = centred_paths(d)[0]
    for n in range(1, 9):
        x = d[0, :n]
        expected = 0.5 * float((np.sign(x) * stats.rankdata(np.abs(x))).sum())
        assert v[n - 1] == pytest.approx(expected)
    assert v[0] == pytest.approx(0.5)  # one positive difference: W+ = 1, n(n+1)/4 = 0.5


def test_chain_gives_the_null_distribution_of_w_plus():
    """Under the null every subset of positive ranks has probability 2^-n: the chain's masses over
    W+ are the subset-sum counts of {1..n} / 2^n."""
    masses = np.array([1.0])
    for n in range(1, 7):
        masses = _grow(masses, n - 1)
    w_plus = _centred_of_masks(6) + 6 * 7 / 4
    counts = {}
    for r in range(7):
        for subset in itertools.combinations(range(1, 7), r):
            counts[sum(subset)] = counts.get(sum(subset), 0) + 1
    for w, count in counts.items():
        assert masses[w_plus == w].sum() == pytest.approx(count / 64)


def test_one_look_equals_scipys_exact_test():
    """A single look at 8 seeds rejects exactly the W+ that scipy's exact two-sided p puts at or below
    the level: W+ <= 3 or >= 33 (p = 10/256 = 0.039; W+ = 32 has p = 14/256 = 0.055)."""
    critical, spent = boundaries(0.05, 8, 8, obrien_fleming)
    assert critical == (14.5,) and spent[0] == pytest.approx(10 / 256)
    for w in range(0, 37):
        positive = [r for r in range(1, 9) if r in _subset_with_sum(w)]
        d = np.array([r if r in positive else -r for r in range(1, 9)], dtype=float)
        p = stats.wilcoxon(d, method="exact").pvalue
        assert (abs(w - 18) > critical[0]) == (p <= 0.05), w


def _subset_with_sum(w: int) -> set[int]:
    """Some subset of 1..8 summing to w (greedy from the top)."""
    chosen, left = set(), w
    for r in range(8, 0, -1):
        if r <= left:
            chosen.add(r)
            left -= r
    assert left == 0
    return chosen


def test_group_sequential_spending_is_exact_and_simulation_agrees():
    rule = SequentialRule(test="signed_rank", curtail=False)
    critical, spent = boundaries(rule.alpha, rule.min_seeds, rule.max_seeds, obrien_fleming)
    cumulative = np.cumsum(spent)
    allowed = obrien_fleming(rule.looks / rule.max_seeds, rule.alpha)
    assert (cumulative <= allowed + 1e-12).all() and cumulative[-1] > 0.045  # at most alpha, and not far below
    assert critical[:3] == (3.0, 5.0, 7.5)  # 3-5 seeds: nothing can settle at O'Brien-Fleming's early shares
    rng = np.random.default_rng(11)
    paths = centred_paths(rng.standard_normal((200_000, 8)))[:, 2:]
    crossed = np.abs(paths) > critical_values(rule)
    first = crossed & (np.cumsum(crossed, axis=1) == 1)
    assert np.abs(first.mean(axis=0) - spent).max() < 4 * math.sqrt(0.03 / 200_000) + 1e-4


def test_error_rate_holds_under_heavy_tailed_symmetric_noise():
    """Cauchy seed noise (no mean, no variance): the t-test's premise is gone, the signed-rank's is not."""
    rule = SequentialRule(test="signed_rank")
    oc = simulate(rule, 0.0, 1.0, 100_000, np.random.default_rng(5), draw=lambda g, shape: g.standard_cauchy(shape))
    assert oc.wrong <= rule.alpha + 3 * math.sqrt(0.05 * 0.95 / 100_000)


def test_signed_rank_rule_is_recorded_and_bounded():
    rule = SequentialRule(test="signed_rank", max_seeds=8)
    record = rule.to_dict()
    assert record["test"] == "signed_rank" and record["critical"]["8"] == 14.5
    assert record["futility"]["7"] == pytest.approx(10.5)  # c_8 - (72 - 56) / 4 = 14.5 - 4
    assert SequentialRule.from_dict(record) == rule
    with pytest.raises(Exception, match="enumerates up to 16"):
        SequentialRule(test="signed_rank", max_seeds=17)
