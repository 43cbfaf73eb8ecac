"""Atomic writes: whole files or none, with the mode any new file gets."""

import os
import stat

import numpy as np
import pytest

from dpcert.store import _umask, atomic_path, atomic_save_npy, atomic_write_text, load_array


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert _umask() == mask
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save_npy(tmp_path / "b.npy", np.arange(3))
        with open(tmp_path / "plain", "w"):
            pass  # what open() makes under the same mask
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~mask
    for name in ("a.txt", "b.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "result.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_load_array_memory_map(tmp_path):
    atomic_save_npy(tmp_path / "s.npy", np.arange(12.0).reshape(3, 4))
    mapped = load_array(tmp_path / "s.npy", "scores", mmap=True)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, load_array(tmp_path / "s.npy", "scores"))
