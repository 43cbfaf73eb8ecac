"""What a trained ensemble takes as input, and how new inputs become exactly that.

An :class:`InputSpec` is stored with every kept ensemble: the image shape the dataset reader
produced (C, H, W), the integer range the reader divided by (16 for scikit-learn's digits, 255
for every other image source), and the fixed feature map the run applied (``scatter`` or
none). :meth:`InputSpec.to_images` accepts inputs in any of the forms a user has at hand and
converts them the way the reader converted the training data; :meth:`InputSpec.to_model_input`
then applies the run's own feature map, so the models see what they saw in training.

Accepted forms, N inputs at a time:

* float arrays (N, C, H, W), or (N, H, W) when C = 1, with values in [0, 1]: what the dataset
  readers return (``load_digits().x_test``), used as they are;
* integer arrays of the same shapes with values in [0, raw_max]: raw pixels, divided by
  ``raw_max`` in float64 and rounded to float32, exactly as the readers do;
* for runs with a feature map, float arrays (N, D) of precomputed features (D the run's
  feature dimension): used as they are;
* image files (PNG, JPEG, anything Pillow reads; :func:`read_image_file`): converted to grey
  or RGB by the channel count, resized to (H, W) when they differ, scaled by 1/255.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dpcert.errors import UserError

#: Largest number of pixels an image file may decode to (guards against decompression bombs).
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class InputSpec:
    """The input of a kept ensemble: images of ``shape`` (C, H, W) in [0, 1] that the reader
    made from integers in [0, raw_max], then ``features`` (None or a name of
    :mod:`dpcert.learning.features`) giving vectors of ``feature_dim`` numbers."""

    #: None for an ensemble trained on the user's own feature vectors (an npz of (n, D))
    shape: tuple[int, int, int] | None
    raw_max: int = 255
    features: str | None = None
    feature_dim: int | None = None

    def __post_init__(self) -> None:
        if self.shape is None:
            if self.feature_dim is None or self.features is not None:
                raise UserError("an input without an image shape is a feature vector: give "
                                "feature_dim and no feature map")
            return
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise UserError(f"input shape must be (C, H, W), got {self.shape}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        try:
            return cls(**d)
        except TypeError as err:
            raise UserError(f"damaged input description: {err}") from None

    @staticmethod
    def for_dataset(raw_max: int, image_shape: tuple[int, ...], features: str | None,
                    feature_dim: int | None) -> InputSpec:
        """The spec of a run on images that its dataset declares to be integers 0..raw_max
        (:class:`dpcert.learning.data.Dataset`: 16 for the digits, 255 for IDX and CIFAR
        files, an .npz's own ``raw_max``)."""
        return InputSpec(tuple(image_shape), int(raw_max), features, feature_dim)

    def describe(self) -> str:
        if self.shape is None:
            return f"feature vectors ({self.feature_dim})"
        c, h, w = self.shape
        feats = f", then {self.features} features ({self.feature_dim})" if self.features else ""
        return f"{c}x{h}x{w} images in [0, 1] (raw integers 0..{self.raw_max}){feats}"

    def is_features(self, x: np.ndarray) -> bool:
        return (self.feature_dim is not None and x.ndim == 2 and x.shape[1] == self.feature_dim
                and np.issubdtype(x.dtype, np.floating))

    def to_images(self, x: np.ndarray) -> np.ndarray:
        """Inputs as the reader's float32 images (N, C, H, W) in [0, 1]; UserError otherwise."""
        x = np.asarray(x)
        if self.shape is None:
            raise UserError(f"this ensemble takes feature vectors of shape (N, "
                            f"{self.feature_dim}) as float numbers; got {x.dtype} {x.shape}")
        c, h, w = self.shape
        if x.ndim == 3 and c == 1:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1:] != self.shape:
            want = f"(N, {c}, {h}, {w})" + (f" or (N, {h}, {w})" if c == 1 else "")
            if self.features:
                want += f" or features (N, {self.feature_dim})"
            raise UserError(f"inputs must have shape {want}; got {x.shape}")
        if len(x) == 0:
            raise UserError("no inputs given (an empty batch)")
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi > self.raw_max:
                raise UserError(f"integer inputs must be raw pixels in 0..{self.raw_max}, got "
                                f"values in {lo}..{hi}")
            return (x / float(self.raw_max)).astype(np.float32)
        if not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"inputs must be numbers, got dtype {x.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            x = x.astype(np.float32)
        if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
            raise UserError("float inputs must be finite and lie in [0, 1] (integer inputs are "
                            f"taken as raw pixels 0..{self.raw_max})")
        return np.ascontiguousarray(x)

    def to_model_input(self, x: np.ndarray, *, progress: bool = False) -> np.ndarray:
        """What the models take: features (N, D) for a run with a feature map, else images."""
        x = np.asarray(x)
        if self.is_features(x):
            if len(x) == 0:
                raise UserError("no inputs given (an empty batch)")
            x = x.astype(np.float32)
            if not np.all(np.isfinite(x)):
                raise UserError("feature inputs must be finite numbers")
            return np.ascontiguousarray(x)
        images = self.to_images(x)
        if self.features is None:
            return images
        from dpcert.learning.features import compute

        return compute(images, self.features, progress=progress)


def decode_image(data: bytes, spec: InputSpec, what: str = "image") -> np.ndarray:
    """One encoded image (PNG, JPEG, ...) -> float32 (C, H, W) in [0, 1] for ``spec``."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("reading image files needs Pillow: pip install 'dpcert[serve]'"
                        ) from None
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if spec.shape is None:
        raise UserError("this ensemble takes feature vectors, not images")
    c, h, w = spec.shape
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            SyntaxError) as err:
        raise UserError(f"{what} is not a readable image ({err})") from None
    if c not in (1, 3):
        raise UserError(f"image files can feed 1- or 3-channel models, this one has {c}")
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return (arr / 255.0).astype(np.float32)


def read_image_file(path: Path, spec: InputSpec) -> np.ndarray:
    """An image file -> float32 (C, H, W) in [0, 1]."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return decode_image(data, spec, what=str(path))


def read_inputs(path: Path, spec: InputSpec) -> tuple[np.ndarray, list[str]]:
    """Inputs from a file or folder, with a name per input.

    ``.npy`` (an array in any form :class:`InputSpec` accepts), an IDX file (raw or .gz, e.g.
    ``t10k-images-idx3-ubyte``), one image file, or a folder of image files (sorted by name).
    Returns the array (not yet converted) and the names (``file`` or ``file[i]``)."""
    from dpcert.learning.idx import read_idx
    from dpcert.store import load_array

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return np.stack([read_image_file(p, spec) for p in files]), [p.name for p in files]
    if not path.exists():
        raise UserError(f"inputs not found: {path}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_image_file(path, spec)[None], [path.name]
    if path.suffix == ".npy":
        x = np.asarray(load_array(path, "inputs"))
    elif "idx" in path.name or path.suffix == ".gz":
        x = read_idx(path)
    else:
        raise UserError(f"cannot tell the format of {path}: give a .npy array, an IDX file, "
                        f"an image ({', '.join(IMAGE_SUFFIXES)}) or a folder of images")
    if x.ndim == 0:
        raise UserError(f"{path} holds a single number, not inputs")
    return x, [f"{path.name}[{i}]" for i in range(len(x))]
