"""Outcome guarantees as tabulated monotone functions (the paper's Definition 7 / Lemma 9).

For a clean outcome probability p (or the mean of a [0,1]-valued score) an outcome bound says
``lower(p) <= p' <= upper(p)`` for the poisoned p'. We tabulate both functions on a fixed grid of
p values and evaluate them *conservatively*: ``upper`` at the first grid point >= p and ``lower``
at the last grid point <= p (both are non-decreasing in p). Every operation below — combining
families of (eps, delta) or RDP bounds, chaining through intermediate datasets, mixing over
sub-dataset draws, inverting — maps valid bounds to valid bounds, so a certificate computed
from these tables is as sound as the privacy numbers fed in; the grid only costs tightness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _make_grid() -> np.ndarray:
    tail = np.logspace(-15, -1, 701)
    mid = np.linspace(0.1, 0.9, 4001)
    grid = np.unique(np.concatenate([[0.0], tail, mid, 1.0 - tail, [1.0]]))
    return grid


#: The p grid shared by every table, ascending, from 0 to 1 (shape (G,)).
GRID = _make_grid()


def ceil_index(p: np.ndarray) -> np.ndarray:
    """Index of the first grid point >= p (upper bounds are evaluated there)."""
    return np.minimum(np.searchsorted(GRID, np.asarray(p, dtype=float), side="left"), GRID.size - 1)


def floor_index(p: np.ndarray) -> np.ndarray:
    """Index of the last grid point <= p (lower bounds are evaluated there)."""
    return np.maximum(np.searchsorted(GRID, np.asarray(p, dtype=float), side="right") - 1, 0)


@dataclass(frozen=True)
class OutcomeBound:
    """lower[i] <= p' <= upper[i] whenever the clean p equals GRID[i]; both shape (G,)."""

    lower: np.ndarray
    upper: np.ndarray

    def upper_at(self, p: np.ndarray) -> np.ndarray:
        return self.upper[ceil_index(p)]

    def lower_at(self, p: np.ndarray) -> np.ndarray:
        return self.lower[floor_index(p)]


def identity() -> OutcomeBound:
    return OutcomeBound(GRID.copy(), GRID.copy())


def trivial() -> OutcomeBound:
    """No information: 0 <= p' <= 1."""
    return OutcomeBound(np.zeros_like(GRID), np.ones_like(GRID))


def regularise(b: OutcomeBound) -> OutcomeBound:
    """Clip to [0, 1] and make both functions non-decreasing in p, only loosening them.

    upper[i] -> max_{j<=i} upper[j] and lower[i] -> min_{j>=i} lower[j]; each new value is
    at least as loose as the old one at the same point, so validity is kept.
    """
    upper = np.maximum.accumulate(np.clip(b.upper, 0.0, 1.0))
    lower = np.minimum.accumulate(np.clip(b.lower, 0.0, 1.0)[::-1])[::-1]
    return OutcomeBound(lower, upper)


def with_complements(b: OutcomeBound) -> OutcomeBound:
    """Tighten with the complementary event: p' = 1 - (1-p)' gives
    upper(p) <= 1 - lower(1 - p) and lower(p) >= 1 - upper(1 - p).

    Valid whenever the bound holds for every event (or [0,1]-valued score) under the same pair
    of datasets, since 1 - f is one too. For an (eps, delta) profile this is what the
    negative-eps part of the profile would give; for RDP it is the Hölder bound on 1 - p.
    """
    flipped = 1.0 - GRID
    upper = np.minimum(b.upper, 1.0 - b.lower[floor_index(flipped)])
    lower = np.maximum(b.lower, 1.0 - b.upper[ceil_index(flipped)])
    return regularise(OutcomeBound(lower, upper))


def _min_line_index(slopes: np.ndarray, intercepts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """For each x, the index of a line attaining min_i slopes_i x + intercepts_i; shape x.

    The lower envelope of the lines (a monotone convex-hull sweep over slopes, written here
    because numpy/scipy have no envelope of lines): O(E log E + X log E) instead of the
    O(E X) of evaluating every line everywhere. Callers evaluate the chosen line with their
    own formula; since every line is a valid bound on its own, a rounding slip in the sweep
    can only pick a slightly looser line, never an invalid one.
    """
    order = np.lexsort((intercepts, -slopes))  # slope descending, then intercept ascending
    hull: list[int] = []
    for i in order:
        a, b = slopes[i], intercepts[i]
        if hull and a == slopes[hull[-1]]:
            continue  # same slope, larger intercept: never below
        while len(hull) >= 2:
            j, k = hull[-2], hull[-1]
            # k is useless if the new line overtakes j no later than k does
            if (intercepts[k] - intercepts[j]) * (slopes[j] - a) < \
                    (b - intercepts[j]) * (slopes[j] - slopes[k]):
                break
            hull.pop()
        hull.append(int(i))
    h = np.asarray(hull)
    breaks = (intercepts[h[1:]] - intercepts[h[:-1]]) / (slopes[h[:-1]] - slopes[h[1:]])
    return h[np.searchsorted(breaks, x)]


def from_profile(eps: np.ndarray, delta: np.ndarray, *, complements: bool = True
                 ) -> OutcomeBound:
    """Bounds from a family of (eps_i, delta_i) guarantees valid in both directions.

    p' <= min_i e^eps_i p + delta_i and p' >= max_i e^-eps_i (p - delta_i). With the full
    privacy profile this is the tightest bound the mechanism allows. Shapes (E,), (E,).
    """
    eps = np.asarray(eps, dtype=float)
    delta = np.asarray(delta, dtype=float)
    ok = np.isfinite(eps) & (delta < 1.0)  # other pairs say nothing
    if not np.any(ok):
        return trivial()
    eps, delta = eps[ok], delta[ok]
    with np.errstate(over="ignore"):
        up_slope, lo_slope = np.exp(eps), np.exp(-eps)
    i = _min_line_index(up_slope, delta, GRID)
    j = _min_line_index(-lo_slope, lo_slope * delta, GRID)  # max of lines = -min of -lines
    upper = up_slope[i] * GRID + delta[i]
    lower = lo_slope[j] * (GRID - delta[j])
    b = regularise(OutcomeBound(lower, upper))
    return with_complements(b) if complements else b


def from_rdp(orders: np.ndarray, eps: np.ndarray, *, complements: bool = True) -> OutcomeBound:
    """Bounds from an RDP curve valid in both directions (Hölder; Lemma 9 of the paper).

    p' <= min_a (e^eps_a p)^((a-1)/a) and p' >= max_a e^-eps_a p^(a/(a-1)); orders with
    infinite eps are skipped. Holds for [0,1]-valued score expectations as well.
    ``complements=False`` reproduces the paper, which does not use complementary events.
    """
    ok = np.isfinite(eps)
    if not np.any(ok):
        return trivial()
    a = np.asarray(orders, dtype=float)[ok][None, :]
    e = np.asarray(eps, dtype=float)[ok][None, :]
    p = GRID[:, None]
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    with np.errstate(over="ignore"):
        upper = np.min(np.exp((a - 1.0) / a * (e + logp)), axis=1)
    lower = np.max(np.exp(-e + a / (a - 1.0) * logp), axis=1)
    b = regularise(OutcomeBound(lower, upper))
    return with_complements(b) if complements else b


def tighter(*bounds: OutcomeBound) -> OutcomeBound:
    """Pointwise best of several valid bounds (each is valid, so is their intersection)."""
    return OutcomeBound(
        np.max([b.lower for b in bounds], axis=0), np.min([b.upper for b in bounds], axis=0)
    )


def looser(*bounds: OutcomeBound) -> OutcomeBound:
    """Pointwise worst of several bounds: valid for the union of their threat sets."""
    return OutcomeBound(
        np.min([b.lower for b in bounds], axis=0), np.max([b.upper for b in bounds], axis=0)
    )


def chain(second: OutcomeBound, first: OutcomeBound) -> OutcomeBound:
    """Bound for a change made in two steps D -> D'' -> D' (``first`` then ``second``).

    upper(p) = second.upper(first.upper(p)) since both are non-decreasing; the inner value is
    rounded up to the grid for the upper bound and down for the lower one.
    """
    return OutcomeBound(
        second.lower[floor_index(first.lower)], second.upper[ceil_index(first.upper)]
    )


def mixture(weights: np.ndarray, bounds: list[OutcomeBound]) -> OutcomeBound:
    """sum_j w_j bound_j, with the missing mass 1 - sum w_j given the trivial bound.

    Used for sub-dataset training: given j changed examples in an instance's subset, the
    instance obeys bound_j; the true upper (lower) bounds are concave (convex) in p, so by
    Jensen the mixture over j of bounds at the clean p bounds the mixed outcome.
    """
    w = np.asarray(weights, dtype=float)
    missing = max(0.0, 1.0 - float(w.sum()))
    upper = sum(wj * b.upper for wj, b in zip(w, bounds, strict=True)) + missing
    lower = sum(wj * b.lower for wj, b in zip(w, bounds, strict=True))
    return regularise(OutcomeBound(np.asarray(lower), np.asarray(upper)))


def reverse(b: OutcomeBound) -> OutcomeBound:
    """From a bound on p in terms of p' to a bound on p' in terms of p.

    Given p >= b.lower(p') and p <= b.upper(p') (both non-decreasing), p' is at most the
    smallest grid point y with b.lower(y) > p and at least the largest y with b.upper(y) < p.
    """
    lo = regularise(b)
    # upper: first grid index whose lower-bound value exceeds p; if none, 1.
    idx_u = np.searchsorted(lo.lower, GRID, side="right")
    upper = np.where(idx_u < GRID.size, GRID[np.minimum(idx_u, GRID.size - 1)], 1.0)
    # lower: last grid index whose upper-bound value is below p; if none, 0.
    idx_l = np.searchsorted(lo.upper, GRID, side="left") - 1
    lower = np.where(idx_l >= 0, GRID[np.maximum(idx_l, 0)], 0.0)
    return regularise(OutcomeBound(lower, upper))
