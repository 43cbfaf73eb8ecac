"""Pointwise certificates (Theorem 10 of Liu et al. 2023), vectorised over test points.

A test point is certified at radius r when, for every poisoned training set within r changes,
the lower outcome bound of its top label stays above the upper outcome bound of every other
label: lower_r(p_lower) > upper_r(p_upper). Its radius is the largest such r (the condition is
monotone in r because the group tables are), or :data:`ABSTAIN` when p_lower <= p_upper.

The search walks r = 1, 2, ... once for all points together: at each r only the points still
certified are tested, and only at the distinct grid cells their bounds fall in; the group tables
for r are computed (or read from the cache) once and shared by every point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpcert import outcomes
from dpcert.accounting import AccountingSpec, GroupBounds, default_cache_dir
from dpcert.bounds import ConfidenceBounds, score_bounds, vote_bounds
from dpcert.errors import UserError
from dpcert.mechanism import MechanismRecord

#: Radius of a point whose prediction is not even certified without poisoning.
ABSTAIN = -1
INFERENCES = ("multinomial", "scores")


@dataclass(frozen=True)
class Certificates:
    """Per test point: prediction (N,), certified radius (N,; ABSTAIN = -1), and the
    confidence bounds p_lower (top label) and p_upper (runner-up) they rest on."""

    prediction: np.ndarray
    radius: np.ndarray
    p_lower: np.ndarray
    p_upper: np.ndarray

    def __len__(self) -> int:
        return len(self.radius)


def search_radius(conf: ConfidenceBounds, bounds: GroupBounds, *, max_radius: int,
                  progress: bool = False) -> np.ndarray:
    """Largest certified r <= max_radius for every point, ABSTAIN where p_lower <= p_upper."""
    radius = np.full(conf.p_lower.shape, ABSTAIN, dtype=np.int64)
    alive = conf.p_lower > conf.p_upper
    radius[alive] = 0
    lo_idx = outcomes.floor_index(conf.p_lower)
    up_idx = outcomes.ceil_index(conf.p_upper)
    bar = _progress_bar(progress, max_radius)
    r = 1
    while r <= max_radius and alive.any():
        ids = np.flatnonzero(alive)
        ul, inv_l = np.unique(lo_idx[ids], return_inverse=True)
        uu, inv_u = np.unique(up_idx[ids], return_inverse=True)
        low, up = bounds.any_change(r, ul, uu)
        ok = low[inv_l] > up[inv_u]
        radius[ids[ok]] = r
        alive[ids[~ok]] = False
        if bar is not None:
            bar.update(1)
            bar.set_postfix(certified=int(ok.sum()))
        r += 1
    if bar is not None:
        bar.close()
    return radius


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="certifying radius", unit="r", leave=False)


def confidence_bounds(outputs: np.ndarray, *, inference: str, eta: float,
                      bound: str | None = None) -> ConfidenceBounds:
    """Votes (N, L) -> SimuEM (or ``bound``); scores (P, N, L) -> Bernstein (or ``bound``)."""
    if inference == "multinomial":
        return vote_bounds(outputs, eta, bound or "simuem")
    if inference == "scores":
        return score_bounds(outputs, eta, bound or "bernstein")
    raise UserError(f"inference must be one of {INFERENCES}, got {inference!r}")


def certify(outputs: np.ndarray, mechanism: MechanismRecord, *, inference: str = "multinomial",
            accounting: str = "pld", group: str = "sound", eta: float = 1e-3,
            bound: str | None = None, max_radius: int = 1000,
            cache_dir: Path | None | str = "default", progress: bool = False,
            spec: AccountingSpec | None = None) -> Certificates:
    """Certify every test point of an ensemble's outputs.

    Args:
        outputs: vote counts (N, L) for ``inference="multinomial"``, or per-instance softmax
            scores (P, N, L) for ``inference="scores"``.
        mechanism: the record of what training ran (q, sigma, T, dataset sizes).
        accounting: "pld" (default; tightest), "rdp" or "adp".
        group: "sound" (default) or "paper" (the published, unsound group privacy).
        eta: the certificates hold with probability >= 1 - eta over the training randomness.
        bound: confidence-bound method (see :mod:`dpcert.bounds`); default per inference.
        max_radius: largest radius searched.
        cache_dir: folder for the group tables; "default" uses $DPCERT_CACHE or
            ~/.cache/dpcert, None keeps them in memory.
        progress: show a progress bar.
        spec: full accounting specification (overrides ``accounting``/``group``/``max_radius``).

    Returns:
        :class:`Certificates` with prediction and radius per point (radius -1 = abstain).
    """
    spec = spec or AccountingSpec(accounting=accounting, group=group, max_radius=max_radius)
    conf = confidence_bounds(outputs, inference=inference, eta=eta, bound=bound)
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    bounds = GroupBounds(mechanism, spec, cache_dir=Path(cache) if cache is not None else None)
    radius = search_radius(conf, bounds, max_radius=spec.max_radius, progress=progress)
    return Certificates(conf.prediction, radius, conf.p_lower, conf.p_upper)


def certified_radius_of_truth(cert: Certificates, labels: np.ndarray) -> np.ndarray:
    """Radius when the prediction is correct, -1 otherwise (shape (N,))."""
    labels = np.asarray(labels)
    if labels.shape != cert.radius.shape:
        raise UserError(f"labels have shape {labels.shape}, expected {cert.radius.shape}")
    return np.where(cert.prediction == labels, cert.radius, ABSTAIN)


def certified_accuracy(cert: Certificates, labels: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """CA_r: fraction of points correctly predicted with certified radius >= r, per r."""
    good = certified_radius_of_truth(cert, labels)
    radii = np.atleast_1d(np.asarray(radii))
    return (good[None, :] >= radii[:, None]).mean(axis=1)


def radius_summary(cert: Certificates, labels: np.ndarray) -> dict[str, float]:
    """Clean accuracy, median and maximum of the per-point radius (-1 when wrong/abstained)."""
    good = certified_radius_of_truth(cert, labels)
    return {
        "accuracy": float(np.mean(cert.prediction == np.asarray(labels))),
        "median_radius": float(np.median(good)),
        "max_radius": int(good.max()) if good.size else ABSTAIN,
    }
