"""Atomic file writes: a reader never sees a half-written result (temp file + rename)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from dpcert.errors import UserError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """The path of a new temp file in ``path``'s folder, renamed onto ``path`` when the block
    ends normally and removed when it raises (named as :func:`remove_stale_temp_files`
    expects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); results get the mode any new file gets here
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's file-mode creation mask, read without changing it where Linux shows it
    (``os.umask`` can only be read by setting it, which races with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` by calling ``write`` on a temp file in the same folder, then renaming it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temp files an interrupted :func:`atomic_write` left in ``folder``; their count."""
    stale = list(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda h: h.write(text.encode()))


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda h: np.savez(h, **arrays))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda h: np.save(h, array, allow_pickle=False))


def atomic_save_unit(path: Path, **arrays: np.ndarray) -> None:
    """:func:`atomic_save_npz` for a unit of work, with the crash-test failpoints around it."""
    if _failpoint_armed("mid-write"):
        atomic_write(path, lambda h: _write_half_then_die(h, arrays))
    atomic_save_npz(path, **arrays)
    failpoint("unit-done")


# -- failpoints: deterministic crashes for the crash-safety tests ------------------------------
# DPCERT_FAILPOINT="<name>:<k>" makes the process SIGKILL itself the k-th time it reaches the
# failpoint <name> ("mid-write": halfway through writing an .npz; "unit-done": right after a
# unit file is in place). A real SIGKILL, not an exception: no cleanup handler runs.

_HITS: dict[str, int] = {}


def _failpoint_armed(name: str) -> bool:
    spec = os.environ.get("DPCERT_FAILPOINT", "")
    target, _, count = spec.partition(":")
    if target != name:
        return False
    _HITS[name] = _HITS.get(name, 0) + 1
    return str(_HITS[name]) == count


def failpoint(name: str) -> None:
    if _failpoint_armed(name):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_half_then_die(handle: IO[bytes], arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def instance_blocks(scores: np.ndarray, values: int = 2**24) -> Iterator[np.ndarray]:
    """Consecutive blocks along axis 0 of ensemble scores (P, N, L) of about ``values``
    numbers each (at least one instance), so a memory-mapped scores.npy of any P (~4 GB at
    P = 10,000 on Fashion-MNIST) is read a block at a time, never whole."""
    step = max(1, values // max(1, scores[0].size))
    for i in range(0, len(scores), step):
        yield scores[i:i + step]


def load_array(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    """np.load without pickles; every failure becomes a one-line UserError. ``mmap``: a
    read-only memory map (for ensemble scores, P x N x L, which may not fit in memory)."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} path is a directory, expected a .npy file: {path}") from None
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"cannot read {what} file {path} as a .npy array: {err}") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise UserError(f"{what} file {path} is an .npz archive; pass a single .npy array")
    return arr


# -- model weights: safetensors with a checksum ---------------------------------------------


def tensors_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``arrays`` in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.view(np.uint8).ravel().data if a.size else b"")
    return digest.hexdigest()


def atomic_save_tensors(path: Path, arrays: dict[str, np.ndarray],
                        metadata: dict[str, str] | None = None) -> None:
    """Write ``arrays`` as a safetensors file (no pickle; readable by any safetensors
    library) with their :func:`tensors_digest` in the header's metadata, atomically."""
    from safetensors.numpy import save

    meta = dict(metadata or {})
    meta["sha256"] = tensors_digest(arrays)
    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
    atomic_write(path, lambda h: h.write(blob))


def load_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """The arrays and metadata of a file written by :func:`atomic_save_tensors`, or None when
    it is missing, truncated, not safetensors, or fails its checksum — never half-checked
    weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError, ValueError, TypeError):
        return None
    if meta.get("sha256") != tensors_digest(arrays):
        return None
    return arrays, meta
