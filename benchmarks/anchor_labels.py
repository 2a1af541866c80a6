"""Which of the cells the first pick hangs on trains best in the database's regime? Label a
few fixed cells (anchors: the table's first pick 857, the ResNet cell 11472, ...) on the
database's complete tasks, exactly as `db build` would label them (its schedule, the task's
split and fit seed, `meta.db.label_unit`), so that every task compares them directly.

The database's draw gives each task 10 cells of its own: the search's candidates meet there
only through the dataset term, whose maximum over all cells extrapolates
(docs/generalization.md). Here they meet on the same tasks. Per anchor, over the tasks: its
label standardised against the task's drawn cells and how many of them it beats, and for
each pair of anchors the paired difference in points with wins, a sign test and a sign-flip
(permutation) test of the mean. Beside it, what the table plus the dataset term (edge_term_loto.py's closed form, fitted without the task) said
of each pair before the labels existed, and what it would say had the draw given every task
the anchors too (fitted with the other tasks' anchor labels added to their records).

Only meta-training tasks: the held-out sets are not read. Labels are merged into ``--out``
after every cell (a killed run resumes); ``--share i/n`` lets n processes split the tasks.

    python benchmarks/anchor_labels.py --cells 857 11472 --share 0/2 &
    python benchmarks/anchor_labels.py --cells 857 11472 --share 1/2
    python benchmarks/anchor_labels.py --cells 857 11472 --epochs 30   # at fit's default budget
    python benchmarks/anchor_labels.py --report-only

A label at the database's 10 epochs costs what a record does (1-2 minutes on one core of the
2-core development CPU for these two cells); at 30 epochs 3-5.5 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from edge_term_loto import first_within_top, residual_term, task_arrays
from label_budget import COMPLETE, locked_update, read_labels
from paired import sign_flip_p, sign_test
from label_reliability import edge_ops, published_accuracy

from metad2a_cli.meta.db import BuildSettings, Database, Record, WorkUnit, label_unit
from metad2a_cli.meta.table import TABLE_FILE, load_table
from metad2a_cli.meta.train import EDGE_RIDGE
from metad2a_cli.nb201.cells import Cell

REPO = Path(__file__).resolve().parents[1]
ANCHORS = (857, 11472)  # the table's first (the shipped first pick) and NB201's ResNet cell


def spread_by_source(tasks: list) -> list:
    """Task ids in turns over their sources, so that a partial run covers every source."""
    by_source = defaultdict(list)
    for t in sorted(tasks, key=lambda t: t.id):
        by_source[t.source].append(t.id)
    turns = itertools.zip_longest(*(by_source[s] for s in sorted(by_source)))
    return [tid for turn in turns for tid in turn if tid]


def report(records: list[Record], anchors: list[dict], table: np.ndarray, epochs: int) -> dict:
    """Per budget (``epochs`` is the database's): each anchor's labels and every pair's."""
    budgets = defaultdict(list)
    for a in anchors:
        budgets[a.get("epochs", epochs)].append(a)
    return {"database_epochs": epochs,
            "budgets": {str(e): compare(records, budgets[e], table, e == epochs) for e in sorted(budgets)},
            "labels": anchors}


def compare(records: list[Record], anchors: list[dict], table: np.ndarray, against_drawn: bool) -> dict:
    """Anchors against each other, and where they share the records' budget (``against_drawn``)
    against the task's drawn cells too."""
    by_task = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    complete = {t: rs for t, rs in by_task.items() if len(rs) >= COMPLETE}
    table_z = (table - np.nanmean(table)) / np.nanstd(table)
    labels = defaultdict(dict)  # task -> cell -> accuracy
    for a in anchors:
        labels[a["task"]][a["cell"]] = a["accuracy"]
    x, y, base = task_arrays(complete, table_z)
    if against_drawn:  # the term as it would be if the draw also gave every task the anchors
        joined = {t: rs + [Record(t, c, acc, 0.0) for c, acc in labels.get(t, {}).items() if c not in {r.cell for r in rs}]
                  for t, rs in complete.items()}
        x_joined, y_joined, base_joined = task_arrays(joined, table_z)

    def score(cell: str, term: np.ndarray) -> float:
        return round(float(table_z[Cell.parse(cell).code] + edge_ops(cell) @ term), 3)

    rows, z_by_cell = [], defaultdict(dict)  # cell -> task -> z
    for tid in sorted(labels):
        drawn = np.array([r.accuracy for r in complete[tid]])
        others = [t for t in complete if t != tid]
        term = residual_term(x, y, base, others, EDGE_RIDGE)
        row = {"task": tid, "anchors": {}}
        if against_drawn:
            row.update(drawn_mean=round(float(drawn.mean()), 2), drawn_sd=round(float(drawn.std()), 2))
            # Fitted without the task's own anchors: only the other tasks' labels of them.
            term_joined = residual_term(x_joined, y_joined, base_joined, others, EDGE_RIDGE)
        for cell, acc in sorted(labels[tid].items(), key=lambda kv: Cell.parse(kv[0]).index):
            got = {"accuracy": round(acc, 2), "predicted": score(cell, term)}
            if against_drawn:
                got["predicted_with_anchors"] = score(cell, term_joined)
                z = (acc - drawn.mean()) / (drawn.std() or 1.0)
                z_by_cell[cell][tid] = z
                got.update(z=round(float(z), 3), beats_drawn=int(np.sum(drawn < acc)))
            row["anchors"][str(Cell.parse(cell).index)] = got
        rows.append(row)
    cells = sorted({c for t in labels.values() for c in t}, key=lambda c: Cell.parse(c).index)
    # Means over the tasks that hold every anchor, so that the anchors' means compare.
    full = [t for t in labels if len(labels[t]) == len(cells)]
    per_anchor = {}
    for c in cells if full else []:
        got = per_anchor[str(Cell.parse(c).index)] = {
            "cell": c, "tasks": len(full), "mean_accuracy": round(statistics.mean(labels[t][c] for t in full), 2),
            "table_accuracy": round(float(table[Cell.parse(c).code]), 2),
        }
        if against_drawn:
            z = [z_by_cell[c][t] for t in full]
            got.update(mean_z=round(float(np.mean(z)), 3), median_z=round(float(np.median(z)), 3))
    pairs = {}
    for a, b in itertools.combinations(cells, 2):
        ia, ib = str(Cell.parse(a).index), str(Cell.parse(b).index)
        both = [r for r in rows if ia in r["anchors"] and ib in r["anchors"]]
        if not both:
            continue
        diff = [r["anchors"][ia]["accuracy"] - r["anchors"][ib]["accuracy"] for r in both]
        wins, losses = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
        pair = pairs[f"{ia} - {ib}"] = {
            "tasks": len(both), "mean_points": round(statistics.mean(diff), 2),
            "median_points": round(statistics.median(diff), 2),
            "sd_points": round(statistics.stdev(diff), 2) if len(diff) > 1 else None,
            "wins": wins, "losses": losses, "sign_test_p": sign_test(wins, losses), "sign_flip_p": sign_flip_p(diff),
        }
        for key, name in (("predicted", "term"), ("predicted_with_anchors", "term_with_anchors")):
            if key not in both[0]["anchors"][ia]:
                continue
            said = [r["anchors"][ia][key] > r["anchors"][ib][key] for r in both]
            pair[f"{name}_said_first_better_on"] = sum(said)
            pair[f"{name}_right_on"] = sum(s == (d > 0) for s, d in zip(said, diff) if d != 0)
    result = {"anchors": per_anchor, "pairs": pairs, "tasks": rows}
    if against_drawn:  # what each term, fitted on every task, puts first among the table's top 1%
        result["first_within_table_top_1pct"] = {}
        for name, arrays in (("term", (x, y, base)), ("term_with_anchors", (x_joined, y_joined, base_joined))):
            first = first_within_top(table_z, residual_term(*arrays, list(complete), EDGE_RIDGE))
            result["first_within_table_top_1pct"][name] = {
                "nb201_index": Cell.from_code(first).index, "table_rank": int(np.sum(table_z > table_z[first])) + 1}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "databases/nb201")
    ap.add_argument("--sources", type=Path, default=REPO.parent / "shared/data/images",
                    help="folder holding the database's sources by name")
    ap.add_argument("--cells", nargs="+", default=[str(a) for a in ANCHORS], help="NB201 indices or cell strings")
    ap.add_argument("--tasks", nargs="+", default=None, help="task ids (default: every complete task, in turns over sources)")
    ap.add_argument("--epochs", type=int, default=None, help="the budget to label at (default: the database's)")
    ap.add_argument("--share", default="0/1", help="i/n: label every n-th of the tasks from the i-th")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "docs/anchor_labels.json")
    ap.add_argument("--report-only", action="store_true", help="summarise what --out holds, label nothing")
    args = ap.parse_args()

    db = Database(args.db.resolve())
    settings = BuildSettings.from_dict(db.manifest["settings"])
    epochs = args.epochs or settings.schedule.epochs
    at_budget = replace(settings, schedule=replace(settings.schedule, epochs=epochs))
    tasks = {t.id: t for t in db.tasks()}
    records = db.records()
    table = published_accuracy(load_table(db.path / TABLE_FILE))
    counts = defaultdict(int)
    for r in records:
        counts[r.task] += 1
    order = args.tasks or spread_by_source([t for t in tasks.values() if counts[t.id] >= COMPLETE])
    missing = [t for t in order if t not in tasks]
    if missing:
        raise SystemExit(f"no such task in {args.db}: {', '.join(missing)}")
    cells = [str(Cell.from_index(int(c))) if c.isdigit() else str(Cell.parse(c)) for c in args.cells]
    i, n = (int(x) for x in args.share.split("/"))
    # At the database's budget a drawn cell's record is that label already.
    drawn = {(r.task, r.cell): r for r in records} if epochs == settings.schedule.epochs else {}

    def save(new: dict | None) -> dict:
        return locked_update(args.out, new, lambda labels: report(records, labels, table, settings.schedule.epochs))

    if not args.report_only:
        for tid in order[i::n]:
            have = {(a["task"], a["cell"]) for a in read_labels(args.out) if a.get("epochs", settings.schedule.epochs) == epochs}
            for cell in cells:
                if (tid, cell) in drawn and (tid, cell) not in have:
                    save({**asdict(drawn[(tid, cell)]), "epochs": epochs})
            todo = tuple(c for c in cells if (tid, c) not in have and (tid, c) not in drawn)
            if not todo:
                continue
            unit = WorkUnit(tasks[tid], args.sources / tasks[tid].source, todo)
            for [record] in label_unit(unit, at_budget, args.device, 1):
                save({**asdict(record), "epochs": epochs})
                print(f"{tid} {Cell.parse(record.cell).index} {record.accuracy:.2f} ({record.seconds:.0f} s)", flush=True)
    result = save(None)
    print(json.dumps({e: {"anchors": b["anchors"], "pairs": b["pairs"]} for e, b in result["budgets"].items()}, indent=1))


if __name__ == "__main__":
    main()
