"""How well does a cheap proxy schedule rank cells? (issue: proxy fidelity)

Trains the 200 NAS-Bench-201 cells of ../shared/data/calibration on its 5,000 CIFAR-10
training images (4,000 train / 1,000 validation, stratified, fixed seed) with each proxy
schedule and reports Spearman's rank correlation between proxy validation accuracy and the
published 200-epoch CIFAR-10 test accuracy, with the CPU time per cell.

CIFAR-10 is used here only to choose the schedule; it never enters a database.

    python benchmarks/proxy_calibration.py --schedules A,B --out docs/proxy_calibration.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metad2a_cli.meta.train import spearman
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.proxy import ProxySchedule, train_cells

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration"

SCHEDULES = {
    "default": ProxySchedule(),  # what `metad2a db build` uses
    "A": ProxySchedule(channels=8, cells_per_stage=1, input_size=16, epochs=3, batch_size=64),
    "B": ProxySchedule(channels=8, cells_per_stage=1, input_size=32, epochs=3),
    "C": ProxySchedule(channels=16, cells_per_stage=1, input_size=32, epochs=6),
    "D": ProxySchedule(channels=8, cells_per_stage=1, input_size=16, epochs=8),
    "E": ProxySchedule(channels=8, cells_per_stage=1, input_size=16, epochs=8, batch_size=64),
    "F": ProxySchedule(channels=8, cells_per_stage=1, input_size=32, epochs=6),
}



def load_images(size: int, train_per_class: int):
    classes = sorted(p.name for p in (ROOT / "cifar10_train500").iterdir() if p.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((ROOT / "cifar10_train500" / name).iterdir()):
            img = Image.open(f).convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(img))
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    y = torch.tensor(ys)
    rng = np.random.default_rng(0)
    val = np.concatenate([rng.permutation(np.flatnonzero(y.numpy() == c))[:100] for c in range(len(classes))])
    is_val = np.zeros(len(y), bool)
    is_val[val] = True
    train = np.concatenate(
        [rng.permutation(np.flatnonzero((y.numpy() == c) & ~is_val))[:train_per_class] for c in range(len(classes))]
    )
    return (x[train], y[train]), (x[is_val], y[is_val])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedules", default="A,B")
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=25, help="cells trained together")
    ap.add_argument("--train-per-class", type=int, default=400, help="training images per class (at most 400)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = list(csv.DictReader((ROOT / "nb201_cifar10_subset200.csv").open()))[: args.cells]
    cells = [Cell.parse(r["arch_str"]) for r in rows]
    published = np.array([float(r["cifar10_test"]) for r in rows])
    results = {}
    for name in args.schedules.split(","):
        schedule = SCHEDULES[name]
        train, val = load_images(schedule.input_size, args.train_per_class)
        t0 = time.perf_counter()
        acc = []
        for i in range(0, len(cells), args.chunk):
            acc += train_cells(cells[i : i + args.chunk], train, val, schedule, seed=0)
            print(f"{name}: {len(acc)}/{len(cells)} cells, {time.perf_counter() - t0:.0f}s", flush=True)
        seconds = time.perf_counter() - t0
        rho = spearman(np.array(acc), published)
        results[name] = {
            "schedule": schedule.to_dict(),
            "spearman": rho,
            "seconds_per_cell": seconds / len(cells),
            "cells": len(cells),
            "train_images": len(train[1]),
            "val_images": len(val[1]),
            "proxy_accuracy": acc,
        }
        print(f"{name}: spearman {rho:.3f}, {seconds / len(cells):.2f} s/cell", flush=True)
    if args.out:
        out = Path(args.out)
        previous = json.loads(out.read_text())["results"] if out.is_file() else {}
        tag = f"{args.train_per_class}pc"
        previous.update({f"{k}-{tag}": v for k, v in results.items()})
        machine = f"{os.cpu_count()}-core CPU, {args.threads} torch thread(s)"
        out.write_text(json.dumps({"machine": machine, "results": previous}, indent=1))


if __name__ == "__main__":
    main()
