"""The Ray backend: same seeds, same results as the local backend, on a loopback cluster."""

import subprocess
import sys

import numpy as np
import pytest

from dpcert.workflows.run import RunConfig, run

ray = pytest.importorskip("ray")

SMALL = dict(instances=5, steps=15, sample_rate=0.05, noise_multiplier=2.0)


@pytest.fixture(scope="module")
def cluster():
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # tests reach no network
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


def test_ray_backend_equals_local(tmp_path, cluster):
    local = tmp_path / "local"
    run(RunConfig(**SMALL, workers=2), local, progress=False)  # one thread per worker, as ray
    remote = tmp_path / "ray"
    run(RunConfig(**SMALL, backend="ray", batch_instances=2), remote, progress=False)
    np.testing.assert_allclose(np.load(remote / "scores.npy"), np.load(local / "scores.npy"),
                               atol=1e-4)  # batches of 2 vs single instances: rounding only
    single = tmp_path / "ray1"
    run(RunConfig(**SMALL, backend="ray"), single, progress=False)
    # one thread per instance on both backends: bit-identical instances
    scores = np.load(single / "scores.npy")
    np.testing.assert_array_equal(scores, np.load(local / "scores.npy"))
    assert (single / "certificates.csv").read_text() == (local / "certificates.csv").read_text()
    # resume: a lost unit is retrained by ray, the rest kept, the result unchanged
    (single / "instances" / "inst_000003.npz").unlink()
    run(RunConfig(**SMALL, backend="ray"), single, progress=False)
    np.testing.assert_array_equal(np.load(single / "scores.npy"), scores)


def test_local_backend_does_not_import_ray(tmp_path):
    code = ("import sys; from dpcert.workflows.run import RunConfig, run; "
            f"run(RunConfig(instances=2, steps=3, workers=1), __import__('pathlib').Path("
            f"{str(tmp_path)!r}), progress=False); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _task_pids(name: str) -> list[int]:
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if name in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers in /proc")
def test_ray_retries_a_killed_worker(tmp_path, cluster):
    import os
    import signal
    import threading
    import time

    cfg = dict(SMALL, instances=4, steps=300)
    local = tmp_path / "local"
    run(RunConfig(**cfg, workers=2), local, progress=False)
    out = tmp_path / "ray"
    errors = []
    thread = threading.Thread(target=lambda: _run_catching(RunConfig(**cfg, backend="ray"), out,
                                                           errors))
    thread.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and thread.is_alive() and time.time() < deadline:
        pids = _task_pids("ray::_ray_group")
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join()
    assert not errors, errors
    assert killed is not None, "no running task was found to kill"
    # the retried task trains the same instance again, bit for bit
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(local / "scores.npy"))


def _run_catching(cfg, out, errors):
    try:
        run(cfg, out, progress=False)
    except Exception as err:  # reported by the test's main thread
        errors.append(repr(err))


@pytest.mark.parametrize("learner", ["kernel-ridge", "full-batch"])
def test_a_partition_defence_trains_on_ray_as_locally(tmp_path, cluster, learner):
    """The models of a partition defence go through the same Ray path as DP instances
    (written by the driver as each task returns): the same models and certificates as the
    local backend."""
    from dpcert.store import load_tensors
    from dpcert.workflows.defence import defence_config, run_defence

    opts = {"defence": "dpa", "models": 8, "learner": learner, "steps": 5}
    out = {}
    for backend in ("local", "ray"):
        kind, cfg, bc = defence_config({**opts, "backend": backend, "workers": 1})
        out[backend] = tmp_path / backend
        run_defence(kind, bc, cfg, out[backend], progress=False)
    assert (out["ray"] / "certificates.csv").read_text() == \
        (out["local"] / "certificates.csv").read_text()
    for i in range(8):
        a, _ = load_tensors(out["local"] / f"model_{i:06d}.safetensors")
        b, _ = load_tensors(out["ray"] / f"model_{i:06d}.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
