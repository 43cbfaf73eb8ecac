"""ScatterNet features: per-example (data-independent), normalised, cached."""

import numpy as np
import pytest

from dpcert.errors import UserError
from dpcert.learning import features


@pytest.fixture()
def images():
    return np.random.default_rng(0).random((12, 1, 28, 28), dtype=np.float32)


def test_features_of_an_example_do_not_depend_on_the_others(images):
    """The certificate needs a per-example map: a poisoner's examples cannot move the clean
    examples' features."""
    full = features.scatter_features(images)
    assert full.shape == (12, 81 * 7 * 7) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-5)
    alone = features.scatter_features(images[3:4])
    others = images.copy()
    others[[0, 1, 2, 4]] = 1.0 - others[[0, 1, 2, 4]]
    np.testing.assert_allclose(alone[0], full[3], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(features.scatter_features(others)[3], full[3], rtol=1e-4,
                               atol=1e-6)


def test_group_normalisation_by_hand():
    import torch

    s = torch.rand(2, 18, 3, 3)
    got = features.normalise(s).numpy()
    for b in range(2):
        groups = s[b].numpy().reshape(2, -1)
        z = (groups - groups.mean(1, keepdims=True)) / groups.std(1, ddof=1, keepdims=True)
        want = z.ravel() / np.linalg.norm(z)
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-6)


def test_transform_caches_by_content(images, tmp_path, monkeypatch):
    monkeypatch.setenv("DPCERT_FEATURE_CACHE", str(tmp_path))
    first = features.transform(images, "scatter")
    assert len(list(tmp_path.glob("scatter-*.npy"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(features, "scatter_features", boom)
    np.testing.assert_array_equal(features.transform(images, "scatter"), first)
    with pytest.raises(AssertionError):  # other images: another cache entry
        features.transform(images[:5], "scatter")
    next(tmp_path.glob("scatter-*.npy")).write_bytes(b"damaged")
    with pytest.raises(AssertionError):  # a damaged entry is recomputed, not trusted
        features.transform(images, "scatter")


def test_bad_requests_are_user_errors(images):
    with pytest.raises(UserError):
        features.transform(images, "pixels")
    with pytest.raises(UserError):
        features.scatter_features(np.zeros((3, 28, 28), np.float32))


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (2, 3, 32, 32), (3, 1, 8, 8)])
def test_grouped_scattering_equals_kymatio(shape):
    """The wavelets batched per scale give kymatio's own coefficients, in its order."""
    import torch

    sc = features._scattering(shape[-2:])
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = sc(x), features._scatter_by_groups(sc, x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
