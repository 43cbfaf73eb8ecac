"""Confidence bounds on the clean label probabilities from P trained instances.

Every method returns, per test point, the predicted label, a lower bound ``p_lower`` on the
top label's probability and an upper bound ``p_upper`` on the largest probability of the other
labels, holding together with probability >= 1 - eta over the training randomness.

Each sound method combines one-sided bounds per label, each at level ``a`` (:func:`bound_level`):

* votes, ``simuem`` (after Jia, Cao, Gong 2020): one-sided Clopper-Pearson per label.
* scores, ``hoeffding``: one-sided Hoeffding per label, half-width sqrt(ln(1 / a) / (2 P)).
* scores, ``bernstein``: empirical Bernstein (Maurer & Pontil 2009, Thm 4) per label:
  mean +- sqrt(2 V ln(2 / a) / P) + 7 ln(2 / a) / (3 (P - 1)), V the sample variance.
* ``paper``: the public code's choices, for comparison only: a normal-approximation interval per
  class with no correction over classes (votes) and a Student-t interval (scores) — neither is a
  valid finite-sample bound.

Why ``a = eta / (L + 2)`` and not the Bonferroni ``eta / L`` of SimuEM as published: the top
label is chosen from the same samples, so the lower bound used is that of a random label, and
the upper bound used is that of the runner-up — the bounds that can fail are the L lower bounds
*and* upper bounds. Only two upper bounds matter, though: with l1, l2 the two labels of largest
true probability, the bound on the others fails only if the upper bound of l1 fails (when l1 is
not the top label) or that of l2 (when it is). So the failures lie in L + 2 fixed one-sided
events. With a = eta / L the union can exceed eta: for votes with true probabilities
(0.4, 0.4, 0.2), P = 200, eta = 0.2 it is 0.208 (computed exactly, tests/test_bounds.py). With two
labels whose vote shares sum to one, the upper bound of the other label is one minus the lower
bound of the top one, so only the two lower bounds can fail: a = eta / 2.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dpcert.errors import InputWarning, UserError
from dpcert.store import instance_blocks

VOTE_METHODS = ("simuem", "paper")
SCORE_METHODS = ("bernstein", "hoeffding", "paper")


@dataclass(frozen=True)
class ConfidenceBounds:
    """Per-point prediction (N,), lower bound of its probability (N,), upper bound of the
    runner-up's (N,)."""

    prediction: np.ndarray
    p_lower: np.ndarray
    p_upper: np.ndarray


#: Smallest supported eta: below it eta / (L + 2) is a subnormal float, where scipy's beta quantiles
#: (Clopper-Pearson) stop converging and lose their guaranteed direction.
MIN_ETA = 1e-300


def _check_eta(eta: float) -> None:
    if not (isinstance(eta, float | int) and MIN_ETA <= eta < 1.0):
        raise UserError(f"eta must lie in [{MIN_ETA:g}, 1), got {eta}")


def bound_level(eta: float, n_labels: int, *, shares: bool) -> float:
    """Level of each one-sided per-label bound such that the bounds the certificate uses hold
    together with probability >= 1 - eta: eta / (L + 2), or eta / 2 when there are two labels
    whose probabilities sum to one (``shares``: vote shares). See the module docstring."""
    return eta / 2 if shares and n_labels == 2 else eta / (n_labels + 2)


def _top_two(lower: np.ndarray, upper: np.ndarray | None, top: np.ndarray) -> ConfidenceBounds:
    """``upper`` None: two labels whose probabilities sum to one, so p_upper = 1 - p_lower."""
    n = np.arange(len(top))
    p1 = np.clip(lower[n, top], 0.0, 1.0)
    if upper is None:
        return ConfidenceBounds(top.astype(np.int64), p1, 1.0 - p1)
    others = upper.copy()
    others[n, top] = -np.inf
    p2 = np.minimum(np.clip(others.max(axis=1), 0.0, 1.0), 1.0 - p1)
    return ConfidenceBounds(top.astype(np.int64), p1, p2)


def check_vote_counts(counts: np.ndarray) -> None:
    """Refuse anything but non-negative integer counts (integer or integral float dtype):
    Clopper-Pearson is exact for binomial counts only."""
    if not (np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
        raise UserError(f"vote counts must be numbers, got dtype {counts.dtype}")
    if not (np.all(counts >= 0) and np.all(np.isfinite(counts))
            and np.all(counts == np.round(counts))):
        raise UserError("vote counts must be non-negative integers")


def suspicious_votes(counts: np.ndarray) -> list[str]:
    """Why vote counts (N, L) look unlike an ensemble's votes, if they do: every row should
    count the votes of the same P instances, so all rows have one total."""
    rows = counts.sum(axis=1)
    if rows.size < 2 or rows.min() == rows.max():
        return []
    cols = counts.sum(axis=0)
    if counts.shape[1] >= 2 and cols.min() == cols.max():
        return [f"votes of shape {counts.shape} look transposed: the columns all sum to "
                f"{cols[0]:g} but the rows do not; votes are (N points, L labels) — pass "
                "votes.T if the rows are labels"]
    return [f"rows have different vote totals ({rows.min():g} to {rows.max():g}); each row "
            "should count the votes of the same P instances (each row is certified with its "
            "own total)"]


def check_unit_interval(scores: np.ndarray) -> None:
    """Refuse scores outside [0, 1], NaN or infinite (min/max are NaN if any value is): the
    Hoeffding and Bernstein bounds hold for [0, 1]-valued variables only."""
    if scores.size and not (scores.min() >= 0.0 and scores.max() <= 1.0):
        raise UserError("scores must be finite numbers in [0, 1] (softmax outputs)")


def vote_bounds(counts: np.ndarray, eta: float, method: str = "simuem") -> ConfidenceBounds:
    """Bounds from vote counts, shape (N, L), each row summing to the number of instances P."""
    _check_eta(eta)
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] < 2:
        raise UserError(f"vote counts must have shape (N, L) with L >= 2, got {counts.shape}")
    check_vote_counts(counts)
    total = counts.sum(axis=1, keepdims=True).astype(float)
    if np.any(total <= 0):
        raise UserError("every test point needs at least one vote")
    for message in suspicious_votes(counts):
        warnings.warn(message, InputWarning, stacklevel=3)
    n_labels = counts.shape[1]
    top = np.argmax(counts, axis=1)  # ties go to the smallest label
    c = counts.astype(float)
    if method == "simuem":
        a = bound_level(eta, n_labels, shares=True)
        with np.errstate(invalid="ignore"):
            lower = np.where(c > 0, stats.beta.ppf(a, c, total - c + 1), 0.0)
            if n_labels == 2:
                return _top_two(lower, None, top)
            upper = np.where(c < total, stats.beta.ppf(1 - a, c + 1, total - c), 1.0)
    elif method == "paper":
        # statsmodels proportion_confint(count, n, alpha=eta/2, method="normal"), counts clamped.
        z = stats.norm.ppf(1 - eta / 4)
        phat = np.clip(c, 1e-10, total - 1e-10) / total
        half = z * np.sqrt(phat * (1 - phat) / total)
        lower, upper = phat - half, phat + half
    else:
        raise UserError(f"vote bound must be one of {VOTE_METHODS}, got {method!r}")
    return _top_two(lower, upper, top)


def _mean_and_variance(scores: np.ndarray, need_variance: bool,
                       chunk_values: int = 2**24) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and unbiased variance over axis 0 of (P, N, L), in float64, a block of instances
    at a time (a memory-mapped scores.npy of any P fits): the two-pass algorithm — the sum,
    then the sum of squared deviations from the mean — as numpy's own var, never the
    cancellation-prone sum of squares (an underestimated variance would make the Bernstein
    bound unsound)."""
    p = scores.shape[0]
    total = np.zeros(scores.shape[1:])
    for block in instance_blocks(scores, chunk_values):
        check_unit_interval(block)
        total += block.sum(axis=0, dtype=np.float64)
    mean = total / p
    if not need_variance:
        return mean, None
    squares = np.zeros(scores.shape[1:])
    for block in instance_blocks(scores, chunk_values):
        dev = block.astype(np.float64) - mean
        squares += np.einsum("pnl,pnl->nl", dev, dev)
    return mean, squares / (p - 1)


def score_bounds(scores: np.ndarray, eta: float, method: str = "bernstein") -> ConfidenceBounds:
    """Bounds from per-instance softmax scores, shape (P, N, L), values in [0, 1]."""
    _check_eta(eta)
    if not (isinstance(scores, np.ndarray) and np.issubdtype(scores.dtype, np.floating)):
        scores = np.asarray(scores, dtype=float)
    if scores.ndim != 3 or scores.shape[2] < 2:
        raise UserError(f"scores must have shape (P, N, L) with L >= 2, got {scores.shape}")
    n_inst, _, n_labels = scores.shape
    if n_inst < 2:
        raise UserError("score bounds need at least 2 instances")
    if method not in SCORE_METHODS:
        raise UserError(f"score bound must be one of {SCORE_METHODS}, got {method!r}")
    mean, var = _mean_and_variance(scores, need_variance=method != "hoeffding")
    top = np.argmax(mean, axis=1)
    # scores need not sum to one (any values in [0, 1]), so no two-label shortcut
    a = bound_level(eta, n_labels, shares=False)
    if method == "hoeffding":
        half = np.sqrt(np.log(1 / a) / (2 * n_inst))
        lower, upper = mean - half, mean + half
    elif method == "bernstein":
        assert var is not None  # computed for every method but hoeffding
        log_term = np.log(2 / a)
        half = np.sqrt(2 * var * log_term / n_inst) + 7 * log_term / (3 * (n_inst - 1))
        lower, upper = mean - half, mean + half
    else:  # "paper"
        assert var is not None
        sem = np.sqrt(var) / np.sqrt(n_inst)
        half = sem * stats.t.ppf(1 - eta / 2, n_inst - 1)
        lower, upper = mean - half, mean + half
    return _top_two(lower, upper, top)
