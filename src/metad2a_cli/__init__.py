"""metad2a: pick a NAS-Bench-201 architecture for an image dataset (MetaD2A).

The library API lives here; the ``metad2a`` command only wraps it. Names that need torch
are imported on first use, so ``import metad2a_cli`` (and ``metad2a --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

from .errors import UserError
from .nb201.cells import EDGES, NUM_CELLS, OPS, Cell, CellError, all_cells

_LAZY = {
    "Cost": "nb201.cost",
    "cell_cost": "nb201.cost",
    "Network": "nb201.network",
    "NetworkConfig": "nb201.network",
    "count_parameters": "nb201.network",
    "build_network": "nb201.export",
    "export_network": "nb201.export",
    "ExportResult": "nb201.export",
    "ExportCheckError": "nb201.export",
    "node_types": "nb201.graph",
    "one_hot_graphs": "nb201.graph",
    "ADJACENCY": "nb201.graph",
}

__all__ = ["EDGES", "NUM_CELLS", "OPS", "Cell", "CellError", "UserError", "all_cells", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .nb201.cost import Cost, cell_cost
    from .nb201.export import (
        ExportCheckError,
        ExportResult,
        build_network,
        export_network,
    )
    from .nb201.graph import ADJACENCY, node_types, one_hot_graphs
    from .nb201.network import Network, NetworkConfig, count_parameters
