"""The run directory's layout is owned by one module: no other module names its files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import dpcert
from dpcert.errors import UserError
from dpcert.workflows import rundir

SRC = Path(dpcert.__file__).parent
#: File names a run directory holds, as the other modules would spell them.
NAMES = re.compile(r'["\'](config|settings|mechanism|ensemble|certification|signature)\.json'
                   r'["\']|["\']certificates[a-z_]*\.csv["\']|["\'](scores|votes|labels)\.npy["\']'
                   r'|["\']report\.md["\']|["\']certified_accuracy\.png["\']')


def _code(path: Path) -> str:
    """The module's text without its docstrings and comments (which may name files)."""
    text = re.sub(r'"""(.|\n)*?"""', "", path.read_text())
    return re.sub(r"#.*", "", text)


def test_only_the_run_directory_module_names_its_files():
    offenders = [f"{p.relative_to(SRC)}: {m.group(0)}" for p in sorted(SRC.rglob("*.py"))
                 if p.name != "rundir.py"
                 for m in NAMES.finditer(_code(p))]
    assert offenders == []


def test_certificate_table_names_and_reader(tmp_path):
    assert rundir.certificates_name() == "certificates.csv"
    assert rundir.certificates_name("roe", "label-flip") == "certificates_roe_label_flip.csv"
    assert rundir.certificates_name(threat="label-flip") == rundir.LABEL_FLIP
    path = tmp_path / "c.csv"
    path.write_text("index,prediction,radius\n0,3,5\n1,2,-1\n")
    np.testing.assert_array_equal(rundir.read_certificates(path), [[0, 3, 5, -1], [1, 2, -1, -1]])
    path.write_text("index,prediction,radius,label\nx,y\n")
    with pytest.raises(UserError, match="missing or damaged"):
        rundir.read_certificates(path)
