"""Does the dataset term's design carry the database's labels to tasks it never saw? Leave
each task (and each source) of a database out in turn, fit the term on the rest, and rank the
left-out task's cells.

The term (src/metad2a_cli/meta/models/edge_term.py) adds to the table's standardised accuracy
a weight for the operation on each edge, fitted to what the table misses within each task:
the within-task z-scored label minus the task-centred table value. Here it is fitted in
closed form (a ridge regression on the 30 edge-operation one-hots; its shared part, without
the dataset embedding), for each ridge penalty of a grid; `metad2a train` fits the same
objective by gradient steps. Beside it: the table alone, and a ridge fitted to the labels
themselves and added to the table.

Per left-out task: the Spearman of the score against the task's labels, and the label
(within-task z) of the cell the score ranks first among the task's cells. The held-out fits
of docs/heldout_fits.json are only read, to show how the term fitted on every task ranks
them; nothing is chosen on them.

    python benchmarks/edge_term_loto.py --out docs/edge_term_loto.json

Reads only files; seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from label_reliability import MIN_RECORDS, edge_ops, published_accuracy, standardise

from metad2a_cli.meta.db import Database
from metad2a_cli.meta.table import TABLE_FILE, load_table
from metad2a_cli.meta.train import EDGE_RIDGE, spearman
from metad2a_cli.nb201.cells import NUM_CELLS, Cell

REPO = Path(__file__).resolve().parents[1]
PENALTIES = (1.0, 3.0, 10.0, 30.0, 100.0)
# The records cover the term's ranking within tasks, not its maximum over all cells, which
# lands on light cells no task holds: the table's top 1% keeps the first pick among cells
# that full training rates, and the term orders them.
TRUST = NUM_CELLS // 100


def ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ y)


def task_arrays(by_task: dict[str, list], table_z: np.ndarray) -> tuple[dict, dict, dict]:
    """Per task: edge-operation one-hots (n, 30), z-scored labels (n,) and the table's z (n,)."""
    x = {t: np.array([edge_ops(r.cell) for r in rs]) for t, rs in by_task.items()}
    y = {t: standardise([r.accuracy for r in rs]) for t, rs in by_task.items()}
    base = {t: table_z[[Cell.parse(r.cell).code for r in rs]] for t, rs in by_task.items()}
    return x, y, base


def residual_term(x: dict, y: dict, base: dict, tasks: list[str], penalty: float) -> np.ndarray:
    """The dataset term's shared part: (30,) edge weights fitted to what the table misses
    within each of ``tasks`` (labels minus the task-centred table). As in training, the
    term is centred within each task too: only its differences between a task's cells count."""
    target = [y[t] - (base[t] - base[t].mean()) for t in tasks]
    return ridge(np.concatenate([x[t] - x[t].mean(0) for t in tasks]), np.concatenate(target), penalty)


def first_within_top(table_z: np.ndarray, term: np.ndarray) -> int:
    """The code of the cell that table + ``term`` ranks first among the table's top 1%."""
    trusted = np.argsort(-table_z)[:TRUST]
    ops = np.array([edge_ops(str(Cell.from_code(int(c)))) for c in trusted])
    return int(trusted[np.argmax(table_z[trusted] + ops @ term)])


def summary(rho: list[float], top: list[float]) -> dict:
    return {"median_spearman": round(float(np.median(rho)), 3), "mean_spearman": round(float(np.mean(rho)), 3),
            "mean_top1_z": round(float(np.mean(top)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "databases/nb201")
    ap.add_argument("--fits", type=Path, default=REPO / "docs/heldout_fits.json")
    ap.add_argument("--recipe", default="fit/epochs10/seed0/crop-flip")
    ap.add_argument("--seed-means", type=Path, default=None,
                    help="a heldout_seeds.py report: also rank each held-out cell's mean over its seeds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    db = Database(args.db.resolve())
    source = {t.id: t.source for t in db.tasks()}
    by_task = defaultdict(list)
    for r in db.records():
        by_task[r.task].append(r)
    tasks = sorted(t for t, rs in by_task.items() if len(rs) >= MIN_RECORDS)
    published = published_accuracy(load_table(args.db / TABLE_FILE))
    table_z = (published - np.nanmean(published)) / np.nanstd(published)
    x, y, base = task_arrays({t: by_task[t] for t in tasks}, table_z)

    def fit(train: list[str], penalty: float, residual: bool) -> np.ndarray:
        if residual:
            return residual_term(x, y, base, train, penalty)
        return ridge(np.concatenate([x[t] for t in train]), np.concatenate([y[t] for t in train]), penalty)

    def left_out(groups: dict[str, list[str]], score) -> dict:
        rho, top = [], []
        for held in groups.values():
            train = [t for t in tasks if t not in held]
            for t in held:
                s = score(train, t)
                rho.append(spearman(s, y[t]))
                top.append(float(y[t][np.argmax(s)]))
        return summary(rho, top)

    by_task_group = {t: [t] for t in tasks}
    by_source_group = defaultdict(list)
    for t in tasks:
        by_source_group[source[t]].append(t)

    report = {"database": str(args.db), "tasks": len(tasks), "records": sum(len(by_task[t]) for t in tasks),
              "edge_ridge_in_train": EDGE_RIDGE, "leave_one_task_out": {}, "leave_one_source_out": {}}
    for name, groups in (("leave_one_task_out", by_task_group), ("leave_one_source_out", by_source_group)):
        out = report[name]
        out["table"] = left_out(groups, lambda train, t: base[t])
        for p in PENALTIES:
            out[f"table+edge_term/ridge{p:g}"] = left_out(groups, lambda train, t, p=p: base[t] + x[t] @ fit(train, p, True))
            out[f"table+label_ridge/ridge{p:g}"] = left_out(groups, lambda train, t, p=p: base[t] + x[t] @ fit(train, p, False))

    # Fitted on every task: how it ranks the held-out fits, and what it puts first of all cells.
    every = np.array([edge_ops(str(Cell.from_code(c))) for c in range(NUM_CELLS)])
    w = fit(tasks, EDGE_RIDGE, True)
    scores = {"table": table_z, "table+edge_term": table_z + every @ w}
    fits = [f for f in json.loads(args.fits.read_text()) if f["recipe"].rsplit("/", 1)[0] == args.recipe]
    report["heldout_fits_spearman"] = {
        name: {s: round(spearman(sc[[Cell.parse(f["cell"]).code for f in fits if f["set"] == s]],
                                 [f["best_val_acc"] for f in fits if f["set"] == s]), 3)
               for s in sorted({f["set"] for f in fits})}
        for name, sc in scores.items()
    }
    if args.seed_means:
        means = {s["set"]: s["cell_means"] for s in json.loads(args.seed_means.read_text())["sets"]}
        report["heldout_seed_means_spearman"] = {
            name: {s: round(spearman(sc[[Cell.parse(c).code for c in m]], list(m.values())), 3) for s, m in sorted(means.items())}
            for name, sc in scores.items()
        }
    report["first_of_all_cells"] = {
        name: [{"cell": str(Cell.from_code(int(c))), "nb201_index": Cell.from_code(int(c)).index,
                "table_rank": int(np.sum(table_z > table_z[c])) + 1} for c in np.argsort(-sc)[:5]]
        for name, sc in scores.items()
    }
    first = first_within_top(table_z, w)
    report["first_within_table_top_1pct"] = {"cells": TRUST, "cell": str(Cell.from_code(first)),
                                             "nb201_index": Cell.from_code(first).index,
                                             "table_rank": int(np.sum(table_z > table_z[first])) + 1}
    report["edge_weights"] = np.round(w.reshape(6, 5), 3).tolist()  # (edge, op) in EDGES x OPS order
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
