"""dpcert: pointwise certificates against training-data poisoning from DP ensembles."""

from dpcert.errors import UserError
from dpcert.mechanism import MechanismRecord

__all__ = ["MechanismRecord", "UserError"]
__version__ = "0.1.0"
