"""Pointwise certificates (Theorem 10 of Liu et al. 2023), vectorised over test points.

A test point is certified at radius r when, for every poisoned training set within r changes,
the lower outcome bound of its top label stays above the upper outcome bound of every other
label: lower_r(p_lower) > upper_r(p_upper). Its radius is the largest such r (the condition is
monotone in r because the group tables are), or :data:`ABSTAIN` when p_lower <= p_upper.

Search (:func:`search_radius`). Points are reduced to their distinct pairs of grid cells (lower
bound cell, upper bound cell); certification is monotone in both cells and in r. First the
radius of the best pair (highest lower cell, lowest upper cell), an upper bound on every radius,
is found: by walking r = 1, 2, ... where the tables must be built in order anyway (the sound
modes chain every split of insertions and deletions), by galloping (1, 2, 4, ...) and bisecting
where a table can be computed for any r alone (the paper modes). Then every pair is bisected
inside [0, that radius], all pairs sharing each probe: at a probe r the table is evaluated once,
at the cells of the pairs whose bracket contains r. :func:`search_radius_linear`, the walk over
every r, is kept as the reference the bisection is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpcert.certification import outcomes
from dpcert.certification.accounting import AccountingSpec, GroupBounds, default_cache_dir
from dpcert.certification.bounds import ConfidenceBounds, score_bounds, vote_bounds
from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError

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
    """Largest certified r <= max_radius for every point, ABSTAIN where p_lower <= p_upper.

    Gallop-and-bisect over r shared by all points (see the module docstring); identical to
    :func:`search_radius_linear` whenever the tables are monotone in r.
    """
    radius = np.full(conf.p_lower.shape, ABSTAIN, dtype=np.int64)
    ids = np.flatnonzero(conf.p_lower > conf.p_upper)
    if ids.size == 0:
        return radius
    cells = np.stack([outcomes.floor_index(conf.p_lower[ids]),
                      outcomes.ceil_index(conf.p_upper[ids])])
    (lo_cell, up_cell), inverse = np.unique(cells, axis=1, return_inverse=True)
    bar = _progress_bar(progress, None)
    top = _best_radius(bounds, int(lo_cell.max()), int(up_cell.min()), max_radius, bar)
    # Invariant: pair j is certified at lo[j] and not at hi[j] (hi = top + 1 is never probed).
    lo = np.zeros(lo_cell.size, dtype=np.int64)
    hi = np.full(lo_cell.size, top + 1, dtype=np.int64)
    if top > 0:
        _probe(bounds, top, np.arange(lo.size), lo_cell, up_cell, lo, hi, bar)
    while np.any(open_ := hi - lo > 1):
        mid = (lo + hi) // 2
        for r in np.unique(mid[open_]):
            _probe(bounds, int(r), np.flatnonzero(open_ & (mid == r)), lo_cell, up_cell, lo, hi,
                   bar)
    if bar is not None:
        bar.close()
    radius[ids] = lo[inverse.ravel()]
    return radius


def _certified_at(bounds, r: int, lo_cells: np.ndarray, up_cells: np.ndarray) -> np.ndarray:
    """Whether each (lower cell, upper cell) pair is certified at radius r (bool, shape (M,));
    the tables are evaluated once per distinct cell."""
    ul, inv_l = np.unique(lo_cells, return_inverse=True)
    uu, inv_u = np.unique(up_cells, return_inverse=True)
    low, up = bounds.any_change(r, ul, uu)
    return low[inv_l] > up[inv_u]


def _probe(bounds, r: int, sel: np.ndarray, lo_cell: np.ndarray, up_cell: np.ndarray,
           lo: np.ndarray, hi: np.ndarray, bar) -> None:
    """Evaluate radius r for the pairs ``sel`` and narrow their brackets."""
    ok = _certified_at(bounds, r, lo_cell[sel], up_cell[sel])
    lo[sel[ok]] = r
    hi[sel[~ok]] = r
    if bar is not None:
        bar.update(1)
        bar.set_postfix(r=r)


def _best_radius(bounds, lo_cell: int, up_cell: int, max_radius: int, bar) -> int:
    """Radius (<= max_radius) of one pair of cells: where tables must be built in order,
    bisect the ones already built and walk r upwards beyond them; otherwise gallop (1, 2, 4,
    ...) and bisect. Both rely on certification being monotone in r (the tables are)."""
    lc, uc = np.array([lo_cell]), np.array([up_cell])

    def ok(r: int) -> bool:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(r=r)
        return bool(_certified_at(bounds, r, lc, uc)[0])

    if getattr(bounds, "sequential", False):
        # Tables already built (a server's warm tables, a second call) are bisected; beyond
        # them the walk builds the next table in order, as it must, and tests its radius;
        # radii between two tables are certified with the upper one's, so the first failing
        # table radius is bisected from its predecessor without building anything.
        good, bad = 0, min(int(getattr(bounds, "built", 0)), max_radius)
        if bad == 0 or ok(bad):
            good = bad
            ahead = 2 * getattr(bounds, "workers", 1) - 1
            while good < max_radius:
                nxt = min(bounds.table_radius(good + 1), max_radius)
                if hasattr(bounds, "build"):
                    bounds.build(nxt, ahead=ahead)
                if not ok(nxt):
                    bad = nxt
                    break
                good = nxt
            else:
                return good
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if ok(mid) else (good, mid)
        return good
    good, bad = 0, max_radius + 1
    r = 1
    while r <= max_radius:
        if not ok(r):
            bad = r
            break
        good = r
        r = min(2 * r, max_radius) if r < max_radius else max_radius + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good


def search_radius_linear(conf: ConfidenceBounds, bounds: GroupBounds, *, max_radius: int
                         ) -> np.ndarray:
    """Reference search: walk r = 1, 2, ... testing the points still certified (O(R) tables)."""
    radius = np.full(conf.p_lower.shape, ABSTAIN, dtype=np.int64)
    alive = conf.p_lower > conf.p_upper
    radius[alive] = 0
    lo_idx = outcomes.floor_index(conf.p_lower)
    up_idx = outcomes.ceil_index(conf.p_upper)
    r = 1
    while r <= max_radius and alive.any():
        ids = np.flatnonzero(alive)
        ok = _certified_at(bounds, r, lo_idx[ids], up_idx[ids])
        radius[ids[ok]] = r
        alive[ids[~ok]] = False
        r += 1
    return radius


def _progress_bar(enabled: bool, total: int | None):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="certifying (radius probes)", unit="probe", leave=False)


def confidence_bounds(outputs: np.ndarray, *, inference: str, eta: float,
                      bound: str | None = None) -> ConfidenceBounds:
    """Votes (N, L) -> SimuEM (or ``bound``); scores (P, N, L) -> Bernstein (or ``bound``)."""
    if inference == "multinomial":
        return vote_bounds(outputs, eta, bound or "simuem")
    if inference == "scores":
        return score_bounds(outputs, eta, bound or "bernstein")
    raise UserError(f"inference must be one of {INFERENCES}, got {inference!r}")


def certify(outputs: np.ndarray, mechanism: MechanismRecord, *, inference: str = "multinomial",
            accounting: str | None = None, group: str | None = None, eta: float = 1e-3,
            bound: str | None = None, max_radius: int | None = None,
            cache_dir: Path | None | str = "default", progress: bool = False,
            spec: AccountingSpec | None = None, workers: int | None = None) -> Certificates:
    """Certify every test point of an ensemble's outputs.

    Args:
        outputs: vote counts (N, L) for ``inference="multinomial"``, or per-instance softmax
            scores (P, N, L) for ``inference="scores"``.
        mechanism: the record of what training ran (q, sigma, T, dataset sizes).
        accounting: "pld" (default; tightest), "rdp" or "adp".
        group: "sound" (default) or "paper" (the published, unsound group privacy).
        eta: the certificates hold with probability >= 1 - eta over the training randomness.
        bound: confidence-bound method (see :mod:`dpcert.certification.bounds`); default per
            inference.
        max_radius: largest radius searched (default 1000).
        cache_dir: folder for the group tables; "default" uses $DPCERT_CACHE or
            ~/.cache/dpcert, None keeps them in memory.
        progress: show a progress bar.
        spec: full accounting specification, instead of ``accounting``/``group``/
            ``max_radius`` (giving both is an error where they disagree).
        workers: processes building group tables (default: $DPCERT_WORKERS, else the
            usable CPUs); certificates do not depend on it.

    Returns:
        :class:`Certificates` with prediction and radius per point (radius -1 = abstain).
    """
    spec = resolve_spec(spec, accounting=accounting, group=group, max_radius=max_radius)
    conf = confidence_bounds(outputs, inference=inference, eta=eta, bound=bound)
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    bounds = GroupBounds(mechanism, spec, cache_dir=Path(cache) if cache is not None else None,
                         workers=workers)
    try:
        radius = search_radius(conf, bounds, max_radius=spec.max_radius, progress=progress)
    finally:
        bounds.close()
    return Certificates(conf.prediction, radius, conf.p_lower, conf.p_upper)


def resolve_spec(spec: AccountingSpec | None, **given) -> AccountingSpec:
    """``spec``, or one made from the keyword arguments that are not None; a keyword that
    contradicts ``spec`` is an error rather than silently losing to it."""
    given = {k: v for k, v in given.items() if v is not None}
    if spec is None:
        return AccountingSpec(**given)
    clash = {k: v for k, v in given.items() if getattr(spec, k) != v}
    if clash:
        desc = ", ".join(f"{k}={v!r} (spec: {getattr(spec, k)!r})" for k, v in clash.items())
        raise UserError(f"certify got both spec= and {desc}; pass the setting in the spec only")
    return spec


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


def certificates_csv(cert: Certificates, labels: np.ndarray | None) -> str:
    """The CSV dpcert writes: index, prediction, radius (-1 = abstain) [, label]."""
    rows = ["index,prediction,radius" + (",label" if labels is not None else "")]
    for i in range(len(cert)):
        row = f"{i},{cert.prediction[i]},{cert.radius[i]}"
        if labels is not None:
            row += f",{labels[i]}"
        rows.append(row)
    return "\n".join(rows) + "\n"
