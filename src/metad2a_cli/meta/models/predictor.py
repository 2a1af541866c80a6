"""MetaD2A's meta-performance predictor: (dataset, cell) -> predicted accuracy."""

from __future__ import annotations

import torch
from torch import nn

from ..sizes import ModelSizes
from .dag_gru import DagGRU
from .set_encoder import SetEncoder


class GraphEncoder(nn.Module):
    """Bidirectional DAG-GRU: one-hot cell graphs (B, 8, 7) -> (B, latent)."""

    def __init__(self, hidden: int, latent: int):
        super().__init__()
        self.forward_gru = DagGRU(hidden)
        self.backward_gru = DagGRU(hidden, reverse=True)
        self.unify = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, latent)

    def forward(self, types_one_hot: torch.Tensor) -> torch.Tensor:
        h_fwd = self.forward_gru(types_one_hot)[:, -1]  # output node, after everything
        h_bwd = self.backward_gru(types_one_hot)[:, 0]  # input node, after everything
        return self.out(self.unify(torch.cat([h_fwd, h_bwd], dim=-1)))


class MetaPredictor(nn.Module):
    def __init__(self, sizes: ModelSizes = ModelSizes()):
        super().__init__()
        self.sizes = sizes
        self.set_encoder = SetEncoder(sizes.feature_dim, sizes.latent, sizes.heads)
        self.graph_encoder = GraphEncoder(sizes.hidden, sizes.latent)
        self.head = nn.Sequential(
            nn.Linear(2 * sizes.latent, sizes.hidden), nn.Tanh(), nn.Linear(sizes.hidden, 1)
        )

    def score(self, dataset: torch.Tensor, graphs: torch.Tensor) -> torch.Tensor:
        """dataset (B, latent) and cell embeddings (B, latent) -> (B,) scores."""
        return self.head(torch.cat([dataset, graphs], dim=-1)).squeeze(-1)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, types_one_hot: torch.Tensor
    ) -> torch.Tensor:
        # One dataset per cell: features (B, K, M, F), mask (B, K, M), cells (B, 8, 7) -> (B,)
        return self.score(self.set_encoder(features, mask), self.graph_encoder(types_one_hot))
