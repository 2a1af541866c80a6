"""GRU message passing over the fixed 8-node NAS-Bench-201 cell graph (D-VAE style).

Each node's input state is the gated sum of its predecessors' states (each tagged with the
predecessor's one-hot position, as in D-VAE); a GRU cell then reads the node's type. With
one topology for every cell this is 8 batched steps, no per-graph Python.
"""

from __future__ import annotations

import torch
from torch import nn

from ...nb201.graph import NUM_NODE_TYPES, NUM_NODES, PREDECESSORS, SUCCESSORS


class GatedMessage(nn.Module):
    """Sum over neighbours u of sigmoid(W_g [h_u, id_u]) * (W_m [h_u, id_u])."""

    def __init__(self, hidden: int):
        super().__init__()
        self.gate = nn.Linear(hidden + NUM_NODES, hidden)
        self.map = nn.Linear(hidden + NUM_NODES, hidden, bias=False)

    def forward(self, states: list[torch.Tensor], neighbours: list[int]) -> torch.Tensor:
        # states[u]: (B, H) for every neighbour u; returns (B, H)
        h = torch.stack([states[u] for u in neighbours], dim=1)  # (B, n, H)
        ids = torch.eye(NUM_NODES, dtype=h.dtype, device=h.device)[neighbours]  # (n, 8)
        h = torch.cat([h, ids.expand(h.shape[0], -1, -1)], dim=-1)
        return (torch.sigmoid(self.gate(h)) * self.map(h)).sum(1)



class DagGRU(nn.Module):
    """One direction of propagation: one-hot node types (B, 8, 7) -> node states (B, 8, H)."""

    def __init__(self, hidden: int, reverse: bool = False):
        super().__init__()
        self.hidden = hidden
        self.reverse = reverse
        self.cell = nn.GRUCell(NUM_NODE_TYPES, hidden)
        self.message = GatedMessage(hidden)

    def forward(self, types_one_hot: torch.Tensor) -> torch.Tensor:
        b = types_one_hot.shape[0]
        states: list[torch.Tensor] = [None] * NUM_NODES  # type: ignore[list-item]
        order = range(NUM_NODES - 1, -1, -1) if self.reverse else range(NUM_NODES)
        sources = SUCCESSORS if self.reverse else PREDECESSORS
        for v in order:
            if sources[v]:
                h_in = self.message(states, sources[v])
            else:
                h_in = types_one_hot.new_zeros(b, self.hidden)
            states[v] = self.cell(types_one_hot[:, v], h_in)
        return torch.stack(states, dim=1)
