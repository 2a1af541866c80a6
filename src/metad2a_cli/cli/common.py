"""Console and output helpers shared by the subcommands."""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C

# No markup: what we print is plain text, much of it the user's (paths, class names), and
# rich would read "[my data]" in a path as a tag. Style goes in Text objects instead.
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)


def reflowed(command):
    """``command`` with its docstring's prose lines joined, as its --help text. Rich help keeps
    line breaks (so that examples stay one to a line); the source's wrapping at 90 columns
    would otherwise break sentences wherever the terminal is wider or narrower. Indented
    lines (examples) keep their own lines."""
    lines: list[str] = []
    for line in inspect.cleandoc(command.__doc__ or "").splitlines():
        prose = line and not line[0].isspace()
        if prose and lines and lines[-1] and not lines[-1][0].isspace() and not lines[-1].endswith(":"):
            lines[-1] += " " + line
        else:
            lines.append(line)
    command.__doc__ = "\n".join(lines)
    return command


def lazy_progress(*columns, **kwargs):
    """A rich ``Progress`` that appears with its first bar: a command that fails before any
    work starts prints its error line alone, not after an empty display."""
    from rich.progress import Progress

    class LazyProgress(Progress):
        def __enter__(self):
            return self

        def add_task(self, *args, **kw):
            if not self.live.is_started:
                self.start()
            return super().add_task(*args, **kw)

        def stop(self):
            if self.live.is_started:  # rich ends even an unstarted display with a blank line
                super().stop()

    return LazyProgress(*columns, **kwargs)


def print_error(message: str) -> None:
    err_console.print(Text("error:", style="bold red"), message, highlight=False)


def print_class_notes(feats, short_too: bool = True) -> None:
    """What an encoding (``data.features.DatasetFeatures``) left out, and left short, by class."""
    if short_too and (short := feats.short_classes):
        listed = ", ".join(f"{name!r} has {n}" for name, n in short.items())
        err_console.print(f"{len(short)} class(es) with fewer than {feats.num_samples} readable images, used as they "
                          f"are: {listed}", highlight=False)
    if feats.dropped_classes:
        err_console.print(f"left out {len(feats.dropped_classes)} class(es) with no readable image: "
                          f"{', '.join(map(repr, feats.dropped_classes))}", highlight=False)
    if feats.stats.cache_write_error:
        err_console.print(f"feature cache not written: {feats.stats.cache_write_error}", highlight=False)


def print_json(data: Any) -> None:
    # Plain stdout, no rich wrapping: scripts parse this.
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
