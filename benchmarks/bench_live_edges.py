"""Training time with and without the cell's 'none' and dead edges.

NAS-Bench-201's cell sums every edge, a 'none' edge as x * 0, and computes nodes whose
result never reaches the cell's output. `CellBlock` computes only `live_edges`: the same
outputs and gradients (`tests/test_network.py` holds them equal to the bit), less work.
This times `fit`'s Trainer (`bench_fit.fit_epochs`) on random images with each forward,
alternating the two in rounds, and reports the median epoch time of each and their ratio
per cell; it also says how many of NAS-Bench-201's cells have edges to skip and what
share of their convolutions' multiply-adds goes.

    OMP_NUM_THREADS=1 python benchmarks/bench_live_edges.py --out docs/bench_live_edges.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from bench_fit import fit_epochs

from metad2a_cli.nb201.cells import EDGES, Cell, all_cells
from metad2a_cli.nb201.network import CellBlock, live_edges
from metad2a_cli.training.fitdata import LabeledImages

CELLS = {
    "resnet (11472)": "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|",
    "node 2 dead": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|none~2|",
    "largest (1462), nothing to skip": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
}
CONV_COST = {"nor_conv_3x3": 9, "nor_conv_1x1": 1}  # multiply-adds per pixel and channel pair


def every_edge_forward(block: CellBlock, x: torch.Tensor) -> torch.Tensor:
    nodes = [x]
    for target in (1, 2, 3):
        nodes.append(sum(op(nodes[src]) for op, (dst, src) in zip(block.edges, EDGES) if dst == target))
    return nodes[3]


LIVE_FORWARD = CellBlock.forward


def epoch_seconds(cell: Cell, forward, data: LabeledImages, batch: int, epochs: int) -> tuple[list[float], float]:
    """``fit_epochs`` with ``forward`` as the cell's; returns (seconds per epoch, validation loss)."""
    CellBlock.forward = forward
    try:
        times, trainer = fit_epochs(cell, data, 10, batch, epochs, torch.device("cpu"), 0, float("inf"))
        return times, trainer.evaluate().loss
    finally:
        CellBlock.forward = LIVE_FORWARD


def skipped_share() -> dict:
    """Over all 15,625 cells: how many skip a convolution, and the cells' conv work skipped."""
    cells, shares, any_skip = all_cells(), [], 0
    for cell in cells:
        live = {i for i, _, _ in live_edges(cell)}
        total = sum(CONV_COST.get(name, 0) for name in cell.op_names)
        gone = sum(CONV_COST.get(name, 0) for i, name in enumerate(cell.op_names) if i not in live)
        any_skip += gone > 0
        if total:
            shares.append(gone / total)
    return {"cells": len(cells), "cells_skipping_a_convolution": any_skip,
            "mean_share_of_cell_conv_work_skipped": float(np.mean(shares)), "over_cells_with_convolutions": len(shares)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--batch", type=int, default=32, help="a database label's batch on a 1,600-image task")
    ap.add_argument("--epochs", type=int, default=2, help="per run; the first is warm-up")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = LabeledImages(rng.integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8),
                         rng.integers(0, 10, args.images).astype(np.int64))
    result = {"machine": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "images": args.images, "batch": args.batch, "rounds": args.rounds,
              "space": skipped_share(), "cells": {}}
    print(json.dumps(result["space"]), flush=True)
    for name, text in CELLS.items():
        cell = Cell.from_any(text)
        runs = {"every edge": [], "live edges": []}
        losses = {}
        for _ in range(args.rounds):
            for variant, forward in (("every edge", every_edge_forward), ("live edges", LIVE_FORWARD)):
                times, loss = epoch_seconds(cell, forward, data, args.batch, args.epochs)
                runs[variant] += times[1:]
                losses[variant] = loss
        old, new = statistics.median(runs["every edge"]), statistics.median(runs["live edges"])
        entry = {"cell": str(cell), "every_edge_s": old, "live_edges_s": new, "time_ratio": new / old,
                 "epoch_seconds": runs, "same_validation_loss": losses["every edge"] == losses["live edges"]}
        result["cells"][name] = entry
        print(f"{name}: every edge {old:.2f} s, live edges {new:.2f} s an epoch, ratio {new / old:.3f}, "
              f"same loss {entry['same_validation_loss']}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
