"""MetaD2A's hierarchical set encoder (Set Transformer blocks).

Images of each class are pooled into a class prototype, then the prototypes into one
dataset vector. Both levels are attention pools, so the result does not depend on the
order of images or classes. Sets of unequal size are batched with boolean masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MAB(nn.Module):
    """Multihead attention block: queries attend to a (masked) set of keys."""

    def __init__(self, dim_q: int, dim_k: int, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim)  # MetaD2A scales by the full width, not per head
        self.q = nn.Linear(dim_q, dim)
        self.k = nn.Linear(dim_k, dim)
        self.v = nn.Linear(dim_k, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # q: (B, Nq, dim_q), k: (B, Nk, dim_k), key_mask: (B, Nk) True = real element
        b, nq, nk, h = q.shape[0], q.shape[1], k.shape[1], self.heads
        q = self.q(q)
        qh = q.view(b, nq, h, -1).transpose(1, 2)  # (B, h, Nq, d)
        kh = self.k(k).view(b, nk, h, -1).transpose(1, 2)
        vh = self.v(k).view(b, nk, h, -1).transpose(1, 2)
        scores = (qh @ kh.transpose(-1, -2)) * self.scale  # (B, h, Nq, Nk)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        o = qh + scores.softmax(-1) @ vh
        o = o.transpose(1, 2).reshape(b, nq, -1)  # (B, Nq, dim)
        return o + F.relu(self.out(o))


class SAB(nn.Module):
    def __init__(self, dim_in: int, dim: int, heads: int):
        super().__init__()
        self.mab = MAB(dim_in, dim_in, dim, heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mab(x, x, mask)


class PMA(nn.Module):
    """Pools a set into one vector with a learned seed query."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.seed = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_uniform_(self.seed)
        self.mab = MAB(dim, dim, dim, heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mab(self.seed.expand(x.shape[0], -1, -1), x, mask)


class SetPool(nn.Module):
    """Two self-attention blocks, an attention pool, a linear map: (B, N, d_in) -> (B, d_out)."""

    def __init__(self, dim_in: int, dim: int, dim_out: int, heads: int):
        super().__init__()
        self.sab1 = SAB(dim_in, dim, heads)
        self.sab2 = SAB(dim, dim, heads)
        self.pool = PMA(dim, heads)
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # A set with no real element (batch padding) would softmax over nothing; let it
        # attend to its padding instead. Its output is masked out one level up.
        mask = mask | ~mask.any(-1, keepdim=True)
        x = self.sab2(self.sab1(x, mask), mask)
        return self.proj(self.pool(x, mask)).squeeze(1)


class SetEncoder(nn.Module):
    """Dataset features (B, K classes, M images, F) + mask (B, K, M) -> (B, latent)."""

    def __init__(self, feature_dim: int, latent: int, heads: int):
        super().__init__()
        self.intra = SetPool(feature_dim, latent, latent, heads)
        self.inter = SetPool(latent, latent, latent, heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, k, m, f = x.shape
        protos = self.intra(x.reshape(b * k, m, f), mask.reshape(b * k, m)).view(b, k, -1)
        return self.inter(protos, mask.any(-1))  # (B, latent)
