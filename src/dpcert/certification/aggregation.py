"""From the models' scores to what a certificate reads: votes, and the baseline defences'
certificates.

Shared by every wing above: a DP run tallies its instances' votes here, and a kept
ensemble, ``dpcert compare`` and ``dpcert run --defence`` certify a partition defence or
Bagging from its models' scores with :func:`baseline_certificate`.
"""

from __future__ import annotations

import numpy as np

from dpcert.certification import baselines
from dpcert.certification.certify import Certificates
from dpcert.errors import UserError

#: The defences that aggregate another defence's models differently: whose models they use.
RUNOFF = {"roe": "dpa", "fa-roe": "fa"}
#: Every baseline defence :func:`baseline_certificate` certifies.
BASELINES = ("dpa", "fa", "bagging", "roe", "fa-roe")
#: The attacks a radius can count: inserted plus deleted examples (a modification counts 2),
#: or flipped labels (inputs untouched).
THREATS = ("poisoning", "label-flip")


def check_threat(threat: str) -> None:
    if threat not in THREATS:
        raise UserError(f"threat must be one of {', '.join(THREATS)}, got {threat!r}")


def dp_label_flips(cert: Certificates) -> Certificates:
    """A DP ensemble's certificate against label flips from its certificate against
    insertions and deletions: one flip replaces an example — one deletion and one insertion,
    a group of 2 under the add/remove accounting — so r flips are certified wherever 2r
    changes are: radius floor(r / 2), abstentions kept."""
    radius = np.where(cert.radius >= 0, cert.radius // 2, cert.radius)
    return Certificates(cert.prediction, radius, cert.p_lower, cert.p_upper)


def tally_votes(scores: np.ndarray) -> np.ndarray:
    """Vote counts (N, L) from per-model scores (P, N, L): each model votes for its argmax."""
    p, n, n_labels = scores.shape
    votes = np.zeros((n, n_labels), dtype=np.int64)
    np.add.at(votes, (np.tile(np.arange(n), p), scores.argmax(axis=2).ravel()), 1)
    return votes


def deterministic_certificates(prediction: np.ndarray, radius: np.ndarray) -> Certificates:
    """Certificates without confidence bounds (NaN): a vote count is not estimated."""
    nan = np.full(len(prediction), np.nan)
    return Certificates(np.asarray(prediction), np.asarray(radius), nan, nan)


def baseline_certificate(kind: str, scores: np.ndarray, *, spread: int, train_size: int,
                         subsample: int, eta: float, max_radius: int,
                         threat: str = "poisoning") -> Certificates:
    """Certificates of a partition or bagging defence from its models' scores (M, N, L):
    DPA (Levine & Feizi 2021), Finite Aggregation (Wang et al. 2022; ``spread`` d), Run-off
    Election over DPA's or FA's models (Rezaei et al. 2023), Bagging (Jia et al. 2021; bags
    of ``subsample`` from ``train_size``, SimuEM bounds at level 1 - ``eta``).

    ``threat="label-flip"``: the radius counts flipped labels. The partitions assign an
    example by a hash of its input alone, so a flip reaches exactly the models its insertion
    would (one part; FA's d models of its bucket) and the same counting certificates hold,
    flip for flip (SS-DPA, Levine & Feizi 2021). Bagging's bags are positions, which a flip
    keeps: :func:`~dpcert.certification.baselines.bagging_flip_threshold`."""
    check_threat(threat)
    votes = tally_votes(scores)
    if kind == "dpa":
        pred, radius = baselines.dpa_radius(votes)
    elif kind == "fa":
        pred, radius = baselines.fa_certificate(scores.argmax(axis=2).T, scores.shape[2],
                                                spread)
    elif kind == "roe":
        pred, radius = baselines.roe_certificate(scores)
    elif kind == "fa-roe":
        pred, radius = baselines.fa_roe_certificate(scores, spread)
    elif kind == "bagging":
        pred, radius = baselines.bagging_radius(votes, train_size=train_size,
                                                subsample_size=subsample, eta=eta,
                                                max_radius=max_radius,
                                                label_flips=threat == "label-flip")
    else:
        raise UserError(f"no certificate for defence {kind!r} ({', '.join(BASELINES)})")
    return deterministic_certificates(pred, np.minimum(radius, max_radius))
