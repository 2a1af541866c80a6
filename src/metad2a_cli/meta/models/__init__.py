"""MetaD2A's three networks, in PyTorch (training and reference inference)."""

from ..sizes import ModelSizes
from .generator import CellGenerator
from .predictor import MetaPredictor
from .set_encoder import SetEncoder

__all__ = ["CellGenerator", "MetaPredictor", "ModelSizes", "SetEncoder"]
