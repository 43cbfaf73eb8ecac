"""Datasets, read offline: scikit-learn digits, MNIST-style IDX files, CIFAR-10 batches, .npz.

Every loader returns a :class:`Dataset` with float32 images in [0, 1], shape (n, C, H, W), and
int64 labels. A missing or malformed dataset is a one-line :class:`UserError` naming what was
expected where.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpcert.errors import UserError, missing_extra

#: Largest IDX dimension product we accept (guards against hostile headers).
_MAX_IDX_ITEMS = 1 << 31


@dataclass(frozen=True)
class Dataset:
    """Train and test splits: x float32 (n, C, H, W) in [0, 1] (or features (n, D)),
    y int64 (n,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self) -> None:
        # Canonical C strides everywhere: a size-1 channel axis made by x[:, None] keeps
        # stride 1, which torch reads as channels_last and answers with other conv kernels
        # (other float rounding), so the same data would train a slightly different model
        # depending on how it was loaded (e.g. in a Ray worker).
        for name in ("x_train", "y_train", "x_test", "y_test"):
            arr = getattr(self, name)
            canonical = tuple(arr.itemsize * math.prod(arr.shape[i + 1:]) for i in range(arr.ndim))
            if arr.strides != canonical:
                object.__setattr__(self, name, np.array(arr, order="C", copy=True))

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's embedded 8x8 digits (1,797 images), a fixed stratified split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise missing_extra("the digits dataset", "scikit-learn", "digits") from None

    bunch = sk_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, int(round(test_fraction * len(idx))), replace=False)] = True
    return Dataset("digits", x[~test], y[~test], x[test], y[test])


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or .gz): magic 0 0 dtype ndim, big-endian dims, then data."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"IDX file not found: {path}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise UserError(f"{path} is a damaged gzip file: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise UserError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(dims, dtype=object))
    if count > _MAX_IDX_ITEMS:
        raise UserError(f"{path}: IDX header claims {count} items, refusing")
    if count == 0:  # also keeps numpy away from empty shapes with enormous other dimensions
        raise UserError(f"{path}: IDX file holds no items (dimensions {dims})")
    dt = np.dtype(dtypes[raw[2]])
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dt.itemsize:
        raise UserError(f"{path}: IDX body has {len(body)} bytes, header implies "
                        f"{count * dt.itemsize}")
    return np.frombuffer(body, dtype=dt).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise UserError(f"expected {stem} or {stem}.gz in {folder}")


def load_mnist_like(folder: Path, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files (raw or .gz) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{name} folder not found: {folder}")
    xtr = read_idx(_find(folder, "train-images-idx3-ubyte"))
    ytr = read_idx(_find(folder, "train-labels-idx1-ubyte"))
    xte = read_idx(_find(folder, "t10k-images-idx3-ubyte"))
    yte = read_idx(_find(folder, "t10k-labels-idx1-ubyte"))
    if xtr.ndim != 3 or len(xtr) != len(ytr) or xte.ndim != 3 or len(xte) != len(yte):
        raise UserError(f"{folder}: image and label files do not match")
    return Dataset(name, (xtr / 255.0).astype(np.float32)[:, None], ytr.astype(np.int64),
                   (xte / 255.0).astype(np.float32)[:, None], yte.astype(np.int64))


class _NoObjectsUnpickler(pickle.Unpickler):
    """CIFAR batches hold dicts of bytes, lists and numpy arrays; anything else is refused, so
    a malicious pickle cannot execute code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"CIFAR-10 batch not found: {path}") from None
    try:
        obj = _NoObjectsUnpickler(io.BytesIO(raw), encoding="bytes").load()
    # Untrusted bytes: the unpickler can fail in many ways (overflowing frame lengths, bad
    # opcodes, recursion); each only means "not a CIFAR batch".
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path} is not a valid CIFAR-10 batch: "
                        f"{type(err).__name__}: {str(err)[:100]}") from None
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise UserError(f"{path} is not a CIFAR-10 batch (needs 'data' and 'labels')")
    data, labels = obj[b"data"], obj[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (n, 3072)")
    if not (isinstance(labels, list)
            and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in labels)
            and len(labels) == len(data) and all(0 <= v < 10 for v in labels)):
        raise UserError(f"{path}: 'labels' must be one label in 0..9 per row of 'data'")
    return data.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)


def load_cifar10(folder: Path) -> Dataset:
    """CIFAR-10 from the python-pickle batches data_batch_1..5 and test_batch in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"CIFAR-10 folder not found: {folder}")
    parts = [read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    xte, yte = read_cifar_batch(folder / "test_batch")
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    return Dataset("cifar10", (xtr / 255.0).astype(np.float32), ytr,
                   (xte / 255.0).astype(np.float32), yte)


def load_npz(path: Path) -> Dataset:
    """Any .npz with x_train, y_train, x_test, y_test: images (n, H, W) or (n, C, H, W), or
    your own feature vectors (n, D) (used as they are, for the linear model)."""
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"dataset file not found: {path}") from None
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read {path} as .npz: {err}") from None
    keys = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in keys if k not in z]
    if missing:
        raise UserError(f"{path} lacks arrays {missing}")
    x_tr, y_tr, x_te, y_te = (np.asarray(z[k]) for k in keys)
    if x_tr.ndim == 2 or x_te.ndim == 2:
        return _npz_features(path, x_tr, y_tr, x_te, y_te)
    out = []
    for x in (x_tr, x_te):
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.size == 0 or not np.issubdtype(x.dtype, np.number):
            raise UserError(f"{path}: images must be numbers of non-empty shape "
                            f"(n, [C,] H, W), got {x.dtype} {x.shape}")
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):  # NaN, inf, or beyond float32's range
            raise UserError(f"{path}: images must be finite float32 numbers")
        if x.max() > 1.0:
            x = x / 255.0
        out.append(x)
    for y, x in ((y_tr, out[0]), (y_te, out[1])):
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise UserError(f"{path}: labels must be non-negative integers, one per image")
    return Dataset(path.stem, out[0], y_tr.astype(np.int64), out[1], y_te.astype(np.int64))


def _npz_features(path: Path, x_tr, y_tr, x_te, y_te) -> Dataset:
    """Feature vectors (n, D) from an .npz, finite float32, not rescaled."""
    if x_tr.ndim != 2 or x_te.ndim != 2 or x_tr.shape[1] != x_te.shape[1] or x_tr.size == 0:
        raise UserError(f"{path}: feature vectors must be (n, D) in both splits with the same "
                        f"D, got {x_tr.shape} and {x_te.shape}")
    out = []
    for x in (x_tr, x_te):
        if not np.issubdtype(x.dtype, np.number):
            raise UserError(f"{path}: features must be numbers, got {x.dtype}")
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise UserError(f"{path}: features must be finite float32 numbers")
        out.append(x)
    for y, x in ((y_tr, out[0]), (y_te, out[1])):
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise UserError(f"{path}: labels must be non-negative integers, one per row")
    return Dataset(path.stem, out[0], y_tr.astype(np.int64), out[1], y_te.astype(np.int64))


def load_dataset(name: str, path: Path | None = None) -> Dataset:
    """By name: digits (embedded), mnist / fashion-mnist (IDX folder), cifar10, npz (file)."""
    if name == "digits":
        return load_digits()
    if path is None:
        raise UserError(f"dataset {name!r} needs --data-dir (a folder or file to read from)")
    if name in ("mnist", "fashion-mnist"):
        return load_mnist_like(Path(path), name)
    if name == "cifar10":
        return load_cifar10(Path(path))
    if name == "npz":
        return load_npz(Path(path))
    raise UserError(f"unknown dataset {name!r} (digits, mnist, fashion-mnist, cifar10, npz)")


# Two entries: a worker training partition models on translated images reads the images and
# their features for every model (one entry would reload and re-hash both each time).
@functools.lru_cache(maxsize=2)
def load_dataset_cached(name: str, path: str | None = None,
                        features: str | None = None) -> Dataset:
    """:func:`load_dataset`, optionally mapped through a fixed feature map
    (:mod:`dpcert.learning.features`; x becomes (n, D)), kept for the life of the process: a
    training worker loads its dataset once for all the units it trains. Callers must not modify the
    arrays."""
    data = load_dataset(name, Path(path) if path else None)
    if features is None:
        return data
    import sys

    from dpcert.learning.features import transform

    # A bar only on a terminal: workers, tests and piped runs (--quiet) stay silent.
    bar = sys.stderr.isatty()
    return Dataset(data.name, transform(data.x_train, features, progress=bar), data.y_train,
                   transform(data.x_test, features, progress=bar), data.y_test)
