"""Console and output helpers shared by the subcommands."""

from __future__ import annotations

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
