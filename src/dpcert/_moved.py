"""The flat module paths of version 0.1, kept for one version as aliases of their new homes.

``import dpcert.engine`` still works: a finder on ``sys.meta_path`` answers for the old names,
warns once with :class:`DeprecationWarning`, and hands out the module at its new path, so
every name — public or private — resolves as before. One finder instead of twenty stub files
keeps the package tree showing only the three wings.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    **{f"dpcert.{m}": f"dpcert.certification.{m}" for m in (
        "mechanism", "rdp", "pld", "outcomes", "accounting", "bounds", "certify", "baselines")},
    **{f"dpcert.{m}": f"dpcert.learning.{m}" for m in (
        "models", "ghost", "philox", "stacked", "features", "data")},
    "dpcert.engine": "dpcert.learning.linear",
    "dpcert.train": "dpcert.learning.reference",
    **{f"dpcert.{m}": f"dpcert.workflows.{m}" for m in (
        "runconfig", "run", "compare", "attack", "report")},
    "dpcert.training": "dpcert.workflows.dispatch",
}


class _Aliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} is deprecated and will be removed in the next "
                      f"version; import {new}", DeprecationWarning, stacklevel=2)
        # The import system returns whatever sys.modules holds under the name once this
        # returns, so the old name becomes the new module itself.
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Aliases) for f in sys.meta_path):
        sys.meta_path.append(_Aliases())
