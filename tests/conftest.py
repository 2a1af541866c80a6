import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # No test may read or write the user's real cache.
    monkeypatch.setenv("METAD2A_CACHE", str(tmp_path_factory.mktemp("metad2a-cache")))
