"""Atomic file writes: a reader sees the old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError


def _kind(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken link"
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def _check_target(path: Path, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    # A replace swaps whatever is at ``path`` for our file: fine for a file, a disaster for
    # /dev/null. A link to a regular file counts as one (the link is replaced, not its target).
    if not path.is_file():
        raise UserError(f"{path} is {_kind(path)}, not a regular file; give a file name to write")
    if not overwrite:
        raise UserError(f"{path} exists; add --force to replace it")


def check_writable(path: Path, overwrite: bool = True) -> None:
    """Fail early, in one line, when ``path`` cannot be written (or, unless ``overwrite``,
    already exists)."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"output path {path} is a folder; give a file name")
    _check_target(path, overwrite)
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}: permission denied")


def check_output_folder(path: Path, ours: Callable[[str], bool] = lambda name: False) -> None:
    """A folder a command fills must be new, empty, or hold only what ``ours`` accepts
    (hidden entries aside): never a file, never a folder of someone else's files."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is {'a file' if path.is_file() else _kind(path)}; give a folder")
    if path.is_dir():
        try:
            foreign = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and not ours(p.name))
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror}") from err
        if foreign:
            raise UserError(f"{path} is not empty ({foreign[0]}, ...); give a new or empty folder")


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold an flock on ``path`` (created if needed); raise UserError(busy) if another
    process, or another open of it here, holds it. The OS drops it when a holder dies."""
    try:
        fh = open(path, "a+")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from err
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        yield


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_paths(*paths: Path, overwrite: bool = True) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``paths``; move them all into place only on success.

    On any exception (KeyboardInterrupt included) the temporary files are removed and the
    targets are left as they were. Only regular files (or nothing) are ever replaced;
    ``overwrite=False`` refuses existing files too.
    """
    for path in paths:
        check_writable(path, overwrite)
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
        for path in paths:  # again: writing took a while
            _check_target(path, overwrite)
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
    except OSError as err:
        raise UserError(f"cannot write {err.filename or paths[0]}: {err.strerror}") from err
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
