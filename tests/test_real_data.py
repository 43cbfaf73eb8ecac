"""The real MNIST and Fashion-MNIST files fetched by scripts/fetch_data.sh (CI fetches them)."""

import os
from pathlib import Path

import numpy as np
import pytest

from dpcert.data import load_mnist_like

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
