"""Console and output helpers shared by the subcommands."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def print_json(data: Any) -> None:
    # Plain stdout, no rich wrapping: scripts parse this.
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
