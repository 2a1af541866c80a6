"""The NAS-Bench-201 network a cell defines (the benchmark's macro skeleton).

    stem: conv3x3(in_ch -> C) + BN
    stage 1: N cells at C
    reduction: residual block C -> 2C, stride 2
    stage 2: N cells at 2C
    reduction: residual block 2C -> 4C, stride 2
    stage 3: N cells at 4C
    head: BN-ReLU, global average pool, linear(4C -> classes)

Layer choices (bias-free convs, affine BN, avg-pool without padded zeros, the 1x1 shortcut
after 2x2 average pooling) follow NAS-Bench-201 so parameter counts equal its published ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .cells import EDGES, Cell


@dataclass(frozen=True)
class NetworkConfig:
    """Everything besides the cell that fixes a network's shapes."""

    num_classes: int = 10
    channels: int = 16  # C: width of the first stage
    cells_per_stage: int = 5  # N
    in_channels: int = 3
    input_size: tuple[int, int] = (32, 32)

    def validate(self) -> None:
        if self.num_classes < 2:
            raise UserError(f"--num-classes must be at least 2, got {self.num_classes}")
        if self.channels < 1 or self.cells_per_stage < 1:
            raise UserError("--channels and --cells must be positive")
        if self.in_channels not in (1, 3):
            raise UserError(f"input channels must be 1 or 3, got {self.in_channels}")
        if min(self.input_size) < 16:
            raise UserError(f"input size must be at least 16x16, got {self.input_size}")


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
        )


class Zero(nn.Module):
    """The 'none' operation: the edge carries nothing. ``CellBlock`` leaves such edges out
    of its sums instead of calling this; it keeps the edge's place in the state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0


def make_op(name: str, channels: int) -> nn.Module:
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if name == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(name)


def live_edges(cell: Cell) -> list[tuple[int, int, int]]:
    """(edge index, target node, source node) of the edges whose result reaches the cell's
    output: not 'none', and into a node that feeds the output through other such edges.
    The rest add zeros, or values nothing reads, so the network skips them; its outputs and
    gradients are the same numbers."""
    live, kept = {3}, []
    for i in reversed(range(len(EDGES))):  # sorted by target: the edges out of a node come after those into it
        dst, src = EDGES[i]
        if dst in live and cell.op_names[i] != "none":
            live.add(src)
            kept.append((i, dst, src))
    return kept[::-1]


class CellBlock(nn.Module):
    """One cell: node j is the sum of op(node i) over its incoming edges."""

    def __init__(self, cell: Cell, channels: int):
        super().__init__()
        self.edges = nn.ModuleList(make_op(name, channels) for name in cell.op_names)
        self.live = live_edges(cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes: dict[int, torch.Tensor] = {0: x}
        for i, dst, src in self.live:  # sorted by target: a node is complete before it is read
            # A node all of whose inputs are 'none' holds zeros; a convolution on it still
            # gives its batch norm's shift.
            term = self.edges[i](nodes[src] if src in nodes else torch.zeros_like(x))
            nodes[dst] = nodes[dst] + term if dst in nodes else term
        return nodes[3] if 3 in nodes else torch.zeros_like(x)


class ResidualReduction(nn.Module):
    """Halves the resolution and changes the width between stages."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.shortcut = nn.Sequential(
            # ceil_mode keeps the shortcut the same size as the stride-2 conv on odd inputs;
            # on even inputs (all of NAS-Bench-201's) it changes nothing.
            nn.AvgPool2d(2, stride=2, ceil_mode=True),
            nn.Conv2d(c_in, c_out, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class Network(nn.Module):
    def __init__(self, cell: Cell, config: NetworkConfig = NetworkConfig()):
        super().__init__()
        self.cell = cell
        self.config = config
        c = config.channels
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        )
        blocks: list[nn.Module] = []
        for stage, width in enumerate((c, 2 * c, 4 * c)):
            if stage > 0:
                blocks.append(ResidualReduction(width // 2, width))
            blocks.extend(CellBlock(cell, width) for _ in range(config.cells_per_stage))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(4 * c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Linear(4 * c, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, H, W) -> logits (B, num_classes)
        return self.classifier(self.head(self.blocks(self.stem(x))))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
