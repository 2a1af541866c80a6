"""MetaD2A's meta-performance predictor: (dataset, cell) -> predicted accuracy.

The score is the sum of the terms a checkpoint was trained with: ``table``, a
dataset-independent term of the cell alone, and ``dataset``, a term of the dataset and the
cell together, learned from the database's tasks (edge_term.py). Scores are standardised
accuracies.

The table term is the published full-training accuracy itself for every cell the table
lists (kept in the ``table_z`` buffer), and a learned prior, regressed on the same table,
for the cells it does not. A regression of 15,625 known numbers is only a blurred copy of
them: the prior alone put the table's 416th cell first (docs/generalization.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ...nb201.cells import NUM_CELLS
from ..sizes import ModelSizes
from .dag_gru import DagGRU
from .edge_term import EdgeOpTerm, codes_of
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


TERMS = ("table", "dataset")


class MetaPredictor(nn.Module):
    def __init__(self, sizes: ModelSizes = ModelSizes(), terms: tuple[str, ...] = TERMS):
        super().__init__()
        if not terms or set(terms) - set(TERMS):
            raise ValueError(f"terms must be a non-empty subset of {TERMS}, got {terms}")
        self.sizes = sizes
        self.terms = tuple(t for t in TERMS if t in terms)
        self.set_encoder = SetEncoder(sizes.feature_dim, sizes.latent, sizes.heads)
        self.graph_encoder = GraphEncoder(sizes.hidden, sizes.latent)
        self.prior = nn.Sequential(nn.Linear(sizes.latent, sizes.hidden), nn.Tanh(), nn.Linear(sizes.hidden, 1))
        if "dataset" in self.terms:
            self.dataset_term = EdgeOpTerm(sizes.latent)
        if "table" in self.terms:
            # (15625,) standardised published accuracy by Cell.code; NaN where the table has none
            self.register_buffer("table_z", torch.full((NUM_CELLS,), float("nan")))

    def set_table(self, codes: torch.Tensor, z: torch.Tensor) -> None:
        self.table_z[codes] = z.to(self.table_z.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Weights saved before the table was kept have no table_z: the buffer keeps what it
        # holds (NaN, so the prior scores every cell, or what the trainer set from the table).
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "table_z" in missing_keys:
            missing_keys.remove(prefix + "table_z")

    def prior_score(self, graphs: torch.Tensor) -> torch.Tensor:
        """Cell embeddings (B, latent) -> (B,) the learned dataset-independent scores."""
        return self.prior(graphs).squeeze(-1)

    def table_score(self, graphs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B,) dataset-independent scores: the table's value where cells ``codes`` (B,) are
        listed, else the prior's."""
        learned = self.prior_score(graphs)
        known = self.table_z[codes]
        return torch.where(torch.isnan(known), learned, known)

    def dataset_score(self, dataset: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """dataset (B, latent) and cells' Cell.code (B,) -> (B,) scores."""
        return self.dataset_term(dataset, codes)

    def score(self, dataset: torch.Tensor, graphs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The sum of the trained terms: dataset (B, latent), cells (B, latent) and their
        Cell.code (B,) -> (B,)."""
        total = self.table_score(graphs, codes) if "table" in self.terms else 0.0
        if "dataset" in self.terms:
            total = total + self.dataset_score(dataset, codes)
        return total

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, types_one_hot: torch.Tensor
    ) -> torch.Tensor:
        # One dataset per cell: features (B, K, M, F), mask (B, K, M), cells (B, 8, 7) -> (B,)
        return self.score(self.set_encoder(features, mask), self.graph_encoder(types_one_hot), codes_of(types_one_hot))
