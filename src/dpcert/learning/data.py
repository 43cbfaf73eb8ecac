"""Datasets, read offline: scikit-learn digits, MNIST-style IDX files, CIFAR-10 batches, .npz.

Every loader returns a :class:`Dataset` with float32 images in [0, 1], shape (n, C, H, W), and
int64 labels. A missing or malformed dataset is a one-line :class:`UserError` naming what was
expected where.

What one example may change. Every certificate bounds the effect of inserted or deleted
training examples *through the training algorithm it accounts for*, so nothing a loader hands
on may be a statistic of the whole training set: the scale of the inputs, the label set and
the number of examples the learning rate is scaled by are *declared* — by the dataset's own
description (IDX and CIFAR files are bytes 0..255 of 10 classes, the digits are 0..16) or by
entries of an .npz (``raw_max``, ``num_classes``, ``train_size``) — and never read off the
examples. An example outside the declared input range, or with a label outside the declared
set, is refused in one line that names it; it is never rescaled or given a class of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpcert.errors import UserError, missing_extra, unknown_keys_error
from dpcert.learning.idx import read_idx


@dataclass(frozen=True)
class Dataset:
    """Train and test splits: x float32 (n, C, H, W) in [0, 1] (or features (n, D)),
    y int64 (n,) in 0..num_classes-1.

    ``num_classes``, ``raw_max`` (the integer range images were divided by) and
    ``declared_size`` (the number of training examples a DP run scales its learning rate by;
    None where the dataset declares none) are declared, never computed from the training
    split. Construction checks every example against them and refuses, in one line naming the
    example, any image value outside [0, 1], any non-finite feature and any label outside the
    declared set."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    raw_max: int = 255
    declared_size: int | None = None

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
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            raise UserError(f"{self.name}: the label set must be declared as an integer "
                            f"number of classes >= 2, got {self.num_classes!r}")
        for split in ("train", "test"):
            check_examples(getattr(self, f"x_{split}"), self.name, split)
            check_labels(getattr(self, f"y_{split}"), self.num_classes, self.name, split)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> str:
        """sha256 of the training split as the models see it (examples, labels, shapes):
        binds a kept ensemble to the data it was trained on."""
        import hashlib

        h = hashlib.sha256()
        for a in (self.x_train, self.y_train):
            h.update(f"{a.dtype.str}|{a.shape}|".encode())
            h.update(np.ascontiguousarray(a).view(np.uint8).ravel().data)
        return h.hexdigest()


def part_fingerprints(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> list[str]:
    """sha256 of each part's examples and labels as a set (order-free): the digest of every
    example (its dtype, shape, bytes and label), sorted, hashed together. Two datasets'
    fingerprints differ exactly at the parts whose examples differ (per-part fingerprints of
    a partition defence's models, recorded in its ensemble description)."""
    import hashlib

    x = np.ascontiguousarray(x)
    head = f"{x.dtype.str}|{x.shape[1:]}|".encode()
    each = [hashlib.sha256(head + x[i].tobytes() + int(y[i]).to_bytes(8, "little",
                                                                      signed=True)).digest()
            for i in range(len(x))]
    return [hashlib.sha256(b"".join(sorted(each[i] for i in idx))).hexdigest()
            for idx in parts]


def _first_bad(ok: np.ndarray) -> tuple[int, int]:
    """(index of the first example whose row of ``ok`` (n, ...) is not all true, how many)."""
    bad = np.flatnonzero(~ok.reshape(len(ok), -1).all(axis=1))
    return (int(bad[0]), len(bad)) if len(bad) else (-1, 0)


def check_examples(x: np.ndarray, name: str, split: str) -> None:
    """Refuse images (n, C, H, W) with a value outside [0, 1] or features (n, D) with a
    non-finite value, naming the first such example: the range is declared, so an example
    outside it is an error, never a reason to rescale the others."""
    if x.ndim not in (2, 4) or len(x) == 0 or x.dtype != np.float32:
        raise UserError(f"{name}: {split} inputs must be non-empty float32 images (n, C, H, W) "
                        f"or features (n, D), got {x.dtype} {x.shape}")
    if x.ndim == 2:
        check_finite_examples(x, f"{name}: {split} example")
        return
    with np.errstate(invalid="ignore"):
        ok = (x >= 0) & (x <= 1)
    first, count = _first_bad(ok)
    if count:
        raise UserError(f"{name}: {split} example {first} has values outside the declared "
                        f"input range ({count} such example{'s' if count > 1 else ''}); the "
                        "scale of the data is declared, not read from it — fix or remove "
                        "the example")


def check_finite_examples(x: np.ndarray, what: str = "example") -> None:
    """Refuse an example (a row of x (n, ...)) with a non-finite value or a squared norm that
    overflows float32, naming the first: DP-SGD's clipping computes that norm, and one
    inf * 0 there (an example the model already fits) would make every instance NaN."""
    flat = np.asarray(x).reshape(len(x), -1)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", flat, flat, dtype=np.float32)
    first, count = _first_bad(np.isfinite(sq))
    if count:
        raise UserError(f"{what} {first} has a value that is not a finite number, or too "
                        f"large to square in float32 ({count} such example"
                        f"{'s' if count > 1 else ''}) — fix or remove it")


def check_labels(y: np.ndarray, num_classes: int, name: str, split: str) -> None:
    """Refuse labels outside the declared set 0..num_classes-1, naming the first one."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{name}: {split} labels must be integers (n,), got {y.dtype} "
                        f"{y.shape}")
    first, count = _first_bad((y >= 0) & (y < num_classes))
    if count:
        raise UserError(f"{name}: {split} example {first} has label {int(y[first])}, outside "
                        f"the declared label set 0..{num_classes - 1} ({count} such "
                        f"example{'s' if count > 1 else ''}); the label set is declared (an "
                        ".npz declares it as num_classes), never read off the training labels")


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
    # the embedded dataset is fixed: its split's size is a constant of the package
    return Dataset("digits", x[~test], y[~test], x[test], y[test], num_classes=10, raw_max=16,
                   declared_size=DIGITS_TRAIN_SIZE if test_fraction == 0.2 and seed == 0
                   else int((~test).sum()))


#: The standard training splits' sizes: what a DP run on these datasets declares.
MNIST_TRAIN_SIZE, CIFAR10_TRAIN_SIZE, DIGITS_TRAIN_SIZE = 60_000, 50_000, 1_438
DECLARED_SIZES = {"digits": DIGITS_TRAIN_SIZE, "mnist": MNIST_TRAIN_SIZE,
                  "fashion-mnist": MNIST_TRAIN_SIZE, "cifar10": CIFAR10_TRAIN_SIZE}
#: The integer range each fixed reader divides its images by.
RAW_MAX = {"digits": 16, "mnist": 255, "fashion-mnist": 255, "cifar10": 255}


def _scaled(x: np.ndarray, raw_max: float) -> np.ndarray:
    """x / raw_max in float64, rounded to float32 (values are checked by :class:`Dataset`)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (x / float(raw_max)).astype(np.float32)


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
    if ytr.ndim != 1 or yte.ndim != 1 or not np.issubdtype(ytr.dtype, np.integer):
        raise UserError(f"{folder}: label files must hold one integer per image")
    # Bytes 0..255 of 10 classes, as the format declares; the standard training split has
    # 60,000 images (what a DP run scales its learning rate by, whatever the files hold).
    return Dataset(name, _scaled(xtr, 255)[:, None], ytr.astype(np.int64),
                   _scaled(xte, 255)[:, None], yte.astype(np.int64), num_classes=10,
                   raw_max=255, declared_size=MNIST_TRAIN_SIZE)


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
    return Dataset("cifar10", _scaled(xtr, 255), ytr, _scaled(xte, 255), yte, num_classes=10,
                   raw_max=255, declared_size=CIFAR10_TRAIN_SIZE)


def load_npz(path: Path) -> Dataset:
    """Any .npz with x_train, y_train, x_test, y_test: images (n, H, W) or (n, C, H, W), or
    your own feature vectors (n, D) (used as they are).

    What the file declares (never read off the training examples):

    * ``raw_max`` (optional scalar): images are numbers in [0, raw_max], divided by it.
      Without it, integer images are bytes 0..255 and float images lie in [0, 1] already.
    * ``num_classes`` (optional scalar): the label set 0..num_classes-1. Without it, the
      labels the test split uses (its largest + 1).
    * ``train_size`` (optional scalar): the number of training examples a DP run scales its
      learning rate by. Without it, a DP run on the file is refused (partition defences and
      Bagging do not need it).

    An image outside [0, raw_max] or a label outside the label set is refused in one line
    naming the split and the example's index."""
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"dataset file not found: {path}") from None
    except (ValueError, OSError, EOFError):
        # numpy's own message here suggests loading pickles unsafely: say what is wrong instead
        raise UserError(f"{path} is not an .npz file of numeric arrays (np.savez writes one)"
                        ) from None
    keys = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in keys if k not in z]
    if missing:
        raise UserError(f"{path} lacks arrays {missing}")
    declarations = ("raw_max", "num_classes", "train_size")
    unknown = set(z.files) - {*keys, *declarations}
    if unknown:  # a misspelt declaration would otherwise be ignored without a word
        raise unknown_keys_error(unknown, (*keys, *declarations), f"arrays in {path}")
    try:
        x_tr, y_tr, x_te, y_te = (np.asarray(z[k]) for k in keys)
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"{path} holds arrays that are not numbers ({err})") from None
    declared = {k: _npz_scalar(path, z, k) for k in declarations}
    for y, what in ((y_tr, "y_train"), (y_te, "y_test")):
        if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path}: {what} must be integer labels (n,), got {y.dtype} "
                            f"{y.shape}")
    num_classes = declared["num_classes"] or max(2, int(y_te.max()) + 1)
    if x_tr.ndim == 2 or x_te.ndim == 2:
        if declared["raw_max"] is not None:
            raise UserError(f"{path}: raw_max declares an image scale; feature vectors are "
                            "used as they are")
        xs = _npz_features(path, x_tr, x_te)
        raw_max = 255
    else:
        xs, raw_max = _npz_images(path, x_tr, x_te, declared["raw_max"])
    for y, x, what in ((y_tr, xs[0], "training"), (y_te, xs[1], "test")):
        if len(y) != len(x):
            raise UserError(f"{path}: {len(x)} {what} inputs but {len(y)} labels")
    return Dataset(path.stem, xs[0], y_tr.astype(np.int64), xs[1], y_te.astype(np.int64),
                   num_classes=num_classes, raw_max=raw_max,
                   declared_size=declared["train_size"])


def _npz_scalar(path: Path, z, key: str) -> int | None:
    """A declared positive integer of an .npz (a 0-d array), or None when absent."""
    if key not in z:
        return None
    try:
        v = np.asarray(z[key])
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"{path}: {key} is not a number ({err})") from None
    if v.shape != () or not np.issubdtype(v.dtype, np.integer) or int(v) < 1:
        raise UserError(f"{path}: {key} must be one positive integer, got {v.dtype} {v.shape}")
    return int(v)


def _npz_images(path: Path, x_tr, x_te, raw_max: int | None) -> tuple[list, int]:
    """Both splits' images as float32 (n, C, H, W) in [0, 1], and the raw_max a kept
    ensemble records for raw integer inputs. The scale is one per file and declared
    (``raw_max``, or the dtype: integers are 0..255, floats 0..1); every value is checked
    against it, per example, by :class:`Dataset`."""
    integer = [np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_ for x in (x_tr, x_te)]
    if raw_max is None and integer[0] != integer[1]:
        raise UserError(f"{path}: x_train is {x_tr.dtype} and x_test {x_te.dtype}; the scale "
                        "is read from the dtype, so give both splits the same kind of number "
                        "(or declare raw_max)")
    divisor = raw_max if raw_max is not None else (255 if integer[0] else 1)
    out = []
    for x in (x_tr, x_te):
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.size == 0 or not np.issubdtype(x.dtype, np.number):
            raise UserError(f"{path}: images must be numbers of non-empty shape "
                            f"(n, [C,] H, W), got {x.dtype} {x.shape}")
        out.append(_scaled(x, divisor))
    if out[0].shape[1:] != out[1].shape[1:]:
        raise UserError(f"{path}: training images are {out[0].shape[1:]}, test images "
                        f"{out[1].shape[1:]}")
    return out, raw_max if raw_max is not None else 255


def _npz_features(path: Path, x_tr, x_te) -> list[np.ndarray]:
    """Feature vectors (n, D) from an .npz, float32, not rescaled (finiteness is checked
    per example by :class:`Dataset`)."""
    if x_tr.ndim != 2 or x_te.ndim != 2 or x_tr.shape[1] != x_te.shape[1] or x_tr.size == 0:
        raise UserError(f"{path}: feature vectors must be (n, D) in both splits with the same "
                        f"D, got {x_tr.shape} and {x_te.shape}")
    out = []
    for x in (x_tr, x_te):
        if not np.issubdtype(x.dtype, np.number):
            raise UserError(f"{path}: features must be numbers, got {x.dtype}")
        with np.errstate(over="ignore"):
            out.append(x.astype(np.float32))
    return out


def load_image_folder(folder: Path) -> Dataset:
    """Image files in class folders: ``folder/train/<class>/*`` and ``folder/test/<class>/*``
    (PNG, JPEG, anything Pillow reads), class folders sorted by name: label i is the i-th.

    The test split declares what the training split may not change: the label set (its
    class folders), the image size and the channels (grey when every test image is grey,
    else RGB). Training images are converted and, when their size differs, resized to it
    one by one, as ``dpcert predict`` does with new inputs; a training class folder that the
    test split lacks is refused, naming it. Pixels are bytes / 255. No size is declared: a
    DP run on a folder takes ``--train-size``."""
    folder = Path(folder)
    splits = [folder / "train", folder / "test"]
    for split in splits:
        if not split.is_dir():
            raise UserError(f"{folder} must hold train/ and test/ folders with one sub-folder "
                            f"per class; {split} is missing")
    classes = sorted(p.name for p in splits[1].iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(f"{splits[1]} holds {len(classes)} class folders; the test split "
                        "declares the label set and needs at least 2")
    extra = sorted(p.name for p in splits[0].iterdir()
                   if p.is_dir() and p.name not in classes)
    if extra:
        raise UserError(f"{splits[0] / extra[0]}: class {extra[0]!r} is not among the test "
                        f"split's classes ({', '.join(classes)}); the label set is declared "
                        "by the test split, never grown by the training data")
    from dpcert.learning.inputs import IMAGE_SUFFIXES, InputSpec, read_image_file

    files = {split.name: [(p, c) for c, name in enumerate(classes) if (split / name).is_dir()
                          for p in sorted((split / name).iterdir())
                          if p.suffix.lower() in IMAGE_SUFFIXES]
             for split in splits}
    for name, items in files.items():
        if not items:
            raise UserError(f"{folder / name} holds no image files "
                            f"({', '.join(IMAGE_SUFFIXES)})")
    shape = _declared_image_shape([p for p, _ in files["test"]])
    spec = InputSpec(shape, 255)
    arrays = {name: (np.stack([read_image_file(p, spec) for p, _ in items]),
                     np.array([c for _, c in items], np.int64))
              for name, items in files.items()}
    return Dataset(folder.name, *arrays["train"], *arrays["test"], num_classes=len(classes),
                   raw_max=255, declared_size=None)


def _declared_image_shape(paths: list[Path]) -> tuple[int, int, int]:
    """(C, H, W) of the test split's images: one size for all, grey (C = 1) when all are."""
    try:
        from PIL import Image
    except ImportError:
        raise missing_extra("image folders", "Pillow", "serve") from None
    sizes, grey = set(), True
    for p in paths:
        try:
            with Image.open(p) as img:
                sizes.add(img.size)
                grey &= img.mode in ("1", "L", "LA", "I", "I;16", "F")
        except (OSError, ValueError, SyntaxError) as err:
            raise UserError(f"{p} is not a readable image ({err})") from None
    if len(sizes) != 1:
        raise UserError(f"the test images have {len(sizes)} sizes ({sorted(sizes)[:3]} ...); "
                        "the test split declares one image size")
    (w, h), = sizes
    return (1 if grey else 3, h, w)


def load_dataset(name: str, path: Path | None = None) -> Dataset:
    """By name: digits (embedded), mnist / fashion-mnist (IDX folder), cifar10, npz (file),
    folder (image files in class folders)."""
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
    if name == "folder":
        return load_image_folder(Path(path))
    raise UserError(f"unknown dataset {name!r} (digits, mnist, fashion-mnist, cifar10, npz, "
                    "folder)")


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
    return dataclasses.replace(data, x_train=transform(data.x_train, features, progress=bar),
                               x_test=transform(data.x_test, features, progress=bar))
