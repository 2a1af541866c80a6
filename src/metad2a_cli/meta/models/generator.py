"""MetaD2A's set-to-graph generator: a VAE whose decoder writes cells node by node.

Encoder q(z|D): the set encoder gives mu and log-variance of the dataset latent z.
Decoder p(G|z): a D-VAE-style GRU visits the 8 graph nodes in order; at each op node it
predicts the node type from the previous node's state, then updates its own state from its
predecessors' (gated) states and its type. NAS-Bench-201 fixes the edges, so the decoder
only chooses the 6 operation types, and every sample is a valid cell by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...nb201.graph import (
    INPUT_TYPE,
    NUM_NODE_TYPES,
    NUM_NODES,
    OUTPUT_TYPE,
    PREDECESSORS,
)
from ..sizes import ModelSizes
from .dag_gru import GatedMessage
from .set_encoder import SetEncoder


class CellGenerator(nn.Module):
    def __init__(self, sizes: ModelSizes = ModelSizes()):
        super().__init__()
        self.sizes = sizes
        h, z = sizes.hidden, sizes.latent
        self.set_encoder = SetEncoder(sizes.feature_dim, z, sizes.heads)
        self.to_mu = nn.Linear(z, z)
        self.to_logvar = nn.Linear(z, z)
        self.z_to_h0 = nn.Linear(z, h)
        self.cell = nn.GRUCell(NUM_NODE_TYPES, h)
        self.message = GatedMessage(h)
        self.type_head = nn.Sequential(
            nn.Linear(h, 2 * h), nn.ReLU(), nn.Linear(2 * h, NUM_NODE_TYPES - 2)
        )

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, M, F), (B, K, M) -> mu, logvar (B, latent)."""
        v = self.set_encoder(features, mask)
        return self.to_mu(v), self.to_logvar(v)

    def _step(self, states: list[torch.Tensor], v: int, type_ids: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(type_ids, NUM_NODE_TYPES).to(states[0].dtype)
        return self.cell(one_hot, self.message(states, PREDECESSORS[v]))

    def _start(self, z: torch.Tensor) -> list[torch.Tensor]:
        h0 = torch.tanh(self.z_to_h0(z))
        start = torch.full((z.shape[0],), INPUT_TYPE, dtype=torch.long, device=z.device)
        return [self.cell(F.one_hot(start, NUM_NODE_TYPES).to(z.dtype), h0)]

    def log_likelihood(self, z: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log p(cell | z): z (B, latent), ops (B, 6) op indices -> (B,)."""
        states = self._start(z)
        total = z.new_zeros(z.shape[0])
        for v in range(1, NUM_NODES - 1):
            logp = self.type_head(states[-1]).log_softmax(-1)  # (B, 5)
            total = total + logp.gather(1, ops[:, v - 1 : v]).squeeze(1)
            states.append(self._step(states, v, ops[:, v - 1] + 2))
        return total

    @torch.no_grad()
    def sample(self, z: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Decode z (B, latent) into cells, (B, 6) op indices.

        ``uniforms`` (B, 6) in [0, 1) drive the draws by inverse CDF, so a decode is a pure
        function of its inputs (and the NumPy engine reproduces it exactly).
        """
        states = self._start(z)
        ops = []
        for v in range(1, NUM_NODES - 1):
            cdf = self.type_head(states[-1]).softmax(-1).cumsum(-1)
            op = (cdf < uniforms[:, v - 1 : v]).sum(-1).clamp(max=cdf.shape[-1] - 1)
            ops.append(op)
            states.append(self._step(states, v, op + 2))
        # The output node's type is fixed; decoding stops before it.
        return torch.stack(ops, dim=1)

    def loss(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        ops: torch.Tensor,
        kl_weight: float = 0.005,
        noise: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VAE loss for one target cell per dataset: (total, reconstruction, KL), summed."""
        mu, logvar = self.encode(features, mask)
        eps = torch.randn(mu.shape, generator=noise, device=mu.device, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)
        recon = -self.log_likelihood(z, ops).sum()
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return recon + kl_weight * kl, recon, kl


assert OUTPUT_TYPE == 1  # the decoder assumes op types start right after input and output
