"""Choosing a mechanism before training: what radius each (q, sigma, T, P) can certify.

The certificate of a test point depends on the mechanism and on how strongly the P instances
agree, nothing else. So for a vote share s — s P instances on the top label, the rest on one
runner-up label, the hardest split of the remainder — the radius :func:`dpcert.certify` gives
those votes is known before any training: :func:`plan` computes it for a grid of shares and
mechanisms, with the single-example (epsilon, delta) of the mechanism for reference.
"""

from __future__ import annotations

import numpy as np

from dpcert.certification.accounting import EPS_GRID, AccountingSpec
from dpcert.certification.certify import certify
from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError

#: Vote shares of the top label reported by default.
SHARES = (1.0, 0.99, 0.95, 0.9, 0.8)


def share_votes(instances: int, shares, num_classes: int) -> np.ndarray:
    """Votes (S, L): round(s P) on label 0, the rest on label 1."""
    if not (isinstance(instances, int) and instances >= 2):
        raise UserError(f"instances must be an integer >= 2, got {instances!r}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    shares = np.asarray(shares, dtype=float)
    if shares.ndim != 1 or shares.size == 0 or np.any((shares <= 0) | (shares > 1)):
        raise UserError("vote shares must lie in (0, 1]")
    top = np.round(shares * instances).astype(np.int64)
    votes = np.zeros((len(shares), num_classes), np.int64)
    votes[:, 0], votes[:, 1] = top, instances - top
    return votes


def epsilon_at(record: MechanismRecord, delta: float) -> float:
    """Smallest epsilon on the accounting grid with the single-example privacy profile (both
    directions, PLD) at most ``delta``; inf when none is."""
    from dpcert.certification.pld import group_privacy_profile

    prof = group_privacy_profile(record.sample_rate, record.noise_multiplier, 1, record.steps,
                                 EPS_GRID)
    ok = np.flatnonzero(prof <= delta)
    return float(EPS_GRID[ok[0]]) if ok.size else float("inf")


def plan(*, sample_rate: float, noise_multipliers, steps: int, instances: int,
         num_classes: int = 10, eta: float = 1e-3, accounting: str = "pld",
         max_radius: int = 1000, shares=SHARES, delta: float = 1e-5,
         cache_dir="default") -> list[dict]:
    """One row per (noise multiplier, vote share): the certified radius of those votes
    (-1: abstain), and the mechanism's single-example epsilon at ``delta``."""
    votes = share_votes(instances, shares, num_classes)
    rows = []
    for sigma in noise_multipliers:
        record = MechanismRecord(sample_rate=sample_rate, noise_multiplier=float(sigma),
                                 steps=steps)
        cert = certify(votes, record, eta=eta, spec=AccountingSpec(accounting=accounting,
                                                                   max_radius=max_radius),
                       cache_dir=cache_dir)
        eps = epsilon_at(record, delta)
        for share, radius in zip(shares, cert.radius, strict=True):
            rows.append({"noise_multiplier": float(sigma), "sample_rate": sample_rate,
                         "steps": steps, "instances": instances, "num_classes": num_classes,
                         "eta": eta, "accounting": accounting, "vote_share": float(share),
                         "radius": int(radius), "epsilon": eps, "delta": delta})
    return rows


#: Baseline defences :func:`plan_baseline` plans (from vote counts alone).
PLANNED_BASELINES = ("dpa", "fa", "bagging")


def plan_baseline(*, defence: str, models: int, num_classes: int = 10, spread: int = 1,
                  train_size: int | None = None, subsample: int | None = None,
                  eta: float = 1e-3, max_radius: int = 1000, shares=SHARES) -> list[dict]:
    """One row per vote share: the radius a partition defence or Bagging certifies when
    ``round(s models)`` of its models vote for the top label and the rest for one runner-up.

    ``dpa``: floor((n1 - n2 - 1) / 2) (Levine & Feizi 2021; the runner-up label taken as the
    smaller one, the worst tie-break). ``fa``: the count-only bound floor(gap / 2d) over its
    k d models (the per-model certificate that ``dpcert run --defence fa`` gives can only be
    larger). ``bagging``: Jia et al. 2021 with SimuEM bounds at level 1 - eta, for bags of
    ``subsample`` examples drawn from ``train_size``. Run-off Election is not planned from
    counts: its certificate depends on the models' second choices."""
    from dpcert.certification import baselines

    if defence not in PLANNED_BASELINES:
        raise UserError(f"plan takes dp, {', '.join(PLANNED_BASELINES)}; got {defence!r}")
    if not (isinstance(spread, int) and spread >= 1):
        raise UserError(f"spread must be an integer >= 1, got {spread!r}")
    total = models * spread if defence == "fa" else models
    votes = share_votes(total, shares, num_classes)[:, ::-1]  # top label 1: loses ties
    votes = np.ascontiguousarray(votes)
    if defence == "dpa":
        _, radius = baselines.dpa_radius(votes)
    elif defence == "fa":
        _, radius = baselines.fa_radius(votes, spread)
    else:
        if train_size is None or subsample is None:
            raise UserError("planning Bagging needs the training-set size and the bag size "
                            "(--train-size, --subsample)")
        _, radius = baselines.bagging_radius(votes, train_size=train_size,
                                             subsample_size=subsample, eta=eta,
                                             max_radius=max_radius)
    return [{"defence": defence, "models": models, "spread": spread, "train_size": train_size,
             "subsample": subsample, "num_classes": num_classes, "vote_share": float(s),
             "radius": int(min(r, max_radius))} for s, r in zip(shares, radius, strict=True)]
