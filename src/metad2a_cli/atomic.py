"""Atomic file writes: a reader sees the old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def check_writable(path: Path) -> None:
    """Fail early, in one line, when ``path`` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"output path {path} is a folder; give a file name")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}: permission denied")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_paths(*paths: Path) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``paths``; move them all into place only on success.

    On any exception (KeyboardInterrupt included) the temporary files are removed and the
    targets are left as they were.
    """
    for path in paths:
        check_writable(path)
    temps: list[Path] = []
    try:
        for path in paths:
            # Keep the real suffix last: some writers (torch.export.save) insist on it.
            fd, name = tempfile.mkstemp(
                prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent
            )
            os.close(fd)
            temps.append(Path(name))
        yield temps
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; a result file is not secret
        for temp in temps:
            with open(temp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(temp, mode)
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
    except OSError as err:
        raise UserError(f"cannot write {err.filename or paths[0]}: {err.strerror}") from err
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
