"""Family-wise verdicts: Holm's step-down over the group-sequential comparisons of a sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ablate.family import judge_comparisons, judge_family, level, simulate_family
from ablate.sequential import SequentialRule, State, critical_values, judge

RULE = SequentialRule(family="holm")


def test_levels_split_alpha_and_raise_the_boundaries():
    assert level(RULE, 6).alpha == pytest.approx(0.05 / 6) and level(RULE, 6).family == "none"
    assert (critical_values(level(RULE, 6)) > critical_values(level(RULE, 1))).all()


def test_holm_passes_alpha_on_to_what_is_left():
    """Two comparisons: a clear one settles at alpha / 2 first; the other, past the alpha boundary
    but not the alpha / 2 one, then settles at alpha. A third cell that nothing separates stays open."""
    base = {s: 20.0 + 0.1 * s for s in range(8)}
    clear = {s: v + 10.0 + (0.3 if s % 2 else -0.3) for s, v in base.items()}
    c_full, c_half = critical_values(level(RULE, 1))[-1], critical_values(level(RULE, 2))[-1]
    # Paired differences with mean m and sd 1 over 8 seeds give t = m sqrt(8): put it between the two.
    m = (c_full + c_half) / 2 / math.sqrt(8)
    wiggle = np.array([1, -1, 1, -1, 1, -1, 1, -1]) * math.sqrt(7 / 8)  # sd exactly 1 (ddof 1)
    edge = {s: base[s] + m + wiggle[s] for s in range(8)}
    finished = {"base": base, "clear": clear, "edge": edge}
    pairs = [("clear", "base"), ("edge", "base")]
    assert judge(level(RULE, 2), edge, base).state is State.OPEN  # the premise: open at alpha / 2 ...
    at_full = judge(level(RULE, 1), edge, base)
    assert at_full.state is State.FOR  # ... settled at alpha
    holm = judge_family(RULE, pairs, finished)
    assert holm[("clear", "base")].state is State.FOR
    assert holm[("edge", "base")] == at_full
    # Against a third comparison that never settles, edge stays at alpha / 2 and open.
    finished["same"] = {s: base[s] + wiggle[s] for s in range(8)}
    three = judge_family(RULE, [*pairs, ("same", "base")], finished)
    assert three[("edge", "base")].state is State.OPEN and three[("same", "base")].state is State.OPEN
    # Per comparison (no family), edge settles whatever the others do.
    single = judge_comparisons(SequentialRule(), [*pairs, ("same", "base")], finished)
    assert single[("edge", "base")].state is State.FOR


def test_family_wise_error_of_six_comparisons_against_a_shared_baseline(capsys):
    """The sweep of gamma-sweep: 6 cells vs one baseline, seed spread 1.63 AP, no true difference.
    Per comparison the rule makes some wrong claim in ~23% of sweeps; Holm holds it at 0.05."""
    num_sims = 20_000
    allowance = 3 * math.sqrt(0.05 * 0.95 / num_sims) + 0.002  # Monte Carlo, plus the boundaries' own
    lines = ["test | true differences | FWER per comparison | FWER Holm | power per comparison | power Holm"]
    for test in ("t", "signed_rank"):
        rule = SequentialRule(test=test)
        for differences in ([0.0] * 6, [0.0, 0.0, 0.0, 3.0, 3.0, 5.0]):
            out = simulate_family(rule, differences, 1.63, num_sims, np.random.default_rng(6))
            assert out["fwer_holm"] <= rule.alpha + allowance
            if not any(differences):
                assert out["fwer_per_comparison"] > 0.15  # why a sweep read as a family needs the correction
            else:
                assert out["power_holm"] <= out["power_per_comparison"]
            lines.append(f"{test} | {differences} | {out['fwer_per_comparison']:.4f} | {out['fwer_holm']:.4f} | "
                         f"{out['power_per_comparison']:.3f} | {out['power_holm']:.3f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
