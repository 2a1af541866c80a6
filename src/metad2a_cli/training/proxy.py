"""Cheap proxy training of many NAS-Bench-201 cells at once, for the meta-training database.

``CellEnsemble`` holds K networks, one per cell, as one network with K channel groups: every
convolution is a grouped convolution (groups = K) and every BN normalises K*C channels, so
group k sees only network k's channels and the K networks are trained independently, on the
same batches, in one pass. On each edge a convolution runs only on the channel groups of
the networks whose cell has it there, so no network pays for another's operations, and the
ensemble computes exactly what K separate networks would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nb201.cells import EDGES, OPS, Cell


@dataclass(frozen=True)
class ProxySchedule:
    """How a cell is trained for a database record (a cheap stand-in for NB201's 200 epochs)."""

    channels: int = 8
    cells_per_stage: int = 1
    input_size: int = 16
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    augment: bool = True  # random crop (pad 2) and horizontal flip

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProxySchedule:
        return cls(**data)


class GroupedReLUConvBN(nn.Sequential):
    def __init__(self, k: int, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(k * c_in, k * c_out, kernel, stride, kernel // 2, groups=k, bias=False),
            nn.BatchNorm2d(k * c_out),
        )


class EnsembleCell(nn.Module):
    def __init__(self, cells: Sequence[Cell], channels: int):
        super().__init__()
        k = len(cells)
        self.convs = nn.ModuleDict()
        masks = torch.zeros(len(EDGES), len(OPS), k)
        for e in range(len(EDGES)):
            for j, cell in enumerate(cells):
                masks[e, cell.ops[e], j] = 1.0
            for op, kernel in ((2, 1), (3, 3)):
                users = masks[e, op].nonzero().flatten()
                if len(users):
                    # Only the networks that use this conv on this edge compute it: their
                    # channels are gathered, convolved as groups, and scattered back.
                    self.convs[f"{e}_{op}"] = GroupedReLUConvBN(len(users), channels, channels, kernel)
                    channel_idx = (users[:, None] * channels + torch.arange(channels)).flatten()
                    self.register_buffer(f"idx_{e}_{op}", channel_idx)
        # (edges, ops, K*C, 1, 1): which channel groups keep which op's output
        self.register_buffer("masks", masks.repeat_interleave(channels, dim=2)[..., None, None])
        self.used = [[op for op in range(len(OPS)) if masks[e, op].any()] for e in range(len(EDGES))]

    def _edge(self, e: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for op in self.used[e]:
            if op == 1:  # skip_connect
                out = out + x * self.masks[e, op]
            elif op == 4:  # avg_pool_3x3
                out = out + F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) * self.masks[e, op]
            elif op in (2, 3):
                idx = getattr(self, f"idx_{e}_{op}")
                y = self.convs[f"{e}_{op}"](x.index_select(1, idx))
                out = out.index_add(1, idx, y)
        return out  # 'none' adds nothing

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
    def __init__(self, k: int, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = GroupedReLUConvBN(k, c_in, c_out, 3, stride=2)
        self.conv_b = GroupedReLUConvBN(k, c_out, c_out, 3)
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2, 2, ceil_mode=True), nn.Conv2d(k * c_in, k * c_out, 1, groups=k, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class CellEnsemble(nn.Module):
    """K cells' NB201 networks in one: images (B, C_in, H, W) -> logits (K, B, classes)."""

    def __init__(self, cells: Sequence[Cell], num_classes: int, in_channels: int, channels: int, cells_per_stage: int):
        super().__init__()
        k, c = len(cells), channels
        self.k = k
        self.stem = nn.Sequential(
            nn.Conv2d(k * in_channels, k * c, 3, padding=1, groups=k, bias=False), nn.BatchNorm2d(k * c)
        )
        blocks: list[nn.Module] = []
        for stage, width in enumerate((c, 2 * c, 4 * c)):
            if stage > 0:
                blocks.append(GroupedReduction(k, width // 2, width))
            blocks.extend(EnsembleCell(cells, width) for _ in range(cells_per_stage))
        self.blocks = nn.Sequential(*blocks)
        self.head_bn = nn.BatchNorm2d(k * 4 * c)
        self.fc_weight = nn.Parameter(torch.empty(k, 4 * c, num_classes))
        self.fc_bias = nn.Parameter(torch.zeros(k, num_classes))
        bound = 1.0 / math.sqrt(4 * c)  # nn.Linear's default initialisation, per network
        nn.init.uniform_(self.fc_weight, -bound, bound)
        nn.init.uniform_(self.fc_bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.blocks(self.stem(x.repeat(1, self.k, 1, 1)))
        h = F.relu(self.head_bn(h)).mean((2, 3)).view(b, self.k, -1)  # (B, K, 4C)
        return torch.einsum("bkc,kcn->kbn", h, self.fc_weight) + self.fc_bias[:, None]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()  # one shift per batch: cheap
    x = padded[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def train_cells(
    cells: Sequence[Cell],
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    schedule: ProxySchedule = ProxySchedule(),
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Train each cell's network on ``train`` and return its accuracy (%) on ``val``.

    Images are float tensors (N, C, S, S) at the schedule's input size, labels int64 (N,).
    The same seed gives the same accuracies on the CPU.
    """
    x_train, y_train = train
    x_val, y_val = val
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CellEnsemble(cells, num_classes, x_train.shape[1], schedule.channels, schedule.cells_per_stage)
    model = model.to(device)
    steps_per_epoch = max(1, math.ceil(len(x_train) / schedule.batch_size))
    total_steps = schedule.epochs * steps_per_epoch
    opt = torch.optim.SGD(
        model.parameters(), lr=schedule.lr, momentum=0.9, nesterov=True, weight_decay=schedule.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    model.train()
    for _ in range(schedule.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * schedule.batch_size : (i + 1) * schedule.batch_size]
            if len(idx) < 2:
                continue  # BN needs two samples
            xb = x_train[idx]
            if schedule.augment:
                xb = _augment(xb, gen)
            logits = model(xb.to(device))  # (K, B, classes)
            yb = y_train[idx].to(device)
            loss = F.cross_entropy(logits.flatten(0, 1), yb.repeat(model.k), reduction="mean") * model.k
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    correct = torch.zeros(model.k)
    with torch.no_grad():
        for i in range(0, len(x_val), 512):
            logits = model(x_val[i : i + 512].to(device))
            correct += (logits.argmax(-1).cpu() == y_val[i : i + 512]).sum(1).float()
    return (100.0 * correct / len(x_val)).tolist()
