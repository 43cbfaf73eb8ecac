"""The documentation is for users and cannot rot: every python and bash block of README.md
and docs/*.md runs as written (blocks that train for long or need downloads carry a
``<!-- not run: reason -->`` line and are listed), the CLI reference is generated from the
commands' own help, and nothing speaks of the project's history or of files outside the
repository."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!-- not run: (.*?) -->$")


def code_blocks(path: Path) -> list[tuple[str, str, str | None, int]]:
    """(language, code, reason it is not run or None, first line) of every fenced block."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not FENCE.match(lines[j]):
            j += 1
        skip = SKIP.match(lines[start - 1]) if start else None
        out.append((lang, "\n".join(lines[start + 1:j]), skip.group(1) if skip else None,
                    start + 1))
        i = j + 1
    return out


def test_the_block_parser_sees_skips_and_languages(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n```python\nprint(1)\n```\n<!-- not run: slow -->\n```bash\nsleep 1\n```\n")
    assert code_blocks(page) == [("python", "print(1)", None, 2), ("bash", "sleep 1", "slow", 6)]


def test_blocks_that_are_not_run_say_why():
    for page in PAGES:
        for lang, _, reason, line in code_blocks(page):
            if reason is not None:
                assert len(reason) > 10 and lang in ("bash", "python"), (page.name, line)


HISTORY = re.compile(r"\bsessions?\b|\bissues? \d|\(issue|DESIGN\.md|\.\./shared", re.I)


def test_user_docs_do_not_speak_of_history_or_outside_files():
    texts = {p.name: p.read_text() for p in PAGES}
    res = subprocess.run([sys.executable, "-m", "dpcert", "--help"], capture_output=True,
                         text=True, check=True)
    texts["--help"] = res.stdout
    hits = {name: HISTORY.findall(text) for name, text in texts.items()}
    assert {k: v for k, v in hits.items() if v} == {}


def test_cli_reference_is_generated_from_the_help():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"),
                          "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _run_block(lang: str, code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail",
                                                                 "-c", code]
    # Output to files, not pipes: a server a block leaves in the background would hold a
    # pipe open; the block is done when its shell exits, and the server goes with it.
    with open(cwd / ".out", "w+") as out, open(cwd / ".err", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory as a user has it after ``make demo``: the demo run in runs/digits."""
    work = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "configs", work / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DPCERT_CACHE": os.environ["DPCERT_CACHE"]}  # the shared table cache
    res = _run_block("bash", "dpcert run --output runs/digits --quiet", work, env)
    assert res.returncode == 0, res.stderr
    return work, env


@pytest.mark.parametrize("page", ["README.md", "docs/guide.md", "docs/results.md",
                                  "docs/benchmarks.md", "docs/experiments.md",
                                  "docs/method.md", "docs/cli.md"])
def test_every_example_runs_as_written(workspace, page):
    work, env = workspace
    ran = 0
    for lang, code, reason, line in code_blocks(ROOT / page):
        if lang not in ("python", "bash") or reason is not None:
            continue
        res = _run_block(lang, code, work, env)
        assert res.returncode == 0, f"{page}:{line} failed:\n{code}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr, f"{page}:{line}\n{res.stderr[-3000:]}"
        ran += 1
    if page in ("README.md", "docs/guide.md"):
        assert ran >= 3


def test_the_documentation_site_builds_without_warnings(tmp_path):
    pytest.importorskip("mkdocs")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "load_ensemble" in api and "Certificates" in api


def test_the_readme_demo_table_is_what_make_demo_prints(workspace):
    work, _ = workspace
    table = [line for line in (work / "runs" / "digits" / "report.md").read_text().splitlines()
             if line.startswith("|")]
    readme = {line for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith("|")}
    assert table and all(line in readme for line in table), "README's demo table is stale"


def test_the_readme_partition_table_is_what_its_command_prints(workspace):
    work, env = workspace
    cmd = "dpcert run --defence dpa --models 50 --learner kernel-ridge --output runs/digits-dpa"
    assert cmd in (ROOT / "README.md").read_text()
    res = _run_block("bash", cmd + " --quiet", work, env)  # resumes if the README ran it
    assert res.returncode == 0, res.stderr
    table = [line for line in res.stdout.splitlines() if line.startswith("|")]
    readme = {line for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith("|")}
    assert table and all(line in readme for line in table), "README's DPA table is stale"
