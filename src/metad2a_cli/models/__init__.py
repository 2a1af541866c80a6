"""MetaD2A's three networks, in PyTorch (training and reference inference)."""

from .generator import CellGenerator
from .predictor import MetaPredictor
from .set_encoder import SetEncoder
from ..sizes import ModelSizes

__all__ = ["CellGenerator", "MetaPredictor", "ModelSizes", "SetEncoder"]
