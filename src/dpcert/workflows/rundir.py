"""The run directory: the names of its files, and the one reader of its certificate tables.

What ``dpcert run`` (every defence) and each setting of ``dpcert compare`` write, and what
every command reading a kept ensemble accepts. This module owns the layout; the others ask it
for a path:

    config.json                    a DP run's configuration
    settings.json                  a baseline setting's (partition defence or Bagging)
    mechanism.json                 a DP run's mechanism record
    ensemble.json                  what the models are and which certificate they take
    certification.json             a baseline's certification settings (eta, largest radius)
    inst_NNNNNN.safetensors        a DP run's kept instances (model_NNNNNN.* for baselines)
    certificates.csv               index,prediction,radius,label: the default certificate
    certificates_<method>.csv      another method's, or a run-off's base defence's
    certificates_label_flip.csv    the default certificate counted in flipped labels
    scores.npy  votes.npy  labels.npy
    report.md  certified_accuracy.png
    signature.json                 an Ed25519 signature of the ensemble's digest
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpcert.certification.certify import Certificates, certificates_csv
from dpcert.errors import UserError
from dpcert.store import atomic_write_text

CONFIG = "config.json"
SETTINGS = "settings.json"
MECHANISM = "mechanism.json"
ENSEMBLE = "ensemble.json"
CERTIFICATION = "certification.json"
CERTIFICATES = "certificates.csv"
LABEL_FLIP = "certificates_label_flip.csv"
SCORES = "scores.npy"
VOTES = "votes.npy"
LABELS = "labels.npy"
REPORT = "report.md"
PLOT = "certified_accuracy.png"
SIGNATURE = "signature.json"
#: Files whose presence marks a folder of kept models: a DP run's, or a baseline setting's.
MODEL_FOLDER_MARKERS = (SETTINGS, CONFIG)


def certificates_name(method: str | None = None, threat: str = "poisoning") -> str:
    """The certificate table of ``method`` (None: the directory's default certificate)
    against ``threat``: certificates.csv, certificates_roe.csv, certificates_label_flip.csv,
    certificates_roe_label_flip.csv, ..."""
    stem = "certificates" if method is None else f"certificates_{method}"
    return f"{stem}.csv" if threat == "poisoning" else f"{stem}_{threat.replace('-', '_')}.csv"


def is_dp_run(path: Path) -> bool:
    """Whether ``path`` is a DP run's directory (a baseline folder has settings.json)."""
    return (Path(path) / CONFIG).exists()


def write_certificates(run_dir: Path, cert: Certificates, labels: np.ndarray | None, *,
                       method: str | None = None, threat: str = "poisoning") -> Path:
    """Write ``method``'s certificate table against ``threat`` (:func:`certificates_name`)
    into ``run_dir``, atomically; returns its path."""
    path = Path(run_dir) / certificates_name(method, threat)
    atomic_write_text(path, certificates_csv(cert, labels))
    return path


def read_certificates(path: Path) -> np.ndarray:
    """The rows (N, 4) int64 of a certificate table: index, prediction, radius, label (-1
    where the table has no labels). A damaged table is refused in one line."""
    try:
        rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is missing or damaged ({err}); rerun the command that "
                        "wrote it") from None
    if rows.shape[1:] == (3,):
        rows = np.column_stack([rows, np.full(len(rows), -1)])
    if rows.ndim != 2 or rows.shape[1] != 4 or len(rows) == 0:
        raise UserError(f"{path} is not a certificate table (index,prediction,radius,label)")
    return rows
