"""The real MNIST and Fashion-MNIST files fetched by scripts/fetch_data.sh (CI fetches them)."""

import os
from pathlib import Path

import numpy as np
import pytest

from dpcert.learning.data import load_mnist_like

DATA = Path(os.environ.get("DPCERT_DATA", Path(__file__).parent.parent / "data"))


def _need(name):
    if not (DATA / name / ".verified").exists():
        pytest.skip(f"{name} not fetched: run scripts/fetch_data.sh (looked in {DATA / name})")
    return DATA / name


def test_mnist_matches_the_standard_files():
    d = load_mnist_like(_need("mnist"))
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    counts = np.bincount(d.y_train, minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_fashion_mnist_reads_from_gz():
    d = load_mnist_like(_need("fashion-mnist"), "fashion-mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y_train, minlength=10).tolist() == [6000] * 10


def test_certify_votes_script_uses_the_returned_mechanism_record(tmp_path):
    # scripts/certify_votes.py certifies what a GPU check brought back: the record that came
    # with the votes (here T = 50, not the config's 1000) decides the certificate
    import json
    import subprocess
    import sys

    from dpcert.certification.certify import certify
    from dpcert.certification.mechanism import MechanismRecord

    _need("mnist")
    root = Path(__file__).parent.parent
    labels = load_mnist_like(DATA / "mnist").y_test
    votes = np.zeros((len(labels), 10), dtype=np.int64)
    votes[np.arange(len(labels)), labels] = 90  # 90 of 100 instances right everywhere
    votes[np.arange(len(labels)), (labels + 1) % 10] = 10
    # (q = 0.01, sigma = 1: small radii, so few tables to build)
    record = MechanismRecord(sample_rate=0.01, noise_multiplier=1.0, steps=50, clip_norm=1.3,
                             dataset_size=60000, sampling="poisson")
    np.savez(tmp_path / "votes.npz", mnist_sigma2=votes,
             **{"mnist_sigma2.mechanism": np.array(json.dumps(record.to_dict()))})
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "DPCERT_CACHE": str(tmp_path / "c")}
    out = subprocess.run([sys.executable, str(root / "scripts" / "certify_votes.py"),
                          str(tmp_path / "votes.npz"), str(tmp_path / "out")], cwd=root,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    rows = np.loadtxt(tmp_path / "out" / "mnist_sigma2" / "certificates.csv", delimiter=",",
                      skiprows=1, dtype=np.int64)
    expected = certify(votes[:1], record, cache_dir=tmp_path / "c").radius[0]
    assert rows.shape == (len(labels), 4) and (rows[:, 2] == expected).all()
    at_config_steps = certify(votes[:1], MechanismRecord(**{**record.to_dict(), "steps": 1000}),
                              cache_dir=tmp_path / "c").radius[0]
    assert (rows[:, 1] == labels).all() and expected > at_config_steps
    assert "T = 50" in out.stdout  # the record's T, not the config's 1000
