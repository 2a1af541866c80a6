"""metad2a: pick a NAS-Bench-201 architecture for an image dataset (MetaD2A).

The library API lives here; the ``metad2a`` command only wraps it. Names that need torch
are imported on first use, so ``import metad2a_cli`` (and ``metad2a --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import UserError
from .space import EDGES, NUM_CELLS, OPS, Cell, CellError, all_cells

_LAZY = {
    "Cost": "cost",
    "cell_cost": "cost",
    "Network": "network",
    "NetworkConfig": "network",
    "count_parameters": "network",
    "build_network": "export",
    "export_network": "export",
    "ExportResult": "export",
    "ExportCheckError": "export",
    "node_types": "graph",
    "one_hot_graphs": "graph",
    "ADJACENCY": "graph",
}

__all__ = ["EDGES", "NUM_CELLS", "OPS", "Cell", "CellError", "UserError", "all_cells", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .cost import Cost, cell_cost
    from .export import ExportCheckError, ExportResult, build_network, export_network
    from .graph import ADJACENCY, node_types, one_hot_graphs
    from .network import Network, NetworkConfig, count_parameters
