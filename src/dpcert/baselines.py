"""Certificates of the peer defences, from vote counts (radius = insertions + deletions).

* DPA (Levine & Feizi, ICLR 2021): k models on a deterministic hash partition; each poisoned
  example changes one partition, i.e. at most one vote, moving the gap by at most 2:
  radius = floor((n_c - max_{c' != c} (n_c' + [c' < c])) / 2).
* Finite Aggregation (Wang, Levine, Feizi 2022), count-only form: k d models on d-fold
  overlapping bucket groups; one poisoned example lands in one bucket and so reaches at most
  d models: radius = floor((n_c - max_{c' != c} (n_c' + [c' < c])) / (2 d)). (The full FA
  certificate also needs which model voted what; with counts alone this is the sound bound.)
* Bagging (Jia, Cao, Gong, AAAI 2021): N models on k examples drawn with replacement from n;
  certified at r iff max_{n-r <= n' <= n+r} (n'/n)^k - 2 ((max(n, n') - r)/n)^k + 1
  - p1_lo + p2_hi < 0 with SimuEM bounds. The left side minus the p terms depends only on
  (n, k, r), so it is tabulated once and every point is searched at once.
* Statistical DP baseline (Ma, Zhu, Hsu 2019): a certified-*accuracy* lower bound (not a
  pointwise certificate) from an (eps, delta)-DP learner and a lower bound on its accuracy:
  CA_r >= max(e^(-r eps) (acc_lo + delta / (e^eps - 1)) - delta / (e^eps - 1), 0).
"""

from __future__ import annotations

import numpy as np

from dpcert.bounds import vote_bounds
from dpcert.certify import ABSTAIN
from dpcert.errors import UserError

METHODS = ("dp", "bagging", "dpa", "fa")


def _gap(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prediction (ties to the smaller label) and n_c - max_{c' != c}(n_c' + [c' < c])."""
    counts = np.asarray(counts, dtype=np.int64)
    pred = np.argmax(counts, axis=1)
    n = np.arange(len(counts))
    labels = np.arange(counts.shape[1])[None, :]
    rivals = counts + (labels < pred[:, None])
    rivals[n, pred] = np.iinfo(np.int64).min
    return pred, counts[n, pred] - rivals.max(axis=1)


def dpa_radius(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) for DPA vote counts (N, L), one vote per partition model."""
    pred, gap = _gap(counts)
    return pred, np.floor_divide(gap, 2)


def fa_radius(counts: np.ndarray, spread: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) for Finite Aggregation counts with spread d (count-only bound)."""
    if not (isinstance(spread, int | np.integer) and spread >= 1):
        raise UserError(f"--spread must be a positive integer, got {spread!r}")
    pred, gap = _gap(counts)
    return pred, np.floor_divide(gap, 2 * int(spread))


def bagging_threshold(n: int, k: int, max_radius: int) -> np.ndarray:
    """t[r] = 1 + max_{n-r <= n' <= n+r} (n'/n)^k - 2 ((max(n,n') - r)/n)^k, r = 0..max_radius.

    Certified at r iff p1_lo - p2_hi > t[r]. Non-decreasing in r (enforced by a running max,
    which only makes certification harder)."""
    out = np.empty(max_radius + 1)
    for r in range(max_radius + 1):
        nprime = np.arange(max(n - r, 0), n + r + 1, dtype=float)
        with np.errstate(divide="ignore"):
            first = np.exp(k * np.log(nprime / n))
            second = np.exp(k * np.log(np.maximum(np.maximum(n, nprime) - r, 0.0) / n))
        out[r] = 1.0 + np.max(first - 2.0 * second)
    return np.maximum.accumulate(out)


def bagging_radius(counts: np.ndarray, *, train_size: int, subsample_size: int, eta: float,
                   max_radius: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) for bagging votes (N, L) with SimuEM bounds at level 1 - eta."""
    if not (isinstance(train_size, int) and train_size >= 1):
        raise UserError(f"--train-size must be a positive integer, got {train_size!r}")
    if not (isinstance(subsample_size, int) and subsample_size >= 1):
        raise UserError(f"--subsample-size must be a positive integer, got {subsample_size!r}")
    conf = vote_bounds(counts, eta)
    margin = conf.p_lower - conf.p_upper
    t = bagging_threshold(train_size, subsample_size, max_radius)
    # largest r with margin > t[r]; t is non-decreasing, t[0] = 0
    radius = np.searchsorted(t, margin, side="left") - 1
    radius = np.where(margin > 0, radius, ABSTAIN)
    return conf.prediction, radius.astype(np.int64)


def dp_baseline_accuracy(radii: np.ndarray, eps: float, delta: float, acc_lower: float
                         ) -> np.ndarray:
    """Ma et al. (2019) certified-accuracy lower bound at each radius (shape radii.shape)."""
    r = np.asarray(radii, dtype=float)
    c = delta / np.expm1(eps)
    return np.maximum(np.exp(-r * eps) * (acc_lower + c) - c, 0.0)
