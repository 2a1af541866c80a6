"""Do longer labels rank cells more like full training? Label a database task's cells again at
another epoch budget (``--epochs``, fit's default 30 unless told) with everything else the
database's: same split, same fit seed (so the same initial weights and batch order), same
augmentation and peak rate. The cosine schedule stretches over the new budget.

Per task: the within-task Spearman of the labels against the published 200-epoch
ImageNet16-120 accuracies at the database's budget and at the new one (the same cells), the
Spearman between the two budgets, and the mean label. Beside it, from the database's records
alone: the same agreement read off each epoch of their validation curves (best so far), over
every complete task. A curve's epoch 5 is not a 5-epoch fit (its rate has not annealed), so
that part shows a trend, not a schedule.

Results are merged into ``--out`` after every cell, so a killed run resumes where it stopped;
``--share i/n`` lets n processes split the tasks. ``--longer-db`` adds the records of a
database drawn the same way at the longer budget (``databases/nb201_30ep``): every task both
databases hold is compared. Its first records are this script's labels (the tasks below);
its builders then label in the draw's order.

    python benchmarks/label_budget.py --tasks t00018 t00012 --share 0/2 &
    python benchmarks/label_budget.py --tasks t00018 t00012 --share 1/2
    python benchmarks/label_budget.py --report-only --longer-db databases/nb201_30ep

A label at 30 epochs costs three database records (minutes each on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from edge_term_loto import residual_term, task_arrays
from label_reliability import edge_ops, published_accuracy
from paired import sign_flip_p

from metad2a_cli.atomic import atomic_paths
from metad2a_cli.data.images import read_image_folder
from metad2a_cli.meta.db import BuildSettings, Database, device_name, load_task_images, source_hash, task_seed
from metad2a_cli.meta.table import TABLE_FILE, load_table
from metad2a_cli.meta.train import EDGE_RIDGE, spearman
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.labels import label_cells

REPO = Path(__file__).resolve().parents[1]
COMPLETE = 10  # a task's cells when its build finished
# Picked for their 10-epoch reliability (one per kind of source) before any 30-epoch label;
# every other task was drawn: a seeded shuffle, or the database's own order.
CHOSEN = ("t00011", "t00012", "t00018", "t00019")


def curve_agreement(records: list, table: np.ndarray) -> list[dict]:
    """Median over complete tasks of the Spearman against the table of the best label up to each epoch."""
    by_task = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    tasks = [rs for rs in by_task.values() if len(rs) >= COMPLETE]
    epochs = min(len(r.curve) for rs in tasks for r in rs)
    rows = []
    for e in range(1, epochs + 1):
        rho = [spearman([max(r.curve[:e]) for r in rs], table[[Cell.parse(r.cell).code for r in rs]]) for rs in tasks]
        rows.append({"epoch": e, "tasks": len(tasks), "median_spearman": round(float(np.median(rho)), 3),
                     "mean_spearman": round(float(np.mean(rho)), 3)})
    return rows


def edge_term_without(records: list, table: np.ndarray, task: str) -> np.ndarray:
    """The dataset term's shared part (edge_term_loto.py) fitted on every complete task's
    records but ``task``'s: (30,) weights added to the table's z-score."""
    by_task = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    others = [t for t, rs in by_task.items() if t != task and len(rs) >= COMPLETE]
    x, y, base = task_arrays({t: by_task[t] for t in others}, (table - np.nanmean(table)) / np.nanstd(table))
    return residual_term(x, y, base, others, EDGE_RIDGE)


def compare(task, base: dict, longer: dict, table: np.ndarray, term: np.ndarray) -> dict:
    """``base``: the task's database records by cell; ``longer``: its relabels by cell."""
    cells = [c for c in base if c in longer]
    a = np.array([base[c].accuracy for c in cells])
    b = np.array([longer[c]["accuracy"] for c in cells])
    t = table[[Cell.parse(c).code for c in cells]]
    # Learned from the other tasks' short labels: does it still say what longer fits add to the table?
    with_term = (t - np.nanmean(table)) / np.nanstd(table) + np.array([edge_ops(c) for c in cells]) @ term
    return {
        "task": task.id, "source": task.source, "classes": len(task.classes), "cells": len(cells),
        # Both sides' precision: a float32 record against a bfloat16 relabel also differs by rounding.
        "devices": {"database": sorted({base[c].device or "unknown" for c in cells}), "longer": sorted({longer[c]["device"] for c in cells})},
        "table_spearman_database": round(spearman(a, t), 3),
        "table_spearman_longer": round(spearman(b, t), 3),
        "budgets_spearman": round(spearman(a, b), 3),
        "table_plus_edge_term_spearman_database": round(spearman(a, with_term), 3),
        "table_plus_edge_term_spearman_longer": round(spearman(b, with_term), 3),
        "mean_accuracy": [round(float(a.mean()), 2), round(float(b.mean()), 2)],
        "cells_higher_when_longer": int(np.sum(b > a)),
        "median_seconds_longer": round(statistics.median(longer[c]["seconds"] for c in cells), 1),
    }


def as_labels(db: Database) -> list[dict]:
    """A database's records in this script's label form, at its budget."""
    epochs = db.schedule.epochs
    return [{"task": r.task, "cell": r.cell, "epochs": epochs, "accuracy": r.accuracy, "curve": r.curve,
             "seconds": r.seconds, "device": r.device} for r in db.records()]


def report(db: Database, settings: BuildSettings, records: list, labels: list[dict], longer_db: Database | None = None) -> dict:
    """``labels``: this script's own, kept in the report; ``longer_db``'s records are compared
    beside them (the same cell labelled by both counts once, this script's label first)."""
    table = published_accuracy(load_table(db.path / TABLE_FILE))
    tasks = {t.id: t for t in db.tasks()}
    base = defaultdict(dict)
    for r in records:
        base[r.task][r.cell] = r
    by_budget = defaultdict(lambda: defaultdict(dict))
    for x in labels + (as_labels(longer_db) if longer_db else []):
        by_budget[x["epochs"]][x["task"]].setdefault(x["cell"], x)
    budgets = {}
    for epochs, by_task in sorted(by_budget.items()):
        # A task needs a few cells labelled at both budgets to have a Spearman at all.
        shared = {tid: longer for tid, longer in by_task.items() if len(longer.keys() & base[tid].keys()) >= 3}
        rows = [compare(tasks[tid], base[tid], longer, table, edge_term_without(records, table, tid))
                for tid, longer in sorted(shared.items())]
        full = [r for r in rows if r["cells"] >= COMPLETE]
        drawn = [r for r in full if r["task"] not in CHOSEN]
        budgets[str(epochs)] = {
            "complete_tasks": len(full),
            "median_table_spearman": {
                f"at {settings.schedule.epochs} epochs (database)": _median(r["table_spearman_database"] for r in full),
                f"at {epochs} epochs": _median(r["table_spearman_longer"] for r in full),
            },
            # Each task's agreement at both budgets, on the same cells: did the longer budget raise it?
            "table_spearman_change": _paired([r["table_spearman_longer"] - r["table_spearman_database"] for r in full]),
            # The same without the tasks chosen for their reliability: a sample of the draw.
            "drawn": {
                "complete_tasks": len(drawn),
                "median_table_spearman": {
                    f"at {settings.schedule.epochs} epochs (database)": _median(r["table_spearman_database"] for r in drawn),
                    f"at {epochs} epochs": _median(r["table_spearman_longer"] for r in drawn),
                },
                "table_spearman_change": _paired([r["table_spearman_longer"] - r["table_spearman_database"] for r in drawn]),
            },
            "median_table_plus_edge_term_spearman": {
                f"at {settings.schedule.epochs} epochs (database)": _median(r["table_plus_edge_term_spearman_database"] for r in full),
                f"at {epochs} epochs": _median(r["table_plus_edge_term_spearman_longer"] for r in full),
            },
            "tasks": rows,
        }
    return {
        "database": _shown(db.path),
        "schedule": settings.schedule.to_dict(), "seed": settings.seed,
        # What the curves and each task's edge term (fitted without it) were computed from.
        "database_records": len(records), "database_tasks": len({r.task for r in records}),
        "database_curves": curve_agreement(records, table),
        "longer_database": longer_db and {"path": _shown(longer_db.path), "records": len(longer_db.records()),
                                          "curves": curve_agreement(longer_db.records(), table)},
        "budgets": budgets, "labels": labels,
    }


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def read_labels(out: Path) -> list[dict]:
    return json.loads(out.read_text())["labels"] if out.exists() else []


def locked_update(out: Path, new: dict | None, summarise: Callable[[list[dict]], dict]) -> dict:
    """Add ``new`` to the labels ``out`` holds and write it again as ``summarise(labels)``.
    Other shares write the same file: read, add and write happen under a lock on its folder
    (a lock that leaves no file behind)."""
    folder = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        result = summarise(read_labels(out) + ([new] if new else []))
        with atomic_paths(out) as [tmp]:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        os.close(folder)
    return result


def _paired(diff: list[float]) -> dict:
    """A task whose labels are all equal has no Spearman (NaN): counted, not compared."""
    undefined = sum(not math.isfinite(d) for d in diff)
    diff = [d for d in diff if math.isfinite(d)]
    if not diff:
        return {"undefined": undefined}
    return {"mean": round(statistics.mean(diff), 3), "median": round(statistics.median(diff), 3),
            "higher": sum(d > 0 for d in diff), "lower": sum(d < 0 for d in diff),
            "sign_flip_p": sign_flip_p(diff), "undefined": undefined}


def _median(values) -> float | None:
    values = list(values)
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "databases/nb201")
    ap.add_argument("--sources", type=Path, default=REPO.parent / "shared/data/images",
                    help="folder holding the database's sources by name")
    ap.add_argument("--tasks", nargs="+", default=[], help="task ids, labelled in this order")
    ap.add_argument("--epochs", type=int, default=30, help="the budget to label at (fit's default: 30)")
    ap.add_argument("--share", default="0/1", help="i/n: label every n-th of the tasks from the i-th")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "docs/label_budget.json")
    ap.add_argument("--report-only", action="store_true", help="summarise what --out holds, label nothing")
    ap.add_argument("--longer-db", type=Path, help="a database drawn as --db at the longer budget: its records are compared too")
    args = ap.parse_args()

    import torch

    db = Database(args.db.resolve())
    settings = BuildSettings.from_dict(db.manifest["settings"])
    if args.epochs == settings.schedule.epochs:
        raise SystemExit(f"--epochs {args.epochs} is the database's own budget")
    schedule = replace(settings.schedule, epochs=args.epochs)
    tasks = {t.id: t for t in db.tasks()}
    records = db.records()
    missing = [t for t in args.tasks if t not in tasks]
    if missing:
        raise SystemExit(f"no such task in {args.db}: {', '.join(missing)}")
    i, n = (int(x) for x in args.share.split("/"))
    mine = args.tasks[i::n]

    longer_db = None
    if args.longer_db:
        longer_db = Database(args.longer_db.resolve())
        if longer_db.schedule != schedule or longer_db.tasks() != db.tasks():
            raise SystemExit(f"{args.longer_db} is not {args.db} drawn again at {args.epochs} epochs")

    def save(new: dict | None) -> dict:
        return locked_update(args.out, new, lambda labels: report(db, settings, records, labels, longer_db))

    dev, name = torch.device(args.device), device_name(args.device)
    checked: set[str] = set()
    if not args.report_only:
        for tid in mine:
            task = tasks[tid]
            done = {x["cell"] for x in read_labels(args.out) if x["task"] == tid and x["epochs"] == args.epochs}
            todo = [r.cell for r in records if r.task == tid and r.cell not in done]
            if not todo:
                continue
            root = args.sources / task.source
            if task.source not in checked:  # the images the database was drawn from, not others of the name
                if source_hash(read_image_folder(root)) != db.manifest["sources"][task.source]["hash"]:
                    raise SystemExit(f"{root} is not the {task.source} that {args.db} was drawn from")
                checked.add(task.source)
            size = schedule.input_size
            train, val = load_task_images(root, task.train, size), load_task_images(root, task.val, size)
            for cell in todo:
                t0 = time.perf_counter()
                [label] = label_cells([Cell.parse(cell)], train, val, schedule, task_seed(settings.seed, tid), dev)
                save({"task": tid, "cell": cell, "epochs": args.epochs, "accuracy": round(label.accuracy, 4),
                      "curve": [round(a, 4) for a in label.curve], "seconds": round(time.perf_counter() - t0, 1),
                      "device": name})
                print(f"{tid} {args.epochs} epochs {cell} {label.accuracy:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = save(None)
    for row in result["database_curves"]:
        print(row)
    for epochs, b in result["budgets"].items():
        print(epochs, b["median_table_spearman"], b["table_spearman_change"])
        print("drawn", b["drawn"])
        for row in b["tasks"]:
            print(row)


if __name__ == "__main__":
    main()
