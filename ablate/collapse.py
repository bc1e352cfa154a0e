"""Collapsed seeds: a seed whose AP fell far below its cell's others (a run that did not escape the
easy negatives in time, say). One such seed moves a mean by several AP and a paired t by a lot;
every report counts them per cell, and a verdict built on means says when it rests on one.

The rule, fixed here and printed with every count: a finished seed collapsed when its AP is below
half the median AP of its cell's finished seeds, in cells with at least 3 finished seeds (with
fewer, the median is no yardstick) and a median of at least 1 AP (a cell that collapsed as a
whole has no seed that collapsed on its own: 0.0 against a median of 0.1 is noise at the floor).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FRACTION = 0.5  # of the cell's median AP
MIN_SEEDS = 3
MIN_MEDIAN = 1.0  # AP points
RULE = (f"AP below {FRACTION:g} x the cell's median AP over its finished seeds, cells with >= {MIN_SEEDS} seeds "
        f"and a median >= {MIN_MEDIAN:g} AP")


def collapsed_seeds(ap_by_seed: Mapping[int, float]) -> list[int]:
    """The collapsed seeds of one cell, ascending; ap_by_seed: {seed: AP in points} of its finished runs
    (NaN dropped)."""
    values = {seed: float(ap) for seed, ap in ap_by_seed.items() if np.isfinite(ap)}
    if len(values) < MIN_SEEDS:
        return []
    median = float(np.median(list(values.values())))
    if median < MIN_MEDIAN:
        return []
    floor = FRACTION * median
    return sorted(seed for seed, ap in values.items() if ap < floor)
