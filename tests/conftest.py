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


#: Test modules about whole runs rather than the group tables: they share one table cache
#: per test process (a table is a pure function of mechanism, accounting and radius, written
#: atomically), so the same mechanism's tables are not rebuilt by every run they start.
SHARED_TABLES = {"test_attack", "test_compare", "test_crash", "test_docs", "test_ensemble",
                 "test_extras", "test_ray", "test_run", "test_serve"}


@pytest.fixture(scope="session", autouse=True)
def _shared_table_cache(tmp_path_factory):
    """The table cache of module- and session-scoped fixtures (never the user's own)."""
    import os

    os.environ["DPCERT_CACHE"] = str(tmp_path_factory.mktemp("tables"))
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Every test outside SHARED_TABLES gets its own group-table cache, so that none of the
    accounting tests reads another's tables."""
    if request.module.__name__.rpartition(".")[2] not in SHARED_TABLES:
        monkeypatch.setenv("DPCERT_CACHE", str(tmp_path / "cache"))
