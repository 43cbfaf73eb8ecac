"""`dpcert compare` at small scale on digits, and the DPA hash partition."""

import numpy as np
import pytest

from dpcert.compare import CompareConfig, compare, hash_partition
from dpcert.errors import UserError


def test_hash_partition_depends_only_on_the_example():
    rng = np.random.default_rng(0)
    x = rng.random((50, 1, 4, 4)).astype(np.float32)
    parts = hash_partition(x, 7)
    assert parts.min() >= 0 and parts.max() < 7
    # removing or adding other examples leaves every example's part unchanged
    np.testing.assert_array_equal(hash_partition(x[10:], 7), parts[10:])
    extra = np.concatenate([x, rng.random((5, 1, 4, 4)).astype(np.float32)])
    np.testing.assert_array_equal(hash_partition(extra, 7)[:50], parts)


def test_compare_small_digits(tmp_path):
    cfg = CompareConfig.from_mapping({
        "dp": {"instances": 4, "steps": 10, "workers": 1},
        "dpa": {"models": 5, "epochs": 1},
        "bagging": {"models": 5, "subsample": 50, "epochs": 1},
    })
    text = compare(cfg, tmp_path, progress=False)
    for name in ("dp (pld, sound)", "dpa (k=5)", "bagging (N=5, k=50)", "baseline-DP"):
        assert name in text
    assert (tmp_path / "compare.md").exists() and (tmp_path / "compare.png").exists()
    assert len(list((tmp_path / "dpa").glob("model_*.npz"))) == 5
    again = compare(cfg, tmp_path, progress=False)  # reuses every trained unit
    assert again == text


def test_compare_config_errors():
    with pytest.raises(UserError):
        CompareConfig.from_mapping({"colour": 1})
    with pytest.raises(UserError):
        CompareConfig.from_mapping({"methods": ["dp", "magic"]})
    with pytest.raises(UserError):
        CompareConfig.from_mapping({"dpa": {"partitions": 3}})
