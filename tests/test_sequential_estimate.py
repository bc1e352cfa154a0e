"""The median-unbiased effect at a group-sequential stop: what the raw mean reports at a true +2
AP, and what the adjusted estimate reports, over simulated comparisons."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ablate.sequential import SequentialRule, State, Verdict, critical_values, first_settled, judge, statistic_paths
from ablate.sequential_estimate import adjusted_difference, outcome_keys, theta_hat, theta_hats

RULE = SequentialRule()
SD = 1.63  # one cell's seed spread, AP (the committed reports' median)
ZERO = dict(enumerate(np.zeros(8)))


def test_open_before_max_or_curtailed_has_no_estimate():
    open_ = Verdict(State.OPEN, 5, 1.0, 1.0, 4.71, True, at_max=False)
    curtailed = Verdict(State.OPEN, 5, 0.1, 0.5, 4.71, True, at_max=True, curtailed=True)
    assert math.isnan(theta_hat(RULE, open_)) and math.isnan(adjusted_difference(RULE, curtailed, np.ones(5)))


def test_a_settled_look_is_pulled_down_and_orders_by_look_then_statistic():
    """Settling for at 5 seeds with t = 5 estimates less than its raw standardised mean t / sqrt(5);
    a larger t at the same look estimates more; settling at 8 (after 7 looks that did not) less
    than settling at 5 (stage-wise ordering)."""
    def at(n: int, t: float) -> float:
        return theta_hat(RULE, Verdict(State.FOR, n, 0.0, t, 0.0, True, n == 8))

    assert 0 < at(5, 5.0) < 5.0 / math.sqrt(5)
    assert at(5, 5.0) < at(5, 7.0) and at(8, 3.0) < at(5, 5.0)


def test_bias_at_a_true_two_ap(capsys):
    """At a true +2 AP: settled comparisons report +2.7 raw (+3.1 settled at 5 seeds); the standardised
    estimate theta-hat is median-unbiased; in AP points (theta-hat x the measured spread) the upward
    bias of settled comparisons shrinks."""
    rng = np.random.default_rng(20261205)
    plain = SequentialRule(curtail=False)  # every comparison runs to its stop, as the design's ordering assumes
    true, num = 2.0, 20_000
    d = true + SD * (rng.standard_normal((num, 8)) - rng.standard_normal((num, 8)))
    paths = statistic_paths(plain, d)
    settled, look = first_settled(paths, critical_values(plain))
    n = plain.min_seeds + look  # seeds at the stop
    upto = np.arange(8)[None, :] < n[:, None]
    raw = (d * upto).sum(axis=1) / n
    spread = np.sqrt((((d - raw[:, None]) ** 2) * upto).sum(axis=1) / (n - 1))
    theta = theta_hats(plain, outcome_keys(plain, paths))
    adjusted = theta * spread
    # The vectorised figures are adjusted_difference's, verdict by verdict.
    for row, value in zip(d[:20], adjusted[:20]):
        assert adjusted_difference(plain, judge(plain, dict(enumerate(row)), ZERO), row) == pytest.approx(value)
    at5 = settled & (n == 5)
    assert raw[settled].mean() > true + 0.4  # the bias the issue measured (+2.7)
    assert abs((theta <= true / (SD * math.sqrt(2))).mean() - 0.5) < 0.02  # median-unbiased, standardised
    assert adjusted[settled].mean() < raw[settled].mean() - 0.2
    with capsys.disabled():
        print(f"\ntrue +{true:g} AP, {num} comparisons, {settled.mean():.3f} settled: raw mean when settled "
              f"{raw[settled].mean():+.2f} (at 5 seeds {raw[at5].mean():+.2f}), adjusted {adjusted[settled].mean():+.2f} "
              f"(at 5 seeds {adjusted[at5].mean():+.2f}); P(theta-hat <= theta) {(theta <= true / (SD * math.sqrt(2))).mean():.3f}, "
              f"P(adjusted <= true) {(adjusted <= true).mean():.3f}, P(raw <= true) {(raw <= true).mean():.3f}")
