from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSizes:
    """Layer sizes shared by the generator and the predictor (MetaD2A's defaults)."""

    feature_dim: int = 1280  # image feature size (EfficientNet-Lite0 penultimate)
    hidden: int = 56  # GRU hidden state (MetaD2A: hs)
    latent: int = 56  # dataset / graph latent (MetaD2A: nz)
    heads: int = 4  # attention heads in the set encoder

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSizes:
        return cls(**{k: int(data[k]) for k in ("feature_dim", "hidden", "latent", "heads")})
