"""MetaD2A's graph form of a cell: 8 nodes, 7 node types.

Node 0 is the input, nodes 1..6 are the six edge operations in ``EDGES`` order, node 7 the
output. Type ids: 0 = input, 1 = output, 2 + op index for an operation (as in MetaD2A).
Every NB201 cell has the same 8-node topology, only the types differ, which is what lets
the models run over thousands of cells as plain batched tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .cells import EDGES, OPS, Cell

if TYPE_CHECKING:
    import torch

NUM_NODES = len(EDGES) + 2  # 8
NUM_NODE_TYPES = len(OPS) + 2  # 7
INPUT_TYPE, OUTPUT_TYPE = 0, 1


def _adjacency() -> np.ndarray:
    # adj[u, v] = 1 when node u feeds node v. An op node on edge (dst <- src) reads the
    # op nodes that end in cell node `src` (or the input node when src == 0); the output
    # node reads every op that ends in cell node 3.
    adj = np.zeros((NUM_NODES, NUM_NODES), dtype=bool)
    for v, (_, src) in enumerate(EDGES, start=1):
        if src == 0:
            adj[0, v] = True
        for u, (dst, _) in enumerate(EDGES, start=1):
            if dst == src:
                adj[u, v] = True
    for u, (dst, _) in enumerate(EDGES, start=1):
        if dst == 3:
            adj[u, NUM_NODES - 1] = True
    return adj


ADJACENCY = _adjacency()  # (8, 8), strictly upper triangular: node order is topological
PREDECESSORS = [np.flatnonzero(ADJACENCY[:, v]).tolist() for v in range(NUM_NODES)]
SUCCESSORS = [np.flatnonzero(ADJACENCY[v]).tolist() for v in range(NUM_NODES)]


def node_type_array(cells: Sequence[Cell]) -> np.ndarray:
    """(B, 8) int64 node type ids, without torch."""
    ops = np.asarray([c.ops for c in cells], dtype=np.int64).reshape(len(cells), len(EDGES))
    types = np.empty((len(cells), NUM_NODES), dtype=np.int64)
    types[:, 0], types[:, 1:-1], types[:, -1] = INPUT_TYPE, ops + 2, OUTPUT_TYPE
    return types


def node_types(cells: Sequence[Cell]) -> torch.Tensor:
    """(B, 8) long tensor of node type ids."""
    import torch

    return torch.from_numpy(node_type_array(cells))


def cells_from_node_types(types: torch.Tensor | np.ndarray) -> list[Cell | None]:
    """Inverse of ``node_types``; rows that are not a valid cell give None."""
    cells: list[Cell | None] = []
    for row in types.tolist():
        inner = row[1:-1]
        ok = (
            len(row) == NUM_NODES
            and row[0] == INPUT_TYPE
            and row[-1] == OUTPUT_TYPE
            and all(2 <= t < NUM_NODE_TYPES for t in inner)
        )
        cells.append(Cell(tuple(t - 2 for t in inner)) if ok else None)
    return cells


def one_hot_graphs(cells: Sequence[Cell]) -> torch.Tensor:
    """(B, 8, 7) float one-hot node features."""
    import torch

    return torch.nn.functional.one_hot(node_types(cells), NUM_NODE_TYPES).float()
