"""dpcert: pointwise certificates against training-data poisoning from DP ensembles.

Three wings, each importing only the ones below it:

- :mod:`dpcert.certification` — numpy/scipy only: mechanism records, accounting, confidence
  bounds, radius search, certificates (also the partition defences').
- :mod:`dpcert.learning` — torch: datasets, features, models and the DP-SGD engines.
- :mod:`dpcert.workflows` — runs on disk: configuration, training a run's instances,
  ``run``, ``compare``, ``attack-check``, reports.

The names below are the public API. The certification names import eagerly (no torch); the
training entry points and the kept-ensemble API import on first use.
"""

from dpcert.certification.accounting import AccountingSpec, GroupBounds
from dpcert.certification.certify import (
    ABSTAIN,
    Certificates,
    certified_accuracy,
    certify,
    radius_summary,
)
from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError

# name -> module; resolved on first access so that `import dpcert` stays torch-free.
_LAZY = {
    "train_ensemble": "dpcert.learning.stacked",
    "train_linear_ensemble": "dpcert.learning.linear",
    "load_ensemble": "dpcert.workflows.ensemble",
    "export_ensemble": "dpcert.workflows.ensemble",
    "Ensemble": "dpcert.workflows.ensemble",
}

__all__ = [
    "ABSTAIN",
    "AccountingSpec",
    "Certificates",
    "GroupBounds",
    "MechanismRecord",
    "UserError",
    "certified_accuracy",
    "certify",
    "radius_summary",
    *_LAZY,
]
__version__ = "0.3.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpcert' has no attribute {name!r}")
