"""Console and output helpers shared by the subcommands."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

# No markup: what we print is plain text, much of it the user's (paths, class names), and
# rich would read "[my data]" in a path as a tag. Style goes in Text objects instead.
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)


def print_error(message: str) -> None:
    err_console.print(Text("error:", style="bold red"), message, highlight=False)


def print_json(data: Any) -> None:
    # Plain stdout, no rich wrapping: scripts parse this.
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
