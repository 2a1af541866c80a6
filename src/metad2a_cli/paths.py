"""Where metad2a keeps its files: one cache root, overridable for tests and users."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$METAD2A_CACHE``, else ``$XDG_CACHE_HOME/metad2a``, else ``~/.cache/metad2a``."""
    if explicit := os.environ.get("METAD2A_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metad2a"


def runs_dir() -> Path:
    return cache_dir() / "runs"
