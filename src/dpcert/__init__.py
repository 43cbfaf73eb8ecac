"""dpcert: pointwise certificates against training-data poisoning from DP ensembles."""

from dpcert.accounting import AccountingSpec, GroupBounds
from dpcert.certify import (
    ABSTAIN,
    Certificates,
    certified_accuracy,
    certify,
    radius_summary,
)
from dpcert.errors import UserError
from dpcert.mechanism import MechanismRecord

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
]
__version__ = "0.1.0"
