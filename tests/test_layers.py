"""The package's layers: the certification core needs no torch; nothing imports the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dpcert

CORE = ["accounting", "baselines", "bounds", "certify", "mechanism", "outcomes", "pld", "rdp",
        "store", "report"]
SRC = Path(dpcert.__file__).parent


def test_certification_core_imports_without_torch():
    code = ("import sys\n" + "".join(f"import dpcert.{m}\n" for m in CORE)
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dpcert.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = ast.literal_eval(out)
    assert "torch" not in loaded
    assert set(loaded) <= {f"dpcert.{m}" for m in CORE} | {"dpcert.errors"}


def test_run_options_validate_without_torch():
    code = ("import sys\nfrom dpcert.runconfig import RunConfig\nRunConfig(instances=4)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_only_the_command_line_imports_the_command_line():
    offenders = [p.name for p in SRC.glob("*.py")
                 if p.name != "cli.py" and "dpcert.cli" in _imports(p)]
    assert offenders == []
