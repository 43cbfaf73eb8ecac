"""Offline dataset readers and their errors."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from dpcert.errors import UserError
from dpcert.learning import data


def write_idx(path, arr, gz=False):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + b"".join(
        struct.pack(">I", d) for d in arr.shape)
    raw = header + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr, gz)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), arr)


def test_idx_hostile_and_truncated(tmp_path):
    p = tmp_path / "h"
    p.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 60000, 60000, 60000))
    with pytest.raises(UserError, match="refusing"):
        data.read_idx(p)
    arr = np.zeros((4, 5), np.uint8)
    write_idx(p, arr)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(UserError, match="bytes"):
        data.read_idx(p)
    p.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(UserError, match="magic"):
        data.read_idx(p)
    p.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(UserError, match="gzip"):
        data.read_idx(p)


def test_mnist_folder(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 6).astype(np.uint8), True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 3).astype(np.uint8))
    d = data.load_mnist_like(tmp_path)
    assert d.x_train.shape == (6, 1, 28, 28) and d.x_test.shape == (3, 1, 28, 28)
    assert d.x_train.max() <= 1.0 and d.y_train.dtype == np.int64
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        data.load_mnist_like(tmp_path)


def _cifar_batch(n, rng):
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)), b"batch_label": b"x"}


def test_cifar_reader(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(4, rng)))
    (tmp_path / "test_batch").write_bytes(pickle.dumps(_cifar_batch(2, rng)))
    d = data.load_cifar10(tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (2, 3, 32, 32)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [1]}))
    with pytest.raises(UserError, match="refusing"):
        data.read_cifar_batch(p)
    assert not (tmp_path / "PWNED").exists()


def test_npz_reader_and_errors(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.zeros((5, 8, 8)), y_train=np.arange(5), x_test=np.ones((2, 8, 8)),
             y_test=np.array([0, 1]), num_classes=5)
    d = data.load_npz(p)
    assert d.x_train.shape == (5, 1, 8, 8) and d.num_classes == 5
    assert d.declared_size is None  # not declared: a DP run on it is refused
    # without num_classes the test split declares the labels (0..1 here): 2, 3, 4 are refused
    np.savez(p, x_train=np.zeros((5, 8, 8)), y_train=np.arange(5), x_test=np.ones((2, 8, 8)),
             y_test=np.array([0, 1]))
    with pytest.raises(UserError, match=r"train example 2 has label 2, outside the declared "
                                        r"label set 0\.\.1 \(3 such examples\)"):
        data.load_npz(p)
    np.savez(p, x_train=np.zeros((5, 8, 8)), y_train=np.arange(4), x_test=np.ones((2, 8, 8)),
             y_test=np.array([0, 1]))
    with pytest.raises(UserError):
        data.load_npz(p)
    np.savez(p, x_train=np.zeros((5, 8, 8)))
    with pytest.raises(UserError, match="lacks"):
        data.load_npz(p)


def test_digits_split():
    d = data.load_digits()
    assert d.x_train.shape[1:] == (1, 8, 8)
    assert len(d.y_train) + len(d.y_test) == 1797
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1
    assert set(np.unique(d.y_test)) == set(range(10))


def test_unknown_dataset():
    with pytest.raises(UserError):
        data.load_dataset("imagenet", None)
    with pytest.raises(UserError, match="data-dir"):
        data.load_dataset("mnist", None)


def test_loaded_arrays_have_canonical_strides():
    """x[:, None] leaves a stride-1 channel axis that torch reads as channels_last (other conv
    kernels, other rounding); loaders must hand out canonical C strides so that one dataset
    trains the same model however it reached the worker."""
    from dpcert.learning.data import load_dataset

    d = load_dataset("digits")
    for arr in (d.x_train, d.x_test):
        n, c, h, w = arr.shape
        assert arr.strides == (4 * c * h * w, 4 * h * w, 4 * w, 4)
