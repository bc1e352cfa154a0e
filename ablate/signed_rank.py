"""The exact group-sequential Wilcoxon signed-rank test: boundaries by enumeration, statistics per look.

The distribution-free option of `--until-settled` (`test = "signed_rank"`). It asks whether the
cell is better *on a typical seed*: under its null the per-seed differences are symmetric about 0
(any distribution, one collapsed seed included); it settles when the differences lean to one side
in rank, whatever their size. It does not ask whether the *mean* AP differs: a cell that is +2.5
AP on 7 seeds of 8 and collapses by 20 on the eighth has mean difference 0 and is better on a
typical seed, and this test may say so.

Statistic at look n: the centred signed-rank sum V_n = W+_n - n(n+1)/4, where W+_n sums the ranks
of |d_1|..|d_n| (among the first n) of the positive differences; |V_n| > c_n settles.

Boundaries, exactly: under the null the signs are fair coins and the order of the |d| is a uniform
random permutation, independent of the signs, so the process (V_min, ..., V_max) has one
distribution whatever the noise. It is enumerated as a Markov chain on the set of ranks that are
positive (a bit mask of n bits): the next difference takes rank r in 1..n+1 (each 1/(n+1)),
pushing the ranks >= r up by one, and is positive with probability 1/2. 2^n states at look n
(256 at 8 seeds); no Monte Carlo. V_n is discrete, so each look spends what the spending function
allows *cumulatively*: c_n is the smallest value whose first-crossing probability, added to what
the earlier looks spent, stays within alpha(n / max_seeds). What a look cannot spend carries to
the next; the total spent is at most alpha, exactly.

Ties among |d| take average ranks and a zero difference counts half a rank each way (adding 0 to
V): the enumeration assumes neither, so they make the test approximate; AP differences of two
trained cells are practically never tied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

MAX_SEEDS = 16  # 2^16 states at the last look: the enumeration stays well under a second


def centred_paths(differences: np.ndarray) -> np.ndarray:
    """V_n = W+_n - n(n+1)/4 of each prefix: (..., N) per-seed differences -> (..., N), [..., n-1]
    over the first n. Ties take average ranks; zeros add 0.

    Vectorised by pairwise comparison rather than a sort per prefix: the rank of |d_j| among the
    first n is 1 + #{i < n: |d_i| < |d_j|} + (#{i < n, i != j: |d_i| = |d_j|}) / 2, a cumulative sum
    over i of an (N, N) table."""
    d = np.asarray(differences, dtype=float)
    a = np.abs(d)
    below = (a[..., :, None] < a[..., None, :]) + 0.5 * (a[..., :, None] == a[..., None, :])  # (..., i, j)
    ranks = np.cumsum(below, axis=-2) + 0.5  # [..., n-1, j]: rank of j among the first n (for j < n)
    n = d.shape[-1]
    mask = np.tril(np.ones((n, n)))  # [n-1, j] = 1 where j < n
    return 0.5 * ((ranks * np.sign(d)[..., None, :]) * mask).sum(axis=-1)


def _grow(masses: np.ndarray, n: int) -> np.ndarray:
    """The chain's step from n to n + 1 differences: masses over the 2^n masks of positive ranks
    (bit r - 1 set when rank r is positive) -> masses over the 2^(n+1) masks."""
    masks = np.arange(2**n)
    out = np.zeros(2 ** (n + 1))
    for r in range(1, n + 2):  # the new difference's rank among n + 1
        low = masks & ((1 << (r - 1)) - 1)
        moved = low | ((masks >> (r - 1)) << r)  # ranks >= r move up by one
        share = masses / (2.0 * (n + 1))
        np.add.at(out, moved, share)  # the new one negative
        np.add.at(out, moved | (1 << (r - 1)), share)  # positive
    return out


def _centred_of_masks(n: int) -> np.ndarray:
    """V_n of each of the 2^n masks: (sum of the set ranks) - n(n+1)/4. Shape (2^n,)."""
    masks = np.arange(2**n)
    w_plus = sum(((masks >> (r - 1)) & 1) * r for r in range(1, n + 1))
    return w_plus - n * (n + 1) / 4.0


@functools.lru_cache(maxsize=32)
def boundaries(alpha: float, min_seeds: int, max_seeds: int,
               spending: Callable[[np.ndarray, float], np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(c_n for n = min_seeds..max_seeds, the null probability of settling first at each look).

    c_n is a half-integer between V's values, so |V_n| > c_n is unambiguous; a look that can
    spend nothing gets c_n = n(n+1)/4 (no |V_n| exceeds it)."""
    if max_seeds > MAX_SEEDS:
        raise ValueError(f"the exact signed-rank enumeration goes to {MAX_SEEDS} seeds, not {max_seeds}")
    looks = np.arange(min_seeds, max_seeds + 1)
    allowed = spending(looks / max_seeds, alpha)  # cumulative
    masses = np.array([1.0])  # no difference yet: the empty mask
    spent, critical, first = 0.0, [], []
    for n in range(1, max_seeds + 1):
        masses = _grow(masses, n - 1)
        if n < min_seeds:
            continue
        v = np.abs(_centred_of_masks(n))
        # Candidate cuts, from the most extreme down: settle when |V| > cut.
        values = np.unique(v)[::-1]  # descending
        cut, mass_out = n * (n + 1) / 4.0, 0.0
        for value in values[:-1] if len(values) > 1 else []:
            below = values[values < value].max()
            candidate = float(masses[v > below].sum())
            if spent + candidate > allowed[n - min_seeds] * (1 + 1e-12):
                break
            cut, mass_out = (value + below) / 2.0, candidate
        critical.append(cut)
        first.append(mass_out)
        spent += mass_out
        masses = np.where(v > cut, 0.0, masses)  # settled paths leave the chain
    return tuple(critical), tuple(first)
