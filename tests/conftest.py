import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own group-table cache, so none reads another's tables."""
    monkeypatch.setenv("DPCERT_CACHE", str(tmp_path / "cache"))
