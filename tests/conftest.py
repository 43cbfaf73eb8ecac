import pytest


@pytest.fixture(scope="session", autouse=True)
def _shared_feature_cache(tmp_path_factory):
    """ScatterNet features are keyed by the images' content and the transform version, so
    tests may share them (computing them is the slow part of the tests that use them); the
    group-table caches stay per test."""
    import os

    if "DPCERT_FEATURE_CACHE" not in os.environ:
        os.environ["DPCERT_FEATURE_CACHE"] = str(tmp_path_factory.mktemp("features"))
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own group-table cache, so none reads another's tables."""
    monkeypatch.setenv("DPCERT_CACHE", str(tmp_path / "cache"))
