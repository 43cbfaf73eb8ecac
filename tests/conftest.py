import os

# One compute thread per test process, inherited by the dpcert processes tests start: the
# suite already runs one test process per core (pytest-xdist), and OpenMP threads that
# spin-wait for a core another process holds made whole-run tests 4-9x slower (a crash-test
# run: 20 s alone, 149 s beside another test file; 17 s with one thread each).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402


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
