"""The IDX file format (MNIST and Fashion-MNIST): a magic number naming the element type and
the number of dimensions, the dimensions big-endian, then the elements. Read raw or gzipped,
by the dataset readers and by ``dpcert predict``; every header is checked before anything is
allocated."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from dpcert.errors import UserError

#: Largest IDX dimension product we accept (guards against hostile headers).
_MAX_IDX_ITEMS = 1 << 31


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
