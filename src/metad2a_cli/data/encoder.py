"""The image encoder: EfficientNet-Lite0 with ImageNet weights, pooled to a 1280-d feature.

This module only names and prepares: identity, preprocessing, devices. The network itself
(``efficientnet.py``) and torch are loaded on first use, so a run whose features are all
cached (a repeated ``metad2a search``) never imports torch. Inputs are scaled as
``(x - 127) / 128``, as the TensorFlow-trained weights expect (docs/encoder.md).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from .lite0 import ARCH, FEATURE_DIM, WEIGHTS_SHA256

if TYPE_CHECKING:
    import torch

    from .efficientnet import EfficientNetLite0

# Chosen by measurement on this project's held-out sets: docs/encoder.md.
DEFAULT_RESOLUTION = 96
# The database's images are at most 64 px on their longer side. Larger images are shrunk
# to that first, so a user's photo and a database image are seen alike (docs/encoder.md).
SOURCE_SIDE = 64


def identity(resolution: int = DEFAULT_RESOLUTION, max_side: int | None = SOURCE_SIDE) -> str:
    """Names what produced a feature: architecture, weights and input handling.

    Used as the feature-cache key and recorded in files built from features; it changes
    whenever the weights, the input resolution or the size cap would change the numbers.
    """
    cap = f"-max{max_side}" if max_side else ""
    return f"{ARCH}-imagenet-{WEIGHTS_SHA256[:8]}-{resolution}px{cap}"


# -- preprocessing ---------------------------------------------------------------------------


def to_input(image, resolution: int, max_side: int | None = SOURCE_SIDE) -> np.ndarray:
    """An RGB PIL image -> (resolution, resolution, 3) uint8.

    An image longer than ``max_side`` is first shrunk to it (aspect kept, Lanczos), as the
    database's images were. Then the whole image is squashed into the square: small,
    tightly framed images keep every pixel (docs/encoder.md compares a centre crop). PIL's
    resize widens its filter when shrinking, so large photos are antialiased.
    """
    from PIL import Image

    w, h = image.size
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float, scaled as the weights were trained."""
    x = batch.permute(0, 3, 1, 2).float()
    return (x - 127.0) / 128.0


# -- the encoder -----------------------------------------------------------------------------


def check_device(device: str) -> None:
    """Refuse a device name we cannot use, without importing torch (a warm cache never does)."""
    kind, _, number = device.partition(":")
    if device in ("auto", "cpu", "cuda") or (kind == "cuda" and number.isdigit()):
        return
    raise UserError(f"unknown device {device!r}; choose auto, cpu or cuda")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU; asking for ``cuda`` without one is an error."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset and container CPU sets
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_all_cores() -> None:
    """Let torch's CPU kernels use every usable core; an explicit OMP_NUM_THREADS wins."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(usable_cpus())


class ImageEncoder:
    """Batches of prepared images -> 1280-d float32 features.

    Cheap to create: the network is built and its weights read on first use, so a run whose
    features are all cached never pays for it. On a GPU it runs in half precision (the
    features come back as float32 either way); on the CPU it uses every usable core
    unless ``OMP_NUM_THREADS`` is set.
    """

    def __init__(
        self,
        resolution: int = DEFAULT_RESOLUTION,
        device: str = "auto",
        batch_size: int = 64,
        max_side: int | None = SOURCE_SIDE,
    ):
        if resolution < 32:
            raise UserError(f"encoder resolution {resolution} is too small; use at least 32")
        self.resolution = resolution
        self.max_side = max_side
        self.device_name = device
        self.batch_size = batch_size
        self.identity = identity(resolution, max_side)

    @property
    def decode_size(self) -> int:
        """The least size both sides need when decoding (JPEGs may decode smaller)."""
        return min(self.resolution, self.max_side or self.resolution)

    @cached_property
    def device(self) -> torch.device:
        # Resolved on first use: a run that only reads cached features needs no torch.
        return resolve_device(self.device_name)

    @property
    def half(self) -> bool:
        return self.device.type == "cuda"

    @cached_property
    def model(self) -> EfficientNetLite0:
        from .efficientnet import _shared_cpu_model

        if self.device.type == "cpu":
            use_all_cores()
            return _shared_cpu_model()
        model = copy.deepcopy(_shared_cpu_model()).to(self.device)
        return model.half() if self.half else model

    def prepare(self, image) -> np.ndarray:
        return to_input(image, self.resolution, self.max_side)

    def encode(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Prepared images (``prepare``'s output, or a (B, H, W, 3) uint8 tensor) -> (B, 1280)."""
        import torch

        with torch.inference_mode():
            return self._encode(images)

    def _encode(self, images) -> torch.Tensor:
        import torch

        if len(images) == 0:
            return torch.empty(0, FEATURE_DIM)
        batch = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.stack(images))
        out = []
        for chunk in batch.split(self.batch_size):
            x = normalize(chunk.to(self.device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            out.append(self.model.features(x.half() if self.half else x).float().cpu())
        return torch.cat(out)

    def classify(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """ImageNet class probabilities (B, 1000); used to prove the weights are right."""
        import torch

        with torch.inference_mode():
            x = normalize(torch.from_numpy(np.stack(images)).to(self.device))
            x = x.contiguous(memory_format=torch.channels_last)
            logits = self.model(x.half() if self.half else x).float()
            return logits.softmax(-1).cpu()
