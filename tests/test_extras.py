"""Optional dependencies: a command that needs a missing extra says which one, in one line
(exit status 2), and nothing else needs it."""

import subprocess
import sys

import pytest


def _cli_without(module: str, *args) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from dpcert.cli import main\n"
            f"sys.argv = ['dpcert', *{list(map(str, args))!r}]\nmain()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize(("module", "extra", "args"), [
    ("sklearn", "digits", ["run", "--instances", "2", "--steps", "2"]),
    ("kymatio", "features", ["run", "--model", "linear", "--features", "scatter",
                             "--optimizer", "sgd", "--instances", "2", "--steps", "2"]),
    ("PIL", "serve", ["predict", "RUN", "img.png"]),
])
def test_a_missing_extra_is_named_in_one_line(tmp_path, monkeypatch, module, extra, args):
    # features another test computed would spare this run the missing library
    monkeypatch.setenv("DPCERT_FEATURE_CACHE", str(tmp_path / "features"))
    if "RUN" in args:  # predict needs an ensemble first; any kept run will do
        from dpcert.workflows.run import RunConfig, run

        run(RunConfig(instances=2, steps=2, workers=1, max_radius=2), tmp_path / "r",
            progress=False)
        (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        args = [str(tmp_path / "r"), str(tmp_path / "img.png"), "--output",
                str(tmp_path / "p.csv")]
        args = ["predict", *args]
    else:
        args = [*args, "--output", str(tmp_path / "out")]
    res = _cli_without(module, *args)
    assert res.returncode == 2, res.stderr
    assert f"pip install 'dpcert[{extra}]'" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_certify_needs_no_extra(tmp_path):
    import numpy as np

    np.save(tmp_path / "v.npy", np.array([[9, 1], [2, 8]]))
    code = ("import sys\nfor m in ('sklearn', 'kymatio', 'matplotlib', 'PIL', 'fastapi', "
            "'ray', 'randomgen'):\n    sys.modules[m] = None\n"
            "from dpcert.cli import main\n"
            f"sys.argv = ['dpcert', 'certify', {str(tmp_path / 'v.npy')!r}, '--sample-rate', "
            f"'0.1', '--noise-multiplier', '2', '--steps', '10', '--max-radius', '3', "
            f"'--output', {str(tmp_path / 'c.csv')!r}]\nmain()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c.csv").read_text().startswith("index,prediction,radius")


def test_runs_without_matplotlib_write_everything_but_the_plot(tmp_path):
    out = tmp_path / "run"
    res = _cli_without("matplotlib", "run", "--instances", "3", "--steps", "5", "--workers",
                       "1", "--max-radius", "3", "--quiet", "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert "not drawn: plots need matplotlib: pip install 'dpcert[plots]'" in res.stderr
    assert (out / "certificates.csv").exists() and (out / "report.md").exists()
    assert not (out / "certified_accuracy.png").exists()
