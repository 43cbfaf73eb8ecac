import os

import pytest

os.environ.setdefault(
    "DPCERT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".dpcert-cache")
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPCERT_CACHE", str(tmp_path / "cache"))
