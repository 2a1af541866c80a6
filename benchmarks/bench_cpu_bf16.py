"""Label speed and rounding on a CPU in each arithmetic, in one run on one machine.

`training.recipe.arithmetic` trains under bfloat16 autocast on every CPU: natively where the
CPU computes bfloat16 (AVX512-BF16 or AMX), elsewhere emulated (`FloatProducts`: products in
float32 on bfloat16 operands, rounded once). This times `label_cells` on one database task in
float32, emulated bfloat16 and, with ``--aten-fallback``, ATen's own bfloat16 (on a CPU
without it, its slow fallback; where native, the native kernels), interleaved round by
round so that other load on the machine falls on all alike, with one torch thread (as a
builder runs); it reports the median seconds per cell and epoch and each arithmetic's ratio
to float32. It also measures how far a grouped convolution's output and gradients land from
a float64 reference in each arithmetic (``rounding``): one rounding to bfloat16 is the least
any bfloat16 arithmetic can err.

    PYTHONPATH=src python benchmarks/bench_cpu_bf16.py --db databases/nb201_30ep --task t00084 \
        --out docs/bench_cpu_bf16_emulation.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from heldout_fit import LARGEST, RESNET
from metad2a_cli.meta.db import Database, load_task_images, task_seed
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training import recipe
from metad2a_cli.training.labels import label_cells

SHARED_IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "images"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rounding_errors(arithmetics: list[str]) -> dict:
    """Mean relative error against float64 of a grouped 3x3 convolution (a label ensemble's
    shape: 10 networks of 16 channels, batch 23, 16 px) and of its two gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 160, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(160, 16, 3, 3, generator=g) / 12
    grad = torch.randn(23, 160, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)

    def run(dtype, products=None):
        xe, we = (t.detach().to(dtype).requires_grad_() for t in (x, w))
        with products or contextlib.nullcontext():
            y = F.conv2d(xe, we, padding=1, groups=10)
            y.backward(grad.to(dtype))
        return [t.double() for t in (y, xe.grad, we.grad)]

    reference = run(torch.float64)
    got = {"float32": run(torch.float32), "bfloat16 emulated": run(torch.bfloat16, recipe.FloatProducts()),
           "bfloat16": run(torch.bfloat16)}
    return {kind: {name: float(f"{((a - r).abs().mean() / r.abs().mean()).item():.3g}")
                   for name, a, r in zip(("output", "input_grad", "weight_grad"), got[kind], reference)}
            for kind in arithmetics}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=Path("databases/nb201_30ep"))
    ap.add_argument("--task", default="t00084")
    ap.add_argument("--images", type=Path, default=SHARED_IMAGES, help="folder holding the task's source")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--aten-fallback", action="store_true",
                    help="time ATen's own bfloat16 too (where not native, about 7x slower than float32)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    native = recipe.computes_bfloat16(cpu)
    arithmetics = ["float32", "bfloat16 emulated"] + (["bfloat16"] if args.aten_fallback else [])
    db = Database(args.db)
    task = {t.id: t for t in db.tasks()}[args.task]
    schedule = replace(db.schedule, epochs=args.epochs)
    root = args.images / task.source
    train = load_task_images(root, task.train, schedule.input_size)
    val = load_task_images(root, task.val, schedule.input_size)
    cells = {"resnet": RESNET, "largest": LARGEST, "task cell 0": task.cells[0]}
    as_built = recipe.arithmetic
    seconds: dict = {(name, a): [] for name in cells for a in arithmetics}
    curves: dict = {}
    try:
        for r in range(args.rounds):
            for name, cell in cells.items():
                for kind in arithmetics[r % len(arithmetics):] + arithmetics[:r % len(arithmetics)]:
                    recipe.arithmetic = lambda device, k=kind: k
                    t0 = time.perf_counter()
                    label = label_cells([Cell.parse(cell)], train, val, schedule, task_seed(0, task.id), cpu)[0]
                    seconds[name, kind].append((time.perf_counter() - t0) / args.epochs)
                    curves.setdefault(f"{name}/{kind}", label.curve)
                    print(f"round {r} {name} {kind}: {seconds[name, kind][-1]:.1f} s an epoch", flush=True)
    finally:
        recipe.arithmetic = as_built
    rows = []
    for name, cell in cells.items():
        med = {kind: statistics.median(seconds[name, kind]) for kind in arithmetics}
        rows.append({"cell": name, "arch": cell, "s_per_epoch": {k: round(v, 2) for k, v in med.items()},
                     "time_vs_float32": {k: round(v / med["float32"], 2) for k, v in med.items() if k != "float32"}})
        print(json.dumps(rows[-1]))
    out = {"machine": f"{cpu_name()}, {torch.get_num_threads()} torch thread", "torch": torch.__version__,
           "native_bfloat16": native,
           "task": f"{task.id} ({task.source}): {len(train)} train / {len(val)} validation images",
           "schedule": schedule.to_dict(), "rounds": args.rounds,
           "median_time_vs_float32": {k: statistics.median(r["time_vs_float32"][k] for r in rows)
                                      for k in arithmetics if k != "float32"},
           "rounding": rounding_errors(["float32", "bfloat16 emulated", "bfloat16"]),
           "cells": rows, "first_round_curves": curves,
           "seconds": {f"{k[0]}/{k[1]}": [round(s, 2) for s in v] for k, v in seconds.items()}}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("median_time_vs_float32", "rounding")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
