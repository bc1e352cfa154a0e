"""The effect at a group-sequential stop, adjusted for the stop: the median-unbiased estimate.

A comparison that settles early settled *because* its first seeds happened to show a large
difference: among comparisons with a true +2 AP, those the default rule settles report +2.7 on
average (+3.1 when settled at 5 seeds). The raw mean of a settled comparison is biased up.

The median-unbiased estimate (stage-wise ordering; Jennison & Turnbull, Group Sequential Methods,
ch. 8) is the true effect at which the observed outcome sits at the median of the design's
outcomes. Outcomes are ordered by when and how they stopped: settling for at an earlier look is
more extreme than settling for later, which is more extreme than staying open, then settling
against late, then early; within one look the larger statistic is the more extreme.
P_theta(outcome at least as extreme as observed) rises with theta, and the estimate is the theta
where it crosses 1/2.

The design's outcomes depend on the effect only through theta = difference / sd of the per-seed
differences (both statistics are scale-free), so P is tabulated once per rule, on a grid of theta,
from normal paths with common random numbers (a fixed seed), and the estimate in AP points is
theta-hat times the measured sd of the differences at the stop. That last step plugs in the
measured spread, so the AP figure is median-unbiased only approximately; theta-hat itself is,
up to the tabulation's Monte Carlo error. Curtailment does not enter: it never changes where a
comparison settles. A comparison stopped by curtailment is not adjusted (its raw mean is biased
towards 0, and it claims nothing).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ablate.sequential import SequentialRule, State, Verdict, critical_values, first_settled, statistic_paths

THETAS = np.linspace(-10.0, 10.0, 401)  # effect / sd of the differences: beyond 10 every path settles at once
NUM_PATHS = 4000  # per theta: P to ~0.008 (one standard error), so theta-hat to a few hundredths
SPACING = 1e6  # keeps the stop classes apart in one float key (statistics are clipped well inside it)


def _keys(rule: SequentialRule, paths: np.ndarray) -> np.ndarray:
    """The stage-wise order as one float per path: paths (..., L) of the rule's statistic -> (...,).
    Class L - look for settling for at `look` (index), minus that for against, 0 for open at the
    last look; the statistic at the stop breaks ties within a class."""
    num_looks = paths.shape[-1]
    settled, look = first_settled(paths, critical_values(rule))
    at = np.take_along_axis(np.nan_to_num(paths, nan=0.0), look[..., None], axis=-1)[..., 0]
    cls = np.where(settled, np.sign(at) * (num_looks - look), 0.0)
    return cls * SPACING + np.clip(at, -SPACING / 10, SPACING / 10)


@functools.lru_cache(maxsize=8)
def _table(rule: SequentialRule) -> np.ndarray:
    """Each theta's outcome keys, sorted: (len(THETAS), NUM_PATHS)."""
    rng = np.random.default_rng(rule.mc_seed + 1)
    z = rng.standard_normal((NUM_PATHS, rule.max_seeds))
    out = np.empty((len(THETAS), NUM_PATHS))
    for start in range(0, len(THETAS), 25):  # 25 thetas at a time: bounded memory for the signed-rank
        theta = THETAS[start:start + 25, None, None]
        out[start:start + 25] = np.sort(_keys(rule, statistic_paths(rule, theta + z[None])), axis=-1)
    return out


def _observed_key(rule: SequentialRule, verdict: Verdict) -> float | None:
    """The observed outcome's key; None where the design's ordering has no place for it (a
    comparison still open before max_seeds, or stopped by curtailment)."""
    if verdict.curtailed or (verdict.state is State.OPEN and not verdict.at_max):
        return None
    look = verdict.n - rule.min_seeds
    num_looks = len(rule.looks)
    cls = 0.0 if verdict.state is State.OPEN else math.copysign(num_looks - look, verdict.statistic)
    stat = 0.0 if math.isnan(verdict.statistic) else verdict.statistic
    return cls * SPACING + float(np.clip(stat, -SPACING / 10, SPACING / 10))


def theta_hat(rule: SequentialRule, verdict: Verdict) -> float:
    """The median-unbiased estimate of difference / sd of the differences; NaN where there is none
    (see _observed_key). Clamped to THETAS' ends."""
    key = _observed_key(rule, verdict)
    return math.nan if key is None else float(theta_hats(rule, np.array([key]))[0])


def outcome_keys(rule: SequentialRule, paths: np.ndarray) -> np.ndarray:
    """The stage-wise order of simulated outcomes (paths (S, L) of the rule's statistic) -> (S,),
    for theta_hats; a comparison that stops by curtailment has no place in it (run them without)."""
    return _keys(rule, paths)


def theta_hats(rule: SequentialRule, keys: np.ndarray) -> np.ndarray:
    """theta-hat of each observed outcome key (S,) -> (S,): where P_theta(outcome >= key) crosses 1/2,
    linearly between grid points; clamped to THETAS' ends."""
    table = _table(rule)
    above = 1.0 - np.stack([np.searchsorted(row, keys, side="left") for row in table], axis=1) / NUM_PATHS  # (S, G)
    above = np.maximum.accumulate(above, axis=1)  # Monte Carlo wiggles aside, P rises with theta: keep it so
    i = np.clip(np.argmax(above >= 0.5, axis=1), 1, len(THETAS) - 1)
    lo, hi = np.take_along_axis(above, (i - 1)[:, None], 1)[:, 0], np.take_along_axis(above, i[:, None], 1)[:, 0]
    frac = np.where(hi > lo, (0.5 - lo) / np.where(hi > lo, hi - lo, 1.0), 0.5)
    out = THETAS[i - 1] + np.clip(frac, 0.0, 1.0) * (THETAS[i] - THETAS[i - 1])
    out = np.where(above[:, 0] >= 0.5, THETAS[0], out)
    return np.where(above[:, -1] < 0.5, THETAS[-1], out)


def adjusted_difference(rule: SequentialRule, verdict: Verdict, differences: np.ndarray) -> float:
    """The median-unbiased difference in the differences' unit: theta-hat x their sd over the
    verdict's seeds. differences: the per-seed differences in seed order (at least verdict.n).
    NaN where there is no estimate; the raw mean where the differences have no spread."""
    d = np.asarray(differences, dtype=float)[: verdict.n]
    theta = theta_hat(rule, verdict)
    if math.isnan(theta):
        return math.nan
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    return float(d.mean()) if sd == 0 else theta * sd
