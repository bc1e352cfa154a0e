"""Adaptive seeds: a group-sequential stopping rule for comparing two cells over seeds.

A comparison (a cell against its comparator, the baseline by default) is looked at once per added
seed, from `min_seeds` to `max_seeds` seeds. At each look it is *settled for* (the cell is better),
*settled against* (the cell is worse) or still *open*; an open comparison gets another seed until
`max_seeds`, where it stays "open at max seeds". This module owns the rule, the verdict, which
cells need another seed, and the rule's operating characteristics (error rates, expected seeds,
the fixed-n design of the same power). It is pure: plain numbers in, plain numbers out.

The rule (fixed before the runs; `SequentialRule.to_dict` is what gets recorded with them):

- Seeds pair the two cells (a seed fixes the data order and the initialisation), so each look
  tests the per-seed differences with a paired t statistic t_n = mean / (std / sqrt(n)) over the
  first n common seeds in ascending order.
- The two-sided error rate alpha is spread over the looks by a Lan-DeMets spending function,
  O'Brien-Fleming-type by default: alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) at information
  fraction t = n / max_seeds. It spends almost nothing at the first looks, where a t-test on 3
  seeds has 2 degrees of freedom and little power anyway, and keeps nearly the whole alpha for the
  last look.
- The look at n settles when |t_n| exceeds a critical value c_n chosen so that, with no true
  difference, the chance of settling *first* at look n is exactly that look's share of alpha.
  Under normal seed noise the sequence (t_min, ..., t_max) has the same joint distribution
  whatever the noise's spread (t is scale-free), so these exact group-sequential boundaries are
  computed once by Monte Carlo from standard normal paths with a fixed seed: the first look's
  c is the plain Student t quantile, the later ones quantiles among the paths not yet settled.
  The overall rate of settling with no true difference is then alpha (up to the Monte Carlo error
  of the boundaries, ~1e-3 at 400k paths; tests/test_sequential.py simulates it), and settling in
  the wrong direction at a true difference is below alpha / 2.
- This is not a t-test re-run after every seed: testing each of the 6 looks of 3..8 seeds at the
  full alpha 0.05 settles a comparison with no true difference 15% of the time, not 5%.
- Unpaired comparisons (no common seeds) use Welch's test at each look's share of alpha instead,
  each look on the first k seeds of each side. Its joint distribution depends on the variance
  ratio, so no exact boundary exists; by the union bound (the chance that any look settles is at
  most the sum of the looks' shares) its error rate is at most alpha, and in practice well below,
  since the looks are strongly correlated: the paired test run the same way settles 2.8% of null
  comparisons at alpha 0.05 and finds a 3 AP difference 71% of the time, against 83% with the
  exact boundaries.

- `test = "signed_rank"` swaps the paired t for the exact group-sequential Wilcoxon signed-rank
  test of ablate.signed_rank (boundaries by enumeration, any symmetric null): it asks whether the
  cell is better on a typical seed, not whether its mean AP is higher, and one collapsed seed
  does not sway it.
- Curtailment (`curtail`, on by default): a comparison whose statistic is so small that no later
  look could settle it, whatever the remaining seeds show, stops drawing seeds ("open, cannot
  settle"). The thresholds follow from the boundaries (`futility_thresholds`, recorded with the
  rule): for the paired t, the largest |t_m| that m - n more differences can reach from |t_n| is
  sqrt(m(m-1) t_n^2 / (n(n-1)) + (m-1)(m-n)/n) (all new differences equal, at the value that
  maximises t: Cauchy-Schwarz), and the look at n is futile when that stays within c_m at every
  later m. It changes no verdict, only the seeds spent.
- `family = "holm"` reads the comparisons as one family (a sweep against a shared baseline):
  ablate.family applies Holm's step-down to the group-sequential tests (each comparison at
  alpha / r while r are unsettled; a settled one passes its share on), which holds the chance of
  any wrong verdict in the family to alpha. Without it each verdict controls its own error only.

A verdict is a pure function of the values: the looks are replayed from `min_seeds` on the common
seeds in ascending order and the first look that settles (or is futile) decides, so a settled
comparison stays settled when one of its cells later gets seeds for another comparison, and a
comparison with more seeds than `max_seeds` (a fixed-n grid) is judged on its first `max_seeds`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ablate import signed_rank
from ablate.errors import AblateError

# ----------------------------------------------------------------------------- spending functions
# Cumulative alpha spent by information fraction t in (0, 1]: f(1, alpha) = alpha, f increasing.


def obrien_fleming(t: np.ndarray, alpha: float) -> np.ndarray:
    """Lan-DeMets O'Brien-Fleming-type spending: 2 - 2 Phi(z_{1-alpha/2} / sqrt(t))."""
    return 2.0 - 2.0 * stats.norm.cdf(stats.norm.ppf(1.0 - alpha / 2.0) / np.sqrt(t))


def pocock(t: np.ndarray, alpha: float) -> np.ndarray:
    """Lan-DeMets Pocock-type spending: alpha ln(1 + (e - 1) t); spends more at the early looks."""
    return alpha * np.log1p((math.e - 1.0) * np.asarray(t, dtype=float))


SPENDING: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "obrien_fleming": obrien_fleming,
    "pocock": pocock,
}
TESTS = ("t", "signed_rank")
FAMILIES = ("none", "holm")


# ----------------------------------------------------------------------------- the rule


# The most seeds a rule may look at. Computing its boundaries peaks at ~22 MB per seed (400k paths;
# measured: 0.28 GB at 8, 0.80 GB at 32, 1.5 GB at 64); --max-seeds 1000 was killed at 18.7 GB.
# 32 seeds per cell is far past where a comparison of detectors settles (3-8 here).
MAX_SEEDS = 32


@dataclass(frozen=True)
class SequentialRule:
    """The stopping rule of `--until-settled`, fixed before the runs and recorded with them."""

    alpha: float = 0.05  # two-sided rate of settling a comparison whose cells do not differ
    min_seeds: int = 3  # the first look: below 3 seeds a std says next to nothing
    max_seeds: int = 8  # the last look; an open comparison there stays "open at max seeds"
    spending: str = "obrien_fleming"  # a key of SPENDING
    # The boundaries' Monte Carlo: 400k standard normal paths (~0.5 s, a boundary error of ~1e-3 in
    # the error rate); the seed makes them a fixed function of the fields above.
    mc_paths: int = 400_000
    mc_seed: int = 0
    test: str = "t"  # a key of TESTS: the paired t (mean AP) or the signed-rank (a typical seed)
    family: str = "none"  # a key of FAMILIES: "none" (each comparison at alpha) or "holm" (family-wise)
    curtail: bool = True  # stop a comparison no later look can settle (changes no verdict)

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise AblateError(f"sequential rule: alpha must lie in (0, 1), got {self.alpha}")
        if not 2 <= self.min_seeds <= self.max_seeds:
            raise AblateError(f"sequential rule: need 2 <= min_seeds <= max_seeds, got "
                              f"min_seeds={self.min_seeds}, max_seeds={self.max_seeds}")
        if self.spending not in SPENDING:
            raise AblateError(f"sequential rule: spending '{self.spending}' is none of {', '.join(SPENDING)}")
        if self.mc_paths < 10_000:
            raise AblateError(f"sequential rule: mc_paths must be >= 10000, got {self.mc_paths}")
        if self.max_seeds > MAX_SEEDS:
            raise AblateError(f"sequential rule: max_seeds must be <= {MAX_SEEDS} (the boundaries' Monte Carlo "
                              f"holds {self.mc_paths:,} paths of max_seeds values: ~0.8 GB at {MAX_SEEDS}), "
                              f"got {self.max_seeds}")
        if self.test not in TESTS:
            raise AblateError(f"sequential rule: test '{self.test}' is none of {', '.join(TESTS)}")
        if self.family not in FAMILIES:
            raise AblateError(f"sequential rule: family '{self.family}' is none of {', '.join(FAMILIES)}")
        if self.test == "signed_rank" and self.max_seeds > signed_rank.MAX_SEEDS:
            raise AblateError(f"sequential rule: the signed-rank test enumerates up to {signed_rank.MAX_SEEDS} "
                              f"seeds, got max_seeds={self.max_seeds}")

    @property
    def question(self) -> str:
        """What a verdict of this rule answers, in words for the report."""
        return ("is the cell better on a typical seed (the per-seed differences lean to one side in rank)"
                if self.test == "signed_rank" else "is the cell's mean AP higher (paired t on the per-seed differences)")

    @property
    def error_text(self) -> str:
        """The error a verdict controls: "per comparison, alpha 0.05" or "family-wise (Holm), alpha 0.05"."""
        return f"family-wise (Holm), alpha {self.alpha:g}" if self.family == "holm" else \
            f"per comparison, alpha {self.alpha:g}"

    @property
    def looks(self) -> np.ndarray:
        """The seed counts n at which the rule looks: min_seeds, ..., max_seeds. Shape (L,)."""
        return np.arange(self.min_seeds, self.max_seeds + 1)

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the critical values they imply ({"3": c_3, ...}; |t| for the t test, |V|
        for the signed-rank) and the curtailment thresholds (None where a look never curtails) for
        a reader of the record."""
        out: dict[str, Any] = dataclasses.asdict(self)
        out["critical"] = {str(n): float(c) for n, c in zip(self.looks, critical_values(self))}
        out["futility"] = {str(n): (float(f) if f >= 0 else None)
                           for n, f in zip(self.looks, futility_thresholds(self))}
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], source: str = "sequential rule") -> SequentialRule:
        """Inverse of `to_dict`. Recorded critical values must be those this code computes: if
        numpy's random stream ever changed, the rule recorded with the runs is not the one that
        would judge them, and that is an error rather than a silent switch."""
        record = dict(record)
        recorded = record.pop("critical", None)
        legacy = record.pop("critical_t", None)  # records before the signed-rank option: always t
        recorded = legacy if recorded is None else recorded
        record.pop("futility", None)  # implied by the fields, like the critical values
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise AblateError(f"{source}: unknown key(s) {', '.join(unknown)}")
        rule = cls(**record)
        if recorded is not None:
            mine = rule.to_dict()["critical"]
            if set(recorded) != set(mine) or any(not math.isclose(float(recorded[k]), mine[k], rel_tol=1e-9)
                                                 for k in mine):
                raise AblateError(f"{source}: recorded critical values {recorded} differ from the ones "
                                  f"this code computes {mine}")
        return rule


def spending_increments(rule: SequentialRule) -> np.ndarray:
    """Each look's share of alpha, shape (L,), summing to alpha. The first look takes everything
    spent up to its information fraction (no look happens before it)."""
    cumulative = SPENDING[rule.spending](rule.looks / rule.max_seeds, rule.alpha)
    return np.diff(np.concatenate([[0.0], cumulative]))


# ----------------------------------------------------------------------------- t statistics


def paired_t_paths(differences: np.ndarray) -> np.ndarray:
    """t statistic of the mean of each prefix: (..., N) per-seed differences -> (..., N) where
    [..., n-1] is t over the first n. NaN for n = 1 and for a prefix of equal zeros; +-inf for a
    prefix of equal non-zero values (no spread, a clear sign)."""
    d = np.asarray(differences, dtype=float)
    n = np.arange(1, d.shape[-1] + 1)
    # Sums about the first value: the spread is unchanged, equal values give exactly 0 (not
    # round-off, which would turn "no spread" into a huge finite t), and cancellation stays small.
    shifted = d - d[..., :1]
    mean = np.cumsum(shifted, axis=-1) / n
    ss = np.maximum(np.cumsum(shifted * shifted, axis=-1) - n * mean * mean, 0.0)
    var = ss / np.maximum(n - 1, 1)
    mean = mean + d[..., :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / np.sqrt(var / n)
    t[..., 0] = np.nan
    return t


@functools.lru_cache(maxsize=16)
def _critical_values(rule: SequentialRule) -> tuple[float, ...]:
    increments = spending_increments(rule)
    first = float(stats.t.isf(increments[0] / 2.0, rule.min_seeds - 1))  # no earlier look: exact
    rng = np.random.default_rng(rule.mc_seed)
    paths = np.abs(paired_t_paths(rng.standard_normal((rule.mc_paths, rule.max_seeds))))
    paths = paths[:, rule.min_seeds - 1:]  # (M, L)
    open_ = paths[:, 0] <= first
    critical = [first]
    for look in range(1, len(increments)):
        # Settle first here in increments[look] of all paths: the (k+1)-th largest |t| among the open.
        k = int(round(increments[look] * rule.mc_paths))
        survivors = paths[open_, look]
        rank = len(survivors) - 1 - k
        c = float(np.partition(survivors, rank)[rank]) if rank >= 0 else 0.0
        critical.append(c)
        open_ &= paths[:, look] <= c
    return tuple(critical)


def critical_values(rule: SequentialRule) -> np.ndarray:
    """c_n for each look (shape (L,)): the look at n settles when |statistic_n| > c_n (paired)."""
    if rule.test == "signed_rank":
        return np.array(signed_rank.boundaries(rule.alpha, rule.min_seeds, rule.max_seeds,
                                               SPENDING[rule.spending])[0])
    # family and curtail do not change the boundaries: one Monte Carlo serves every variant.
    return np.array(_critical_values(dataclasses.replace(rule, family="none", curtail=True)))


def statistic_paths(rule: SequentialRule, differences: np.ndarray) -> np.ndarray:
    """The rule's statistic at each look: (..., N >= min_seeds) differences -> (..., N - min_seeds + 1);
    paired t or the centred signed-rank sum V."""
    d = np.asarray(differences, dtype=float)
    paths = signed_rank.centred_paths(d) if rule.test == "signed_rank" else paired_t_paths(d)
    return paths[..., rule.min_seeds - 1:]


def futility_thresholds(rule: SequentialRule) -> np.ndarray:
    """f_n per look (shape (L,)): with |statistic_n| <= f_n no later look can settle, whatever the
    remaining differences; -inf where that never holds (the last look included: nothing follows).

    t: the largest |t_m| reachable from |t_n| is sqrt(m(m-1) t_n^2 / (n(n-1)) + (m-1)(m-n)/n), so
    the look is futile when t_n^2 <= (c_m^2 - (m-1)(m-n)/n) n(n-1) / (m(m-1)) for every later m.
    Signed-rank: the largest |V_m| is |V_n| + (m(m+1) - n(n+1)) / 4 (the new differences all of
    one sign and above the others in size), so f_n = min over m of c_m - (m(m+1) - n(n+1)) / 4.
    """
    critical, looks = critical_values(rule), rule.looks
    out = np.full(len(looks), -np.inf)
    for i, n in enumerate(looks[:-1]):
        m, c = looks[i + 1:], critical[i + 1:]
        if rule.test == "signed_rank":
            bound = c - (m * (m + 1) - n * (n + 1)) / 4.0
        else:
            square = (c**2 - (m - 1) * (m - n) / n) * n * (n - 1) / (m * (m - 1))
            bound = np.where(square >= 0, np.sqrt(np.maximum(square, 0.0)), -np.inf)
        out[i] = bound.min()
    return out


def first_futile(paths: np.ndarray, futility: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(futile, look) like first_settled: whether some look has |statistic| <= its threshold and
    the first that does. NaN (no spread, no difference) counts as 0."""
    futile = np.abs(np.nan_to_num(paths, nan=0.0)) <= futility
    hit = futile.any(axis=-1)
    return hit, np.where(hit, futile.argmax(axis=-1), paths.shape[-1] - 1)


def first_settled(t_paths: np.ndarray, critical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(settled, look) for t statistics at consecutive looks (..., L) against critical (L,):
    whether any look crosses, and the index of the first that does (the last index when none does).
    The one crossing test shared by the verdicts and the simulations. NaN never crosses."""
    crossed = np.abs(np.nan_to_num(t_paths, nan=0.0)) > critical
    settled = crossed.any(axis=-1)
    look = np.where(settled, crossed.argmax(axis=-1), t_paths.shape[-1] - 1)
    return settled, look


# ----------------------------------------------------------------------------- verdicts


class State(str, enum.Enum):
    FOR = "settled for"  # the cell is better than its comparator
    AGAINST = "settled against"  # the cell is worse
    OPEN = "open"


@dataclass(frozen=True)
class Verdict:
    """One comparison at its current look; AP in whatever unit the values came in."""

    state: State
    n: int  # seeds (pairs when paired) of the deciding look, or all that were judged when open
    difference: float  # mean cell - comparator over those seeds; NaN below 1 seed
    statistic: float  # paired t or Welch t; NaN before the first look
    critical: float  # |statistic| that look had to exceed; NaN before the first look
    paired: bool
    at_max: bool  # n reached max_seeds: an open comparison gets no more seeds
    curtailed: bool = False  # open, and no later look can settle it: it gets no more seeds either

    @property
    def needs_seed(self) -> bool:
        return self.state is State.OPEN and not self.at_max and not self.curtailed

    @property
    def label(self) -> str:
        """The verdict column: "settled for", "settled against", "open at max seeds", "open, cannot
        settle" (curtailed) or "open"."""
        if self.state is not State.OPEN:
            return self.state.value
        return "open, cannot settle" if self.curtailed else "open at max seeds" if self.at_max else "open"

    def text(self) -> str:
        """"settled for at 4 seeds (+3.1)", "open at max seeds (8, +0.4)", "open (2 seeds)"."""
        if self.state is not State.OPEN:
            return f"{self.state.value} at {self.n} seeds ({self.difference:+.1f})"
        if self.curtailed:
            return f"open, cannot settle (stopped at {self.n} seeds, {self.difference:+.1f})"
        if self.at_max:
            return f"open at max seeds ({self.n}, {self.difference:+.1f})"
        return f"open ({self.n} seeds)"


def _state(settled: bool, statistic: float) -> State:
    if not settled:
        return State.OPEN
    return State.FOR if statistic > 0 else State.AGAINST


def judge(rule: SequentialRule, cell: Mapping[int, float], comparator: Mapping[int, float],
          paired: bool = True, futility_rules: Sequence[SequentialRule] = ()) -> Verdict:
    """The verdict of cell against comparator, each {seed: metric} of its finished runs.

    Paired: on the seeds both have, in ascending order, looks at n = min_seeds .. min(common,
    max_seeds). Unpaired: Welch's test on the first k seeds of each side, k = min_seeds ..
    min(len(cell), len(comparator), max_seeds), each look at its share of alpha (union bound).
    NaN values count as missing seeds. futility_rules: curtail only where none of these rules
    (the levels a family may still raise this comparison to) could settle; default: the rule.
    """
    cell = {s: v for s, v in cell.items() if not math.isnan(v)}
    comparator = {s: v for s, v in comparator.items() if not math.isnan(v)}
    if paired:
        seeds = sorted(set(cell) & set(comparator))[: rule.max_seeds]
        d = np.array([cell[s] - comparator[s] for s in seeds], dtype=float)
        return _judge_paired(rule, d, futility_rules or (rule,))
    a = np.array([cell[s] for s in sorted(cell)][: rule.max_seeds], dtype=float)
    b = np.array([comparator[s] for s in sorted(comparator)][: rule.max_seeds], dtype=float)
    return _judge_welch(rule, a, b)


def _judge_paired(rule: SequentialRule, d: np.ndarray, futility_rules: Sequence[SequentialRule]) -> Verdict:
    n = len(d)
    at_max = n >= rule.max_seeds
    if n < rule.min_seeds:
        return Verdict(State.OPEN, n, float(d.mean()) if n else math.nan, math.nan, math.nan, True, at_max)
    t = statistic_paths(rule, d)  # (looks so far,)
    critical = critical_values(rule)[: len(t)]
    settled, look = first_settled(t, critical)
    curtailed = False
    if not settled and rule.curtail:
        futility = np.min([futility_thresholds(r) for r in futility_rules], axis=0)[: len(t)]
        curtailed, futile_look = first_futile(t, futility)
        look = futile_look if curtailed else look
    k = rule.min_seeds + int(look)  # seeds at the deciding (or last) look
    return Verdict(_state(bool(settled), float(t[look])), k, float(d[:k].mean()), float(t[look]),
                   float(critical[look]), True, at_max, bool(curtailed))


def _welch_t(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(t, df) of Welch's test of mean a - mean b; (+-inf, 1) without spread but a difference."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = a.mean() - b.mean()
    if va + vb == 0:
        return (math.copysign(math.inf, diff) if diff else math.nan), 1.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff / math.sqrt(va + vb), df


def _judge_welch(rule: SequentialRule, a: np.ndarray, b: np.ndarray) -> Verdict:
    k_max = min(len(a), len(b))
    at_max = k_max >= rule.max_seeds
    if k_max < rule.min_seeds:
        diff = float(a.mean() - b.mean()) if k_max else math.nan
        return Verdict(State.OPEN, k_max, diff, math.nan, math.nan, False, at_max)
    increments = spending_increments(rule)
    for i, k in enumerate(range(rule.min_seeds, k_max + 1)):
        t, df = _welch_t(a[:k], b[:k])
        critical = float(stats.t.isf(increments[i] / 2.0, df))
        if abs(np.nan_to_num(t)) > critical or k == k_max:
            settled = abs(np.nan_to_num(t)) > critical
            return Verdict(_state(settled, t), k, float(a[:k].mean() - b[:k].mean()), float(t), critical, False, at_max)
    raise AssertionError("unreachable: the last look returns")


# ----------------------------------------------------------------------------- which cells get a seed


def default_comparisons(cells: Sequence[str], baseline: str) -> list[tuple[str, str]]:
    """(cell, baseline) for every cell but the baseline: what an experiment compares by default."""
    return [(cell, baseline) for cell in cells if cell != baseline]


def seeds_to_run(rule: SequentialRule, comparisons: Iterable[tuple[str, str]],
                 verdicts: Mapping[tuple[str, str], Verdict], finished: Mapping[str, Collection[int]],
                 attempted: Mapping[str, Collection[int]], pool: Sequence[int]) -> dict[str, list[int]]:
    """The runs before the next look: {cell: [seed, ...]}, cells with nothing to run left out.

    Every comparison whose verdict `needs_seed` wants its next common seeds: one more, or up to
    min_seeds before the first look. They are the smallest seeds of `pool` that are not yet common
    and not lost on either side (attempted without finishing: diverged or failed, so never
    common); each side runs those it has not attempted. A baseline thus gets a seed whenever any
    comparison against it is open, and a cell shared by two comparisons runs a seed once.
    `finished` and `attempted` map every cell to its seeds; `pool` (ascending) should reach
    beyond max_seeds if lost seeds are to be replaced; when it is used up nothing more is planned.
    """
    plan: dict[str, set[int]] = {}
    for cell, comparator in comparisons:
        verdict = verdicts[(cell, comparator)]
        if not verdict.needs_seed:
            continue
        common = set(finished.get(cell, ())) & set(finished.get(comparator, ()))
        lost = {s for side in (cell, comparator) for s in attempted.get(side, ()) if s not in finished.get(side, ())}
        wanted = max(rule.min_seeds, len(common) + 1) - len(common)
        chosen = [s for s in sorted(pool) if s not in common and s not in lost][:wanted]
        for side in (cell, comparator):
            plan.setdefault(side, set()).update(s for s in chosen if s not in attempted.get(side, ()))
    return {cell: sorted(seeds) for cell, seeds in plan.items() if seeds}


# ----------------------------------------------------------------------------- operating characteristics


@dataclass(frozen=True)
class OperatingCharacteristics:
    """What the rule does on simulated comparisons at one true difference (cell - comparator)."""

    difference: float
    sd: float  # of one seed's metric in each cell (the per-seed difference has sd * sqrt(2))
    settled_for: float  # fraction of comparisons
    settled_against: float
    open_at_max: float
    expected_seeds: float  # mean seeds per cell when the comparison stops
    num_sims: int

    @property
    def power(self) -> float:
        """Settled in the true direction (for when difference > 0, against when < 0)."""
        return self.settled_for if self.difference > 0 else self.settled_against if self.difference < 0 else math.nan

    @property
    def wrong(self) -> float:
        """Settled wrongly: at all when there is no difference, else in the wrong direction."""
        if self.difference == 0:
            return self.settled_for + self.settled_against
        return self.settled_against if self.difference > 0 else self.settled_for


Noise = Callable[[np.random.Generator, tuple[int, int]], np.ndarray]  # (rng, shape) -> unit-scale draws


def simulate(rule: SequentialRule, difference: float, sd: float, num_sims: int, rng: np.random.Generator,
             draw: Noise | None = None) -> OperatingCharacteristics:
    """Operating characteristics from num_sims paired comparisons, vectorised.

    Each cell's per-seed metric is its mean plus independent noise: sd * N(0, 1) by default, or
    sd * draw(rng, shape) for another noise shape (a bimodal one, say). Independent noise per
    cell is conservative for the seeds spent: measured seed pairing only shrinks the spread of
    the differences.
    """
    draw = draw or (lambda g, shape: g.standard_normal(shape))
    shape = (num_sims, rule.max_seeds)
    d = difference + sd * (draw(rng, shape) - draw(rng, shape))  # (S, max_seeds)
    t = statistic_paths(rule, d)  # (S, L)
    settled, look = first_settled(t, critical_values(rule))
    sign = np.sign(np.take_along_axis(t, look[:, None], axis=1)[:, 0])
    seeds = rule.min_seeds + stopping_look(rule, t, settled, look)
    return OperatingCharacteristics(
        difference, sd, float((settled & (sign > 0)).mean()), float((settled & (sign < 0)).mean()),
        float((~settled).mean()), float(seeds.mean()), num_sims)


def stopping_look(rule: SequentialRule, paths: np.ndarray, settled: np.ndarray, look: np.ndarray) -> np.ndarray:
    """The look (index) each path stops at: where it settles, else where it is curtailed (when the
    rule curtails), else the last. paths (S, L); settled, look: first_settled's."""
    if not rule.curtail:
        return look
    futile, futile_look = first_futile(paths, futility_thresholds(rule))
    return np.where(settled, look, np.where(futile, futile_look, look))


def fixed_n_power(n: int, difference: float, sd_difference: float, alpha: float) -> float:
    """Power of a fixed-n two-sided paired t-test at level alpha to find difference > 0 in the
    right direction, n pairs with per-pair differences of sd sd_difference (noncentral t, exact
    under normal noise)."""
    if n < 2:
        return 0.0
    df = n - 1
    return float(stats.nct.sf(stats.t.isf(alpha / 2.0, df), df, abs(difference) * math.sqrt(n) / sd_difference))


def fixed_seeds_for_power(power: float, difference: float, sd_difference: float, alpha: float,
                          limit: int = 1000) -> int:
    """The smallest n (seeds per cell) whose fixed-n paired t-test reaches `power`; limit + 1 if
    none up to `limit` does (a difference too small for the spread)."""
    for n in range(2, limit + 1):
        if fixed_n_power(n, difference, sd_difference, alpha) >= power:
            return n
    return limit + 1


def fixed_equivalent(rule: SequentialRule, oc: OperatingCharacteristics) -> int:
    """Seeds per cell a fixed-n design at the rule's alpha needs for the power the rule reached in
    `oc` (a difference != 0), to set beside oc.expected_seeds."""
    return fixed_seeds_for_power(oc.power, oc.difference, oc.sd * math.sqrt(2.0), rule.alpha)


def planning_table(rule: SequentialRule, differences: Sequence[float], sd: float, num_sims: int = 20_000,
                   seed: int = 0) -> list[dict[str, float]]:
    """One row per true difference: the rule's settle rates, expected seeds per cell, and the
    seeds per cell of the fixed-n paired t-test of the same power (NaN at difference 0). What a
    report sets beside the seeds a comparison actually spent; sd is one cell's seed std, e.g. the
    median of the reports' (1.6 AP), and the differences are the ones worth finding (2 AP is the
    findings' bar)."""
    rng = np.random.default_rng(seed)
    rows = []
    for difference in differences:
        oc = simulate(rule, difference, sd, num_sims, rng)
        rows.append({"difference": difference, "settled_for": oc.settled_for, "settled_against": oc.settled_against,
                     "open_at_max": oc.open_at_max, "expected_seeds": oc.expected_seeds,
                     "fixed_seeds": float(fixed_equivalent(rule, oc)) if difference else math.nan})
    return rows
