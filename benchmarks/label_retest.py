"""Test-retest of database labels: label a task's cells again with another training seed
(same split, same schedule) and see whether the cells come out in the same order.

`label_reliability.py` compares a task's label spread with the sampling noise of its
validation set; that misses the training seed, which in a short fit of an unconverged
network may move a cell by several points. Here both noises are in: run 1 is the
database's own records, run 2 is the same cell on the same task with the task's fit seed
taken from build seed ``--seed``. Per task: Spearman between the two runs (final labels,
and the label read off each epoch of the curves), the median absolute difference, and the
reliability the sampling-noise formula predicted. Results are merged into ``--out`` after
every cell, so a killed run resumes where it stopped.

    python benchmarks/label_retest.py --tasks t00008 t00002 --device cpu --out docs/label_retest.json

A label costs what a database record cost on the same device (minutes each on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from metad2a_cli.atomic import atomic_paths
from metad2a_cli.meta.db import BuildSettings, Database, device_name, load_task_images, task_seed
from metad2a_cli.meta.train import spearman
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.labels import label_cells

REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["labels"] if path.exists() else []


def summarise(db: Database, retest: list[dict]) -> list[dict]:
    tasks = {t.id: t for t in db.tasks()}
    first = {(r.task, r.cell): r for r in db.records()}
    by_task = defaultdict(list)
    for r in retest:
        if (r["task"], r["cell"]) in first:
            by_task[r["task"]].append((first[r["task"], r["cell"]], r))
    rows = []
    for tid, pairs in sorted(by_task.items()):
        a = np.array([p.accuracy for p, _ in pairs])
        b = np.array([q["accuracy"] for _, q in pairs])
        n_val = sum(len(f) for f in tasks[tid].val)
        p = np.concatenate([a, b]) / 100
        noise = float(np.mean(p * (1 - p)) / n_val)
        spread = float(np.var(p, ddof=1))
        diff_sd = float(np.std(a - b, ddof=1)) if len(pairs) > 1 else 0.0
        epochs = min(min(len(p.curve) for p, _ in pairs), min(len(q["curve"]) for _, q in pairs))
        rows.append({
            "task": tid, "source": tasks[tid].source, "classes": len(tasks[tid].classes),
            "train_images": sum(len(f) for f in tasks[tid].train), "val_images": n_val,
            "cells": len(pairs), "devices": sorted({p.device for p, _ in pairs} | {q["device"] for _, q in pairs}),
            "retest_spearman": round(spearman(a, b), 3) if len(pairs) > 2 else None,
            "median_abs_diff": round(float(np.median(np.abs(a - b))), 2),
            "label_sd": round(float(np.std(np.concatenate([a, b]), ddof=1)), 2),
            "sampling_noise_sd": round(100 * noise**0.5, 2),
            # Two runs' labels differ by sqrt(2) times one run's noise (sampling and seed together).
            "run_diff_sd": round(diff_sd, 2),
            "sampling_reliability": round(1 - noise / spread, 3),
            "retest_reliability": round(1 - diff_sd**2 / 2 / (100**2 * spread), 3),
            "retest_spearman_by_epoch": [
                round(spearman([p.curve[e] for p, _ in pairs], [q["curve"][e] for _, q in pairs]), 3)
                for e in range(epochs)
            ] if len(pairs) > 2 else [],
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "databases/nb201")
    ap.add_argument("--sources", type=Path, default=REPO.parent / "shared/data/images",
                    help="folder holding the database's sources by name")
    ap.add_argument("--tasks", nargs="+", required=True, help="task ids, labelled in this order")
    ap.add_argument("--seed", type=int, default=1, help="build seed of the retest run (the database's is in its manifest)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "docs/label_retest.json")
    ap.add_argument("--report-only", action="store_true", help="summarise what --out holds, label nothing")
    ap.add_argument("--print-only", action="store_true", help="print the summary, write nothing")
    args = ap.parse_args()

    import torch

    db = Database(args.db.resolve())
    settings = BuildSettings.from_dict(db.manifest["settings"])
    if args.seed == settings.seed:
        raise SystemExit(f"--seed {args.seed} is the database's own; a retest needs another")
    tasks = {t.id: t for t in db.tasks()}
    labelled = defaultdict(list)
    for r in db.records():
        labelled[r.task].append(r.cell)
    missing = [t for t in args.tasks if t not in tasks]
    if missing:
        raise SystemExit(f"no such task in {args.db}: {', '.join(missing)}")

    retest = load(args.out)
    done = {(r["task"], r["cell"]) for r in retest if r["seed"] == args.seed}
    dev, name = torch.device(args.device), device_name(args.device)

    def save() -> None:
        rows = summarise(db, retest)
        spearmans = [r["retest_spearman"] for r in rows if r["retest_spearman"] is not None]
        report = {
            "database": str(db.path.relative_to(REPO) if db.path.is_relative_to(REPO) else db.path),
            "schedule": settings.schedule.to_dict(),
            "median_retest_spearman": statistics.median(spearmans) if spearmans else None,
            "tasks": rows, "labels": retest,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_paths(args.out) as [tmp]:
            tmp.write_text(json.dumps(report, indent=1) + "\n")

    if not (args.report_only or args.print_only):
        for tid in args.tasks:
            task = tasks[tid]
            todo = [c for c in labelled[tid] if (tid, c) not in done]
            if not todo:
                continue
            root = args.sources / task.source
            size = settings.schedule.input_size
            train, val = load_task_images(root, task.train, size), load_task_images(root, task.val, size)
            for cell in todo:
                t0 = time.perf_counter()
                [label] = label_cells([Cell.parse(cell)], train, val, settings.schedule,
                                      task_seed(args.seed, tid), dev)
                retest.append({
                    "task": tid, "cell": cell, "seed": args.seed, "accuracy": round(label.accuracy, 4),
                    "curve": [round(a, 4) for a in label.curve], "seconds": round(time.perf_counter() - t0, 1),
                    "device": name,
                })
                save()
                print(f"{tid} {cell} {label.accuracy:.2f} ({retest[-1]['seconds']} s)", flush=True)
    if not args.print_only:
        save()
    for row in summarise(db, retest):
        print({k: v for k, v in row.items() if k != "retest_spearman_by_epoch"})


if __name__ == "__main__":
    main()
