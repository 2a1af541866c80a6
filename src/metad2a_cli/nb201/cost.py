"""Parameter count and FLOPs of a cell's network, computed from shapes alone.

Closed-form so a search can annotate thousands of cells without building a network. FLOPs
follow NAS-Bench-201's convention: multiply-accumulates of convolutions and linear layers
(plus the linear bias), per image; pooling, BN and additions are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cells import Cell

_KERNEL = {"nor_conv_1x1": 1, "nor_conv_3x3": 3}


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def mflops(self) -> float:
        return self.flops / 1e6


def _halve(n: int) -> int:
    return (n + 1) // 2  # stride-2 3x3 conv with padding 1


def cell_cost(
    cell: Cell,
    num_classes: int = 10,
    channels: int = 16,
    cells_per_stage: int = 5,
    in_channels: int = 3,
    input_size: tuple[int, int] = (32, 32),
) -> Cost:
    h, w = input_size
    c = channels
    params = 9 * in_channels * c + 2 * c
    flops = 9 * in_channels * c * h * w
    for stage, width in enumerate((c, 2 * c, 4 * c)):
        if stage > 0:
            c_in = width // 2
            h, w = _halve(h), _halve(w)
            params += 9 * c_in * width + 2 * width + 9 * width * width + 2 * width + c_in * width
            flops += (9 * c_in * width + 9 * width * width + c_in * width) * h * w
        for name in cell.op_names:
            k = _KERNEL.get(name)
            if k is not None:
                params += cells_per_stage * (k * k * width * width + 2 * width)
                flops += cells_per_stage * k * k * width * width * h * w
    params += 2 * 4 * c + 4 * c * num_classes + num_classes
    flops += 4 * c * num_classes + num_classes
    return Cost(params=params, flops=flops)
