"""Budget curves: the same cells trained at multiples of their schedule, and what changes with it.

A budget is a multiple of a cell's schedule (`--budgets 1,2,4`: 1x, 2x, 4x its iterations). This
module owns what a multiple overrides in a cell's config, which pairs of cells swap order between
budgets, and whether a finding holds at every budget measured. It is pure: config values and
pandas tables in, plain values and tables out.

What scales, and what does not:
- `train.iterations` is multiplied.
- The LR steps follow by themselves: `train.lr_steps` are fractions of the run
  (`builders.lr_factor` steps at int(step * iterations)), so 2x800 iterations decay at 1066 and
  1422 as 800 decays at 533 and 711.
- The warm-up stays `train.warmup_iters` iterations. It protects the first updates of
  from-scratch heads from the large early loss of the prior's flood of negatives: a property of
  the start, not of the length. The prior-schedule follow-up ran its 2x and 4x cells the same way
  (100 warm-up iterations at 1600 and 3200), so budget 1 leaves a cell's config, and its config
  hash, unchanged and its existing runs count; budgets 2 and 4 of the same cell are exactly
  prior-schedule's configs. A budget too short to outlast the warm-up is refused.
- Nothing else changes (batch size, lr, `train.checkpoint_every`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from ablate.errors import ConfigError

T = TypeVar("T")


# ----------------------------------------------------------------------------- the overrides


def parse_budgets(text: str) -> tuple[float, ...]:
    """"1,2,4" -> (1.0, 2.0, 4.0): positive multiples, distinct, in ascending order."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--budgets: '{text}' is not a comma-separated list of numbers (e.g. 1,2,4)") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ConfigError(f"--budgets: '{text}' must list positive multiples of the schedule (e.g. 1,2,4)")
    if len(set(values)) != len(values):
        raise ConfigError(f"--budgets: '{text}' lists a multiple twice")
    return tuple(sorted(values))


def budgets_text(budgets: Sequence[float]) -> str:
    """(1.0, 2.0, 4.0) -> "1,2,4": the --budgets value parse_budgets reads back."""
    return ",".join(f"{b:g}" for b in budgets)


def budget_label(multiple: float) -> str:
    """"x1", "x2", "x0.5": how a budget is written beside a cell's name."""
    return f"x{multiple:g}"


def budget_overrides(multiple: float, iterations: int, warmup_iters: int) -> dict[str, Any]:
    """The config overrides of a cell at `multiple` times its schedule: {"train.iterations": n}.

    iterations and warmup_iters are the cell's own (`train.iterations`, `train.warmup_iters`).
    The scaled length must be a whole number of iterations (0.5 x 801 is not) and longer than
    the warm-up, else ConfigError.
    """
    scaled = multiple * iterations
    if not math.isclose(scaled, round(scaled), rel_tol=0, abs_tol=1e-9):
        raise ConfigError(f"budget {budget_label(multiple)}: {multiple:g} x {iterations} iterations "
                          "is not a whole number of iterations")
    scaled = int(round(scaled))
    if scaled <= warmup_iters:
        raise ConfigError(f"budget {budget_label(multiple)}: {scaled} iterations do not outlast the "
                          f"{warmup_iters} warm-up iterations (train.warmup_iters)")
    return {"train.iterations": scaled}


# ----------------------------------------------------------------------------- order changes

ORDER_CHANGE_COLUMNS = ["cell_a", "cell_b", "budget_from", "budget_to", "difference_from",
                        "difference_to", "disjoint"]


def order_changes(table: pd.DataFrame, mean: str = "AP_mean", half: str = "AP_ci95") -> pd.DataFrame:
    """Every pair of cells whose order by mean changes between two budgets.

    table: one row per cell and budget, columns `cell`, `budget`, `mean` and `half` (the 95% CI
    half-width, NaN below two seeds), as results.csv names them.
    Returns one row per (pair, budget pair) with a swap, columns ORDER_CHANGE_COLUMNS:
    difference_* = mean of cell_a - mean of cell_b at each budget (opposite signs), and
    `disjoint`, True when the two CIs are disjoint at both budgets.

    Both kinds are listed, and `disjoint` tells them apart: a swap of means alone is what a reader
    sees in the plot and may be seed noise (two cells within a CI of each other swap half the
    time); a swap with disjoint CIs at both budgets is the one to flag, since each order was
    measured clearly. A tie in means is no order, so never a swap; cells are paired in their
    first-appearance order, budgets low to high, every pair of budgets (not only neighbours:
    1x and 4x can disagree while 2x ties).
    """
    missing = [c for c in ("cell", "budget", mean, half) if c not in table.columns]
    if missing:
        raise ValueError(f"order_changes: the table lacks the column(s) {', '.join(missing)}")
    cells = list(dict.fromkeys(table["cell"]))
    budgets = sorted(set(table["budget"]))
    means = table.pivot_table(index="cell", columns="budget", values=mean, aggfunc="first", dropna=False)
    halves = table.pivot_table(index="cell", columns="budget", values=half, aggfunc="first", dropna=False)
    means, halves = means.reindex(index=cells, columns=budgets), halves.reindex(index=cells, columns=budgets)
    rows = []
    for a, b in itertools.combinations(cells, 2):
        for lo, hi in itertools.combinations(budgets, 2):
            d_lo, d_hi = means.at[a, lo] - means.at[b, lo], means.at[a, hi] - means.at[b, hi]
            if not (np.sign(d_lo) * np.sign(d_hi) < 0):  # NaN (a cell missing) or a tie: no swap
                continue
            apart = all(abs(d) > halves.at[a, x] + halves.at[b, x] for d, x in ((d_lo, lo), (d_hi, hi)))
            rows.append((a, b, lo, hi, float(d_lo), float(d_hi), bool(apart)))
    return pd.DataFrame(rows, columns=ORDER_CHANGE_COLUMNS)


# ----------------------------------------------------------------------------- findings across budgets


@dataclass(frozen=True)
class AcrossBudgets:
    """A finding's verdict at each budget, and over all of them."""

    per_budget: dict[float, bool | None]  # None: not measured at that budget
    holds: bool | None  # False if it fails at any budget; True if it holds wherever measured; None if measured nowhere

    def text(self) -> str:
        """"yes at x1, x2; not measured at x4", "no at x4; yes at x1, x2", "no budget measured" (no
        report of its experiment was run at several budgets)."""
        if all(verdict is None for verdict in self.per_budget.values()):
            return "no budget measured"
        groups = {v: [budget_label(b) for b, verdict in self.per_budget.items() if verdict is v]
                  for v in (True, False, None)}
        parts = {True: "yes at ", False: "no at ", None: "not measured at "}
        ordered = (False, True, None) if self.holds is False else (True, False, None)
        return "; ".join(parts[v] + ", ".join(groups[v]) for v in ordered if groups[v])


def holds_at_every_budget(judge: Callable[[T], bool | None], results: Mapping[float, T]) -> AcrossBudgets:
    """judge (one budget's results -> holds, None when not measured) at every budget of `results`.

    A judge that raises KeyError counts as not measured at that budget, as `findings.judge_reports`
    treats a missing report or cell.
    """
    per_budget: dict[float, bool | None] = {}
    for budget in sorted(results):
        try:
            per_budget[budget] = judge(results[budget])
        except KeyError:
            per_budget[budget] = None
    return AcrossBudgets(per_budget, _combine(per_budget.values()))


def _combine(verdicts: Iterable[bool | None]) -> bool | None:
    measured = [v for v in verdicts if v is not None]
    if not measured:
        return None
    return all(measured)
