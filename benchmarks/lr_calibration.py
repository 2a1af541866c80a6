"""Does a smaller peak learning rate make short fits rank cells like full training?

The database's labels are 10-epoch fits of a few hundred images, at fit's batch rule
(n/50, floor 16) and NB201's peak rate 0.1, which NB201 set for batch 256. The test-retest
(`label_retest.py`) found such labels dominated by the training seed. Here the same
10-epoch schedule labels the calibration cells of `gpu_pack.py`'s CIFAR-10 task (750 train
/ 250 validation images, batch 16) at each ``--lr``, one cell at a time on the CPU, and the
labels are ranked against NB201's published 200-epoch CIFAR-10 accuracies (a check of the
schedule, never a training signal). The cells are those the H200 labelled at 10 epochs and
lr 0.1 in `docs/gpu_labels_h200_run1.json` (Spearman 0.16 over 96), in the same order, so
both devices' labels can be compared on the same cells.

Labels are appended to ``--work`` after every cell (resumable; several workers may share
the cells with ``--share k/m``, one torch thread each); ``--report`` merges them:

    python benchmarks/lr_calibration.py --lr 0.025 0.1 --share 0/2 &
    python benchmarks/lr_calibration.py --lr 0.025 0.1 --share 1/2 &
    python benchmarks/lr_calibration.py --report docs/lr_calibration.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench_labels import load_calibration

from metad2a_cli.atomic import atomic_paths
from metad2a_cli.meta.train import spearman
from metad2a_cli.training.labels import label_cells
from metad2a_cli.training.schedule import LabelSchedule

REPO = Path(__file__).resolve().parents[1]
H200_RUN = REPO / "docs" / "gpu_labels_h200_run1.json"
EPOCHS = 10
AUGMENT = "crop-flip"  # what the H200 run and the database's records trained with


def reference() -> dict:
    """The H200's 10-epoch, lr-0.1 calibration labels: {nb201 index: label}."""
    entry = next(e for e in json.loads(H200_RUN.read_text())["calibration"] if e["epochs"] == EPOCHS)
    return dict(zip(entry["nb201_indices"], entry["labels"]))


def part_path(work: Path, lr: float, share: str) -> Path:
    return work / f"lr{lr:g}-{share.replace('/', 'of')}.jsonl"


def read_parts(work: Path) -> list[dict]:
    rows = []
    for path in sorted(work.glob("lr*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def label(args) -> None:
    torch.set_num_threads(1)
    k, m = (int(x) for x in args.share.split("/"))
    train, val, cells, _ = load_calibration(args.pack)
    by_index = {c.index: c for c in cells}
    mine = [by_index[i] for i in list(reference())[: args.cells]][k::m]
    args.work.mkdir(parents=True, exist_ok=True)
    for lr in args.lr:
        path = part_path(args.work, lr, args.share)
        done = {r["nb201_index"] for r in read_parts(args.work) if r["lr"] == lr}
        schedule = LabelSchedule(epochs=EPOCHS, augment=AUGMENT, lr=lr)
        for cell in mine:
            if cell.index in done:
                continue
            t0 = time.perf_counter()
            (lab,) = label_cells([cell], train, val, schedule, 0, torch.device("cpu"))
            row = {"lr": lr, "nb201_index": cell.index, "accuracy": lab.accuracy, "curve": lab.curve,
                   "seconds": round(time.perf_counter() - t0, 1), "device": "cpu"}
            with open(path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"lr {lr:g} cell {cell.index}: {lab.accuracy:.1f} ({row['seconds']} s)", flush=True)


def imagenet16() -> dict:
    """The published 200-epoch ImageNet16-120 accuracies (a meta-training source): {index: acc}."""
    with open(REPO / "databases" / "nb201" / "imagenet16_120.csv") as fh:
        return {int(r["nb201_index"]): float(r["imagenet16_120_test"]) for r in csv.DictReader(fh)}


def report(args) -> dict:
    _, _, cells, cifar = load_calibration(args.pack)
    truth = {c.index: float(a) for c, a in zip(cells, cifar)}
    table = imagenet16()
    runs: dict = {"0.1 (H200, bf16)": reference()}
    seconds: dict = {}
    for r in read_parts(args.work):
        runs.setdefault(f"{r['lr']:g} (cpu)", {})[r["nb201_index"]] = r["accuracy"]
        seconds.setdefault(f"{r['lr']:g} (cpu)", []).append(r["seconds"])
    common = sorted(set.intersection(*(set(v) for v in runs.values())))
    rows = []
    for name, labels in runs.items():
        own = sorted(labels)
        rows.append({
            "run": name,
            "cells": len(own),
            "spearman_vs_cifar10": round(spearman([labels[i] for i in own], [truth[i] for i in own]), 3),
            "spearman_vs_imagenet16": round(spearman([labels[i] for i in own], [table[i] for i in own]), 3),
            "common_cells": len(common),
            "spearman_vs_cifar10_common": round(spearman([labels[i] for i in common], [truth[i] for i in common]), 3)
            if len(common) >= 3 else None,
            "spearman_vs_imagenet16_common": round(spearman([labels[i] for i in common], [table[i] for i in common]), 3)
            if len(common) >= 3 else None,
            "mean_label_common": round(float(np.mean([labels[i] for i in common])), 2) if common else None,
            "median_seconds_per_cell": float(np.median(seconds[name])) if name in seconds else None,
        })
    names = list(runs)
    between = [
        {"runs": [a, b], "spearman": round(spearman([runs[a][i] for i in common], [runs[b][i] for i in common]), 3)}
        for n, a in enumerate(names) for b in names[n + 1:] if len(common) >= 3
    ]
    out = {
        "task": "gpu_pack.py's CIFAR-10 calibration task: 750 train / 250 validation images, 10 classes",
        "schedule": {"epochs": EPOCHS, "augment": AUGMENT, "batch": "fit's rule (16 here)", "seed": 0},
        "machine": "cpu runs: shared 2-core development CPU, one torch thread per worker, float32",
        "runs": rows,
        "between_runs_common_cells": between,
        "labels": {name: {str(i): v for i, v in sorted(labels.items())} for name, labels in runs.items()},
    }
    if args.report:
        with atomic_paths(args.report) as (tmp,):
            tmp.write_text(json.dumps(out, indent=1) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=REPO / ".gpu", help="gpu_pack.py's output (calibration.npz)")
    ap.add_argument("--work", type=Path, default=REPO / ".lr_calibration")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.025])
    ap.add_argument("--cells", type=int, default=96)
    ap.add_argument("--share", default="0/1", help="k/m: this worker labels every m-th cell from the k-th")
    ap.add_argument("--report", type=Path, help="merge the labels so far into this JSON and print it")
    args = ap.parse_args()
    if args.report:
        out = report(args)
        for row in out["runs"]:
            print(row)
        for row in out["between_runs_common_cells"]:
            print(row)
    else:
        label(args)


if __name__ == "__main__":
    main()
