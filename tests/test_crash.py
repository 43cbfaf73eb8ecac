"""Crash safety: a run killed with SIGKILL (mid-training or mid-write) resumes to the result of
an uninterrupted run, retraining only the unfinished instances."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

ARGS = ["--instances", "6", "--steps", "80", "--workers", "1", "--max-radius", "20", "--quiet"]


def dpcert_run(out, env_extra=None, wait=True):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-m", "dpcert.cli", "run", *ARGS, "--output", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    if wait:
        proc.communicate(timeout=600)
    return proc


def units(out):
    return sorted((out / "instances").glob("inst_*.npz"))


def assert_same_results(a, b):
    for name in ("scores.npy", "votes.npy"):
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name))
    assert (a / "certificates.csv").read_text() == (b / "certificates.csv").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert dpcert_run(out).returncode == 0
    return out


def test_sigkill_during_training_resumes_to_the_same_result(tmp_path, reference):
    out = tmp_path / "killed"
    proc = dpcert_run(out, wait=False)
    deadline = time.time() + 300
    while len(units(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = {p.name: p.stat().st_mtime_ns for p in units(out)}
    assert 2 <= len(done) < 6, "the kill should land mid-training"
    assert not (out / "votes.npy").exists()
    assert dpcert_run(out).returncode == 0
    # finished instances were kept, not retrained
    assert {p.name: p.stat().st_mtime_ns for p in units(out) if p.name in done} == done
    assert_same_results(out, reference)


@pytest.mark.parametrize("failpoint", ["mid-write:3", "unit-done:6"])
def test_sigkill_while_writing_resumes_to_the_same_result(tmp_path, reference, failpoint):
    out = tmp_path / "killed"
    proc = dpcert_run(out, {"DPCERT_FAILPOINT": failpoint})
    assert proc.returncode == -signal.SIGKILL
    written = units(out)
    if failpoint.startswith("mid-write"):
        assert len(written) == 2  # the third died half-written under a temp name
        assert list((out / "instances").glob(".*.tmp"))
    else:
        assert len(written) == 6 and not (out / "votes.npy").exists()
    assert dpcert_run(out).returncode == 0
    assert not list((out / "instances").glob(".*.tmp"))  # the leftover was cleaned up
    assert_same_results(out, reference)
