"""Label speed on a CPU in bfloat16 against float32, in one run on one machine.

`training.recipe.autocast` runs the forward pass in bfloat16 on a CPU that computes it
natively (AVX512-BF16 or AMX); on any other CPU this forces it, so the figure is what
oneDNN's emulation costs there (`native_bfloat16` says which). This times `label_cells` on
one database task both ways, interleaved round by round so that other load on the machine
falls on both alike, with one torch thread (as a builder runs), and reports the median
seconds per cell and epoch.

    PYTHONPATH=src python benchmarks/bench_cpu_bf16.py --db databases/nb201 --task t00002 \
        --out docs/bench_cpu_bf16.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=Path("databases/nb201"))
    ap.add_argument("--task", default="t00002")
    ap.add_argument("--images", type=Path, default=SHARED_IMAGES, help="folder holding the task's source")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    native = recipe.computes_bfloat16(cpu)
    db = Database(args.db)
    task = {t.id: t for t in db.tasks()}[args.task]
    schedule = replace(db.schedule, epochs=args.epochs)
    root = args.images / task.source
    train = load_task_images(root, task.train, schedule.input_size)
    val = load_task_images(root, task.val, schedule.input_size)
    cells = {"resnet": RESNET, "largest": LARGEST, "task cell 0": task.cells[0]}
    as_built = recipe.computes_bfloat16
    seconds: dict = {(name, p): [] for name in cells for p in ("float32", "bfloat16")}
    curves: dict = {}
    for r in range(args.rounds):
        for name, cell in cells.items():
            for precision in ("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32"):
                recipe.computes_bfloat16 = (lambda device, p=precision: p == "bfloat16")
                t0 = time.perf_counter()
                label = label_cells([Cell.parse(cell)], train, val, schedule, task_seed(0, task.id), cpu)[0]
                seconds[name, precision].append((time.perf_counter() - t0) / args.epochs)
                curves.setdefault(f"{name}/{precision}", label.curve)
                print(f"round {r} {name} {precision}: {seconds[name, precision][-1]:.1f} s an epoch", flush=True)
    recipe.computes_bfloat16 = as_built
    rows = []
    for name, cell in cells.items():
        f32, b16 = statistics.median(seconds[name, "float32"]), statistics.median(seconds[name, "bfloat16"])
        rows.append({"cell": name, "arch": cell, "float32_s_per_epoch": round(f32, 2),
                     "bfloat16_s_per_epoch": round(b16, 2), "speedup": round(f32 / b16, 2)})
        print(json.dumps(rows[-1]))
    out = {"machine": f"{cpu_name()}, {torch.get_num_threads()} torch thread", "torch": torch.__version__,
           "native_bfloat16": native,
           "task": f"{task.id} ({task.source}): {len(train)} train / {len(val)} validation images",
           "schedule": schedule.to_dict(), "rounds": args.rounds,
           "median_speedup": round(statistics.median(r["speedup"] for r in rows), 2), "cells": rows,
           "first_round_curves": curves, "seconds": {f"{k[0]}/{k[1]}": [round(s, 2) for s in v] for k, v in seconds.items()}}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"median speedup {out['median_speedup']}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
