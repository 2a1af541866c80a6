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

A run is a seed and a precision: a GPU or a CPU that computes bfloat16 natively trains under
bfloat16 autocast, any other CPU in float32. With the database's own seed on a machine of the
other precision, the same fits are repeated with only the rounding changed, which tells
whether records from both kinds of machine are the same label.

    python benchmarks/label_retest.py --tasks t00008 t00002 --device cpu --out docs/label_retest.json

A label costs what a database record cost on the same device (minutes each on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np

from label_reliability import sampling_noise

from metad2a_cli.atomic import atomic_paths
from metad2a_cli.meta.db import BuildSettings, Database, Record, device_name, load_task_images, task_seed
from metad2a_cli.meta.train import spearman
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.labels import label_cells
from metad2a_cli.training.policies import DEFAULT_LR

REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["labels"] if path.exists() else []


def precision(device: str) -> str:
    """The arithmetic a record's device trained in (`device_name` says "cpu" only for float32)."""
    return "float32" if device == "cpu" else "bfloat16"


def runs_by_rate(records: list[Record], settings: BuildSettings, retest: list[dict]) -> dict:
    """{lr: {(seed, precision): {(task, cell): label}}}, the database's records as its own seed's run."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        run = settings.seed, precision(r.device)
        runs[settings.schedule.lr][run][r.task, r.cell] = {"accuracy": r.accuracy, "curve": r.curve, "device": r.device}
    for r in retest:
        runs[r.get("lr", DEFAULT_LR)][r["seed"], precision(r["device"])][r["task"], r["cell"]] = r
    return runs


def summarise(tasks: dict, runs: dict) -> list[dict]:
    """Per task, learning rate and pair of seeds, the cells both runs labelled."""
    rows = []
    for lr, by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        for tid in sorted({k[0] for s in seeds for k in by_seed[s]}):
            for s1, s2 in combinations(seeds, 2):
                one, two = by_seed[s1], by_seed[s2]
                pairs = [(one[k], two[k]) for k in one if k[0] == tid and k in two]
                if len(pairs) >= 3:
                    rows.append(compare(tasks[tid], lr, [s1, s2], pairs))
    return rows


def rates_compared(runs: dict) -> list[dict]:
    """Per task and seed run at two rates: the same cells' labels, one rate against the other."""
    rows = []
    for lr1, lr2 in combinations(sorted(runs), 2):
        for s in sorted(set(runs[lr1]) & set(runs[lr2])):
            one, two = runs[lr1][s], runs[lr2][s]
            for tid in sorted({k[0] for k in one if k in two}):
                keys = [k for k in one if k[0] == tid and k in two]
                a = np.array([one[k]["accuracy"] for k in keys])
                b = np.array([two[k]["accuracy"] for k in keys])
                rows.append({"task": tid, "seed": s[0], "precision": s[1], "rates": [lr1, lr2], "cells": len(keys),
                             "mean_accuracy": [round(float(a.mean()), 2), round(float(b.mean()), 2)],
                             "cells_higher_at_second": int(np.sum(b > a)), "cells_lower_at_second": int(np.sum(b < a))})
    return rows


def compare(task, lr: float, runs: list[tuple[int, str]], pairs: list[tuple[dict, dict]]) -> dict:
    a = np.array([p["accuracy"] for p, _ in pairs])
    b = np.array([q["accuracy"] for _, q in pairs])
    n_val = sum(len(f) for f in task.val)
    p = np.concatenate([a, b]) / 100
    noise, spread = sampling_noise(p, n_val), float(np.var(p, ddof=1))
    diff_sd = float(np.std(a - b, ddof=1))
    chance = 100.0 / len(task.classes)
    epochs = min(len(x["curve"]) for pair in pairs for x in pair)
    return {
        "task": task.id, "source": task.source, "classes": len(task.classes), "lr": lr,
        "seeds": [s for s, _ in runs], "precisions": [p for _, p in runs],
        "train_images": sum(len(f) for f in task.train), "val_images": n_val,
        "cells": len(pairs), "devices": sorted({x["device"] for pair in pairs for x in pair}),
        "retest_spearman": round(spearman(a, b), 3),
        "mean_accuracy": round(float(p.mean() * 100), 2),
        # a run that never got far from chance: the fit failed, whatever the cell
        "failed_runs": int(np.sum(np.concatenate([a, b]) < 1.5 * chance)),
        "median_abs_diff": round(float(np.median(np.abs(a - b))), 2),
        "label_sd": round(100 * spread**0.5, 2),
        "sampling_noise_sd": round(100 * noise**0.5, 2),
        # Two runs' labels differ by sqrt(2) times one run's noise (sampling and seed together).
        "run_diff_sd": round(diff_sd, 2),
        "sampling_reliability": round(1 - noise / spread, 3),
        "retest_reliability": round(1 - diff_sd**2 / 2 / (100**2 * spread), 3),
        "retest_spearman_by_epoch": [
            round(spearman([p["curve"][e] for p, _ in pairs], [q["curve"][e] for _, q in pairs]), 3)
            for e in range(epochs)
        ],
    }


def report(db: Database, settings: BuildSettings, tasks: dict, records: list[Record], retest: list[dict]) -> dict:
    runs = runs_by_rate(records, settings, retest)
    rows = summarise(tasks, runs)
    by_lr = defaultdict(list)
    for r in rows:
        by_lr[r["lr"]].append(r)
    return {
        "database": str(db.path.relative_to(REPO) if db.path.is_relative_to(REPO) else db.path),
        "schedule": settings.schedule.to_dict(),
        "by_lr": {str(lr): {"pairs": len(rs),
                            "median_retest_spearman": statistics.median(r["retest_spearman"] for r in rs),
                            "median_retest_reliability": statistics.median(r["retest_reliability"] for r in rs),
                            "mean_accuracy": round(statistics.mean(r["mean_accuracy"] for r in rs), 2)}
                  for lr, rs in sorted(by_lr.items())},
        "tasks": rows, "rates": rates_compared(runs), "labels": retest,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "databases/nb201")
    ap.add_argument("--sources", type=Path, default=REPO.parent / "shared/data/images",
                    help="folder holding the database's sources by name")
    ap.add_argument("--tasks", nargs="+", required=True, help="task ids, labelled in this order")
    ap.add_argument("--seed", type=int, default=1, help="build seed of the retest run (the database's, in its manifest, only on a machine of the other precision)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate of the retest run (the database's by default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "docs/label_retest.json")
    ap.add_argument("--report-only", action="store_true", help="summarise what --out holds, label nothing")
    ap.add_argument("--print-only", action="store_true", help="print the summary, write nothing")
    args = ap.parse_args()

    import torch

    db = Database(args.db.resolve())
    settings = BuildSettings.from_dict(db.manifest["settings"])
    args.lr = settings.schedule.lr if args.lr is None else args.lr
    schedule = replace(settings.schedule, lr=args.lr)
    tasks = {t.id: t for t in db.tasks()}
    records = db.records()  # read once: nothing else writes the database while this runs
    labelled = defaultdict(list)
    for r in records:
        labelled[r.task].append(r.cell)
    missing = [t for t in args.tasks if t not in tasks]
    if missing:
        raise SystemExit(f"no such task in {args.db}: {', '.join(missing)}")
    dev, name = torch.device(args.device), device_name(args.device)
    labelling = not (args.report_only or args.print_only)
    if labelling and args.seed == settings.seed and args.lr == settings.schedule.lr:
        same = sorted({r.task for r in records if r.task in args.tasks and precision(r.device) == precision(name)})
        if same:
            raise SystemExit(f"--seed {args.seed} is the database's own and {', '.join(same)} already has "
                             f"{precision(name)} records; a retest needs another seed or the other precision")

    retest = load(args.out)
    done = {(r["task"], r["cell"]) for r in retest
            if r["seed"] == args.seed and r.get("lr", DEFAULT_LR) == args.lr and precision(r["device"]) == precision(name)}

    def save() -> dict:
        result = report(db, settings, tasks, records, retest)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_paths(args.out) as [tmp]:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
        return result

    if labelling:
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
                [label] = label_cells([Cell.parse(cell)], train, val, schedule,
                                      task_seed(args.seed, tid), dev)
                retest.append({
                    "task": tid, "cell": cell, "seed": args.seed, "lr": args.lr, "accuracy": round(label.accuracy, 4),
                    "curve": [round(a, 4) for a in label.curve], "seconds": round(time.perf_counter() - t0, 1),
                    "device": name,
                })
                save()
                print(f"{tid} lr {args.lr} seed {args.seed} {cell} {label.accuracy:.2f} ({retest[-1]['seconds']} s)", flush=True)
    result = report(db, settings, tasks, records, retest) if args.print_only else save()
    for row in result["tasks"]:
        print({k: v for k, v in row.items() if k != "retest_spearman_by_epoch"})
    for row in result["rates"]:
        print(row)


if __name__ == "__main__":
    main()
