"""K cells' networks as one module, so the database trains many cells in one pass.

``CellEnsemble`` is built from K ``TrainedNetwork``s (their weights copied) and computes
what each of them computes: the stem is one convolution with K*C outputs, every other
convolution is grouped (groups = the networks that have it), and every BatchNorm
normalises K*C channels, so network k only ever sees its own channels. On each edge of a
cell a convolution runs on the channel groups of the networks whose cell has it there,
so no network pays for another's operations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nb201.cells import EDGES, OPS, Cell
from ..nb201.network import CellBlock, ResidualReduction
from .trainer import TrainedNetwork

SKIP, CONV1, CONV3, POOL = (OPS.index(n) for n in ("skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"))


@torch.no_grad()
def _stack_into(dst: nn.Module, sources: Sequence[nn.Module]) -> None:
    """dst's parameters and buffers become the sources' stacked along the first axis."""
    for name, value in dst.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        value.copy_(torch.cat([src.state_dict()[name] for src in sources]))


class GroupedReLUConvBN(nn.Sequential):
    """``k`` independent ReLU-conv-BN blocks on k channel groups."""

    def __init__(self, k: int, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(k * c_in, k * c_out, kernel, stride, kernel // 2, groups=k, bias=False),
            nn.BatchNorm2d(k * c_out),
        )


class EnsembleCell(nn.Module):
    def __init__(self, cells: Sequence[Cell], blocks: Sequence[CellBlock], channels: int):
        super().__init__()
        k, c = len(cells), channels
        self.convs = nn.ModuleDict()
        self.plan: list[list[tuple[int, str | None]]] = []  # per edge: (op, buffer name)
        for e in range(len(EDGES)):
            steps = []
            for op in sorted({cell.ops[e] for cell in cells}):
                users = [j for j, cell in enumerate(cells) if cell.ops[e] == op]
                name = None
                if len(users) < k:  # some networks lack this op here: a mask or a channel index
                    name = f"sel_{e}_{op}"
                    if op in (CONV1, CONV3):
                        index = torch.tensor([u * c + i for u in users for i in range(c)])
                        self.register_buffer(name, index, persistent=False)
                    else:
                        mask = torch.zeros(k, c)
                        mask[users] = 1.0
                        self.register_buffer(name, mask.view(1, k * c, 1, 1), persistent=False)
                if op in (CONV1, CONV3):
                    conv = GroupedReLUConvBN(len(users), c, c, 1 if op == CONV1 else 3)
                    _stack_into(conv, [blocks[u].edges[e] for u in users])
                    self.convs[f"{e}_{op}"] = conv
                if op != 0:  # 'none' adds nothing
                    steps.append((op, name))
            self.plan.append(steps)

    def _edge(self, e: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for op, name in self.plan[e]:
            sel = getattr(self, name) if name else None
            if op in (CONV1, CONV3):
                conv = self.convs[f"{e}_{op}"]
                if sel is None:
                    out = out + conv(x)
                else:
                    y = conv(x.index_select(1, sel))
                    out = out.index_add(1, sel, y.to(out.dtype))  # bf16 conv output, fp32 sum
            else:
                y = x if op == SKIP else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
                out = out + (y if sel is None else y * sel)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for target in (1, 2, 3):
            total = torch.zeros_like(x)
            for e, (dst, src) in enumerate(EDGES):
                if dst == target:
                    total = self._edge(e, nodes[src], total)
            nodes.append(total)
        return nodes[3]


class GroupedReduction(nn.Module):
    def __init__(self, blocks: Sequence[ResidualReduction], c_in: int, c_out: int):
        super().__init__()
        k = len(blocks)
        self.conv_a = GroupedReLUConvBN(k, c_in, c_out, 3, stride=2)
        self.conv_b = GroupedReLUConvBN(k, c_out, c_out, 3)
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2, 2, ceil_mode=True), nn.Conv2d(k * c_in, k * c_out, 1, groups=k, bias=False)
        )
        _stack_into(self.conv_a, [b.conv_a for b in blocks])
        _stack_into(self.conv_b, [b.conv_b for b in blocks])
        _stack_into(self.shortcut, [b.shortcut for b in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class CellEnsemble(nn.Module):
    """K networks in one: images (B, 3, S, S) in [0, 1] -> logits (K, B, classes)."""

    def __init__(self, networks: Sequence[TrainedNetwork]):
        super().__init__()
        nets = [n.net for n in networks]
        config = nets[0].config
        if any(n.config != config for n in nets):
            raise ValueError("the networks of an ensemble must share their shape")
        k, c = len(nets), config.channels
        self.members = k
        self.register_buffer("mean", networks[0].mean.clone())
        self.register_buffer("std", networks[0].std.clone())
        self.stem = nn.Sequential(nn.Conv2d(config.in_channels, k * c, 3, padding=1, bias=False), nn.BatchNorm2d(k * c))
        _stack_into(self.stem, [n.stem for n in nets])
        blocks: list[nn.Module] = []
        width = c
        for i, first in enumerate(nets[0].blocks):
            column = [n.blocks[i] for n in nets]
            if isinstance(first, ResidualReduction):
                blocks.append(GroupedReduction(column, width, 2 * width))
                width *= 2
            else:
                blocks.append(EnsembleCell([n.cell for n in nets], column, width))
        self.blocks = nn.Sequential(*blocks)
        self.head_bn = nn.BatchNorm2d(k * width)
        _stack_into(self.head_bn, [n.head[0] for n in nets])
        with torch.no_grad():
            self.fc_weight = nn.Parameter(torch.stack([n.classifier.weight for n in nets]))  # (K, classes, 4C)
            self.fc_bias = nn.Parameter(torch.stack([n.classifier.bias for n in nets]))  # (K, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.blocks(self.stem((x - self.mean) / self.std))  # (B, K*4C, H', W')
        h = F.adaptive_avg_pool2d(F.relu(self.head_bn(h)), 1).view(b, self.members, -1)  # (B, K, 4C)
        return torch.einsum("bkc,knc->kbn", h, self.fc_weight) + self.fc_bias[:, None]
