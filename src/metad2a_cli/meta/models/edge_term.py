"""The predictor's dataset term: how a dataset, trained at the database's budget, reorders the
published table, as a sum over the cell's six edges of a weight for the operation on each.

MetaD2A's own head, an MLP over a (dataset, cell embedding) pair, learned from 150 records on
15 tasks, overrode the table with cells no record was near (docs/generalization.md). Each
record here instead teaches something about five operation choices on each of six edges, and
the term extrapolates only as far as that additivity carries. The edge weights are a part
shared by every dataset plus a linear function of the dataset's embedding (scaled to unit
length); both start at zero (the table's order) and are held to it by a ridge penalty
(``penalty``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...nb201.cells import EDGES, OPS

FEATURES = len(EDGES) * len(OPS)  # 30
# Base-5 place value of each edge in Cell.code, first edge most significant.
_PLACE = tuple(len(OPS) ** (len(EDGES) - 1 - e) for e in range(len(EDGES)))


def edge_op_columns(codes: torch.Tensor) -> torch.Tensor:
    """(B,) Cell.code -> (B, 6) the column of each edge's operation among the 30 features."""
    ops = codes[:, None] // torch.tensor(_PLACE, device=codes.device) % len(OPS)
    return ops + len(OPS) * torch.arange(len(EDGES), device=codes.device)


def codes_of(types_one_hot: torch.Tensor) -> torch.Tensor:
    """One-hot cell graphs (B, 8, 7) -> (B,) Cell.code (op types start at id 2)."""
    ops = types_one_hot[:, 1:-1, 2:].argmax(-1)  # (B, 6)
    return (ops * torch.tensor(_PLACE, device=ops.device)).sum(-1)


class EdgeOpTerm(nn.Module):
    def __init__(self, latent: int):
        super().__init__()
        self.shared = nn.Parameter(torch.zeros(FEATURES))
        self.by_dataset = nn.Linear(latent, FEATURES, bias=False)
        nn.init.zeros_(self.by_dataset.weight)

    def forward(self, dataset: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        # dataset (B, latent), codes (B,) -> (B,)
        # Unit length: a dataset unlike every training task cannot move the weights further
        # than the ridge let any of them.
        weights = self.shared + self.by_dataset(F.normalize(dataset, dim=-1))  # (B, 30)
        return weights.gather(1, edge_op_columns(codes)).sum(-1)

    def penalty(self) -> torch.Tensor:
        """Squared norm of the edge weights' parameters: the ridge that keeps them near zero."""
        return self.shared.square().sum() + self.by_dataset.weight.square().sum()
