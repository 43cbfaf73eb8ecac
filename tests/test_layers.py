"""The package's layers: certification <- learning <- workflows <- cli, and nothing upwards.

Checked twice: statically (every import statement in a wing's files, including imports inside
functions) and dynamically (what importing the certification wing actually loads)."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import dpcert

SRC = Path(dpcert.__file__).parent
CERTIFICATION = sorted(p.stem for p in (SRC / "certification").glob("*.py")
                       if p.stem != "__init__")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "dpcert":
                names.update(f"dpcert.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _wing_imports(wing: str) -> dict[str, set[str]]:
    return {p.name: _imports(p) for p in (SRC / wing).glob("*.py")}


def _offenders(wing: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{name}: {mod}" for name, mods in _wing_imports(wing).items() for mod in mods
                  if mod.split(".")[0] in forbidden or mod.startswith(forbidden))


def test_certification_imports_no_torch_and_no_other_wing():
    assert _offenders("certification", ("torch", "dpcert.learning", "dpcert.workflows",
                                        "dpcert.cli")) == []


def test_learning_imports_nothing_from_workflows():
    assert _offenders("learning", ("dpcert.workflows", "dpcert.cli")) == []


def test_only_the_command_line_imports_the_command_line():
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.name not in ("cli.py", "__main__.py") and "dpcert.cli" in _imports(p)]
    assert offenders == []


def test_the_layering_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dpcert.workflows import run\n    import torch\n")
    assert {"dpcert.workflows", "torch"} <= _imports(bad)


def test_certification_wing_loads_without_torch():
    code = ("import sys\n" + "".join(f"import dpcert.certification.{m}\n" for m in CERTIFICATION)
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dpcert.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = ast.literal_eval(out)
    assert "torch" not in loaded
    allowed = {f"dpcert.certification.{m}" for m in CERTIFICATION}
    allowed |= {"dpcert.certification", "dpcert.errors", "dpcert.store", "dpcert._moved"}
    assert set(loaded) <= allowed


def test_run_options_validate_without_torch():
    code = ("import sys\nfrom dpcert.workflows.runconfig import RunConfig\n"
            "RunConfig(instances=4)\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(("old", "new"), [("dpcert.engine", "dpcert.learning.linear"),
                                          ("dpcert.training", "dpcert.workflows.dispatch"),
                                          ("dpcert.bounds", "dpcert.certification.bounds")])
def test_old_module_paths_are_deprecated_aliases(old, new):
    code = (f"import warnings\nwarnings.simplefilter('error')\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print('warned', w)\n"
            f"warnings.simplefilter('ignore')\nimport importlib, sys\n"
            f"print(importlib.import_module('{old}') is importlib.import_module('{new}'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith("warned") and new in out[0]
    assert out[1] == "True"


def test_public_api_and_python_dash_m():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from dpcert import (  # noqa: F401
            AccountingSpec,
            MechanismRecord,
            certified_accuracy,
            certify,
            train_ensemble,
            train_linear_ensemble,
        )
    res = subprocess.run([sys.executable, "-m", "dpcert", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "certify" in res.stdout
