"""The package's layers: certification <- learning <- workflows <- cli, and nothing upwards.

Checked twice: statically (every import statement in a wing's files, including imports inside
functions) and dynamically (what importing the certification wing actually loads)."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

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
    allowed |= {"dpcert.certification", "dpcert.errors", "dpcert.store"}
    assert set(loaded) <= allowed


def test_run_options_validate_without_torch():
    code = ("import sys\nfrom dpcert.workflows.runconfig import RunConfig\n"
            "RunConfig(instances=4)\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def _module_graph() -> dict[str, set[str]]:
    """dpcert module -> the dpcert modules it imports (imports inside functions included;
    ``from package import module`` counts as importing the module)."""
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(
        ".__init__"): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle among modules (not counting a package's own __init__), or []."""
    packages = {m for m in graph if (SRC.parent / m.replace(".", "/") / "__init__.py").exists()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m] - packages):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(set(graph) - packages):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_import_cycle_between_modules():
    assert _cycle(_module_graph()) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


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
