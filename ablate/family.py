"""Family-wise verdicts: Holm's step-down over group-sequential comparisons (`family = "holm"`).

A sweep read as a family (six gammas against one baseline: "which gammas beat gamma 0?") makes
six claims; at alpha 0.05 each, the chance that at least one is wrong with no true difference
anywhere is about 0.2, not 0.05. Holm's procedure holds it at alpha: while r comparisons are
unsettled, each is judged by the group-sequential rule at alpha / r (its own boundaries, computed
for that level); one that settles passes its share on, the others are judged again, replaying
every look, at alpha / (r - 1); and so on until no more settle. This is the closure of weighted
Bonferroni tests, each a group-sequential test valid at its level (the graphical procedures of
Maurer & Bretz for group-sequential designs), so it holds the family-wise error at alpha whatever
the correlation between the comparisons (a shared baseline makes them positively correlated).
The simulation in tests/test_family.py measures it.

Curtailment in a family: an unsettled comparison may still be raised to any level up to alpha
(when the others settle), so it is curtailed only where no level it can reach could settle it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ablate.sequential import SequentialRule, State, Verdict, critical_values, first_settled, judge, statistic_paths

Pair = tuple[str, str]


def level(rule: SequentialRule, unsettled: int) -> SequentialRule:
    """The rule one comparison is judged by while `unsettled` comparisons of the family are open."""
    return dataclasses.replace(rule, alpha=rule.alpha / unsettled, family="none")


def judge_family(rule: SequentialRule, comparisons: Sequence[Pair],
                 finished: Mapping[str, Mapping[int, float]]) -> dict[Pair, Verdict]:
    """Every comparison's verdict under Holm's step-down (see the module docstring); finished maps
    each cell to {seed: AP}. A comparison settled at a step keeps that step's verdict (its critical
    value is its level's)."""
    remaining, verdicts = list(dict.fromkeys(comparisons)), {}
    while remaining:
        r = len(remaining)
        reachable = [level(rule, q) for q in range(1, r + 1)]
        judged = {pair: judge(level(rule, r), finished.get(pair[0], {}), finished.get(pair[1], {}),
                              futility_rules=reachable) for pair in remaining}
        settled = [pair for pair in remaining if judged[pair].state is not State.OPEN]
        verdicts.update(judged if not settled else {pair: judged[pair] for pair in settled})
        if not settled:
            break
        remaining = [pair for pair in remaining if pair not in settled]
    return {pair: verdicts[pair] for pair in comparisons}


def judge_comparisons(rule: SequentialRule, comparisons: Sequence[Pair],
                      finished: Mapping[str, Mapping[int, float]]) -> dict[Pair, Verdict]:
    """Each comparison's verdict, paired by seed: one by one at the rule's alpha, or as a family
    (Holm) when the rule says family = "holm". The one entry point for the loop and the report."""
    if rule.family == "holm":
        return judge_family(rule, comparisons, finished)
    return {pair: judge(rule, finished.get(pair[0], {}), finished.get(pair[1], {})) for pair in comparisons}


def holm_settled(rule: SequentialRule, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down on simulated families: paths (S, K, L) of the rule's statistic for K
    comparisons -> (settled (S, K), sign (S, K) of the statistic where each first settled)."""
    num_sims, k, _ = paths.shape
    critical = np.stack([critical_values(level(rule, r)) for r in range(1, k + 1)])  # (K levels, L)
    settled = np.zeros((num_sims, k), dtype=bool)
    sign = np.zeros((num_sims, k))
    for _ in range(k):
        unsettled = k - settled.sum(axis=1)  # (S,)
        active = unsettled > 0
        c = critical[np.maximum(unsettled, 1) - 1][:, None, :]  # (S, 1, L): each family's current level
        crossed, look = first_settled(paths, c)
        new = crossed & ~settled & active[:, None]
        if not new.any():
            break
        at = np.take_along_axis(paths, look[..., None], axis=2)[..., 0]
        sign = np.where(new, np.sign(at), sign)
        settled |= new
    return settled, sign


def simulate_family(rule: SequentialRule, differences: Sequence[float], sd: float, num_sims: int,
                    rng: np.random.Generator) -> dict[str, float]:
    """K comparisons against one shared baseline (seed noise sd per cell, independent; the shared
    baseline correlates the comparisons by 0.5). Returns the rate of at least one wrong verdict
    (settled where the true difference is 0, or in the wrong direction) under `rule` per
    comparison ("none") and under Holm, and the mean power over the comparisons with a difference."""
    diffs = np.asarray(differences, dtype=float)
    shape = (num_sims, len(diffs), rule.max_seeds)
    base = rng.standard_normal((num_sims, 1, rule.max_seeds))
    d = diffs[None, :, None] + sd * (rng.standard_normal(shape) - base)  # (S, K, N)
    paths = statistic_paths(rule, d)  # (S, K, L)
    single, look = first_settled(paths, critical_values(level(rule, 1)))
    single_sign = np.sign(np.take_along_axis(paths, look[..., None], axis=2)[..., 0])
    holm, holm_sign = holm_settled(rule, paths)
    truth = np.sign(diffs)[None, :]

    def wrong(settled: np.ndarray, sign: np.ndarray) -> float:
        return float((settled & (sign != truth)).any(axis=1).mean())

    def power(settled: np.ndarray, sign: np.ndarray) -> float:
        real = diffs != 0
        return float((settled & (sign == truth))[:, real].mean()) if real.any() else float("nan")

    return {"fwer_per_comparison": wrong(single, single_sign), "fwer_holm": wrong(holm, holm_sign),
            "power_per_comparison": power(single, single_sign), "power_holm": power(holm, holm_sign)}
