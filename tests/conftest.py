import contextlib
import signal

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # No test may read or write the user's real cache.
    monkeypatch.setenv("METAD2A_CACHE", str(tmp_path_factory.mktemp("metad2a-cache")))


class TookTooLong(Exception):
    pass


@pytest.fixture
def time_limit():
    """``with time_limit(s):`` fails the test after s seconds (a hang must not stall the suite)."""

    @contextlib.contextmanager
    def limit(seconds: float):
        def expired(signum, frame):
            raise TookTooLong(f"still running after {seconds} s")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return limit
