"""Test-retest of database labels: label a task's cells again with another training seed
(same split, same schedule) and see whether the cells come out in the same order.

`label_reliability.py` compares a task's label spread with the sampling noise of its
validation set; that misses the training seed, which in a short fit of an unconverged
network may move a cell by several points. Here both noises are in: run 1 is the
database's own records, run 2 is the same cell on the same task with the task's fit seed
taken from build seed ``--seed``. Per task: Spearman between the two runs (final labels,
and the label read off each epoch of the curves), the median absolute difference, and the
reliability the sampling-noise formula predicted. With the published table beside the
database (``--table``), also each run's Spearman against it on the same cells, and how far
that Spearman moves when the first run's labels get a random difference of the size the two
runs showed: a change between runs inside that spread is label noise. Over all tasks, whether
the second run's difference from the first follows the table (the mean within-task Spearman of
the difference against the table, against a shuffle of each task's differences): a precision
that favours some kinds of cell shows there, seed noise does not. Results are merged
into ``--out`` after every cell, so a killed run resumes where it stopped.

A run is a seed and a precision: a GPU or a CPU that computes bfloat16 natively trains under
bfloat16 autocast, any other CPU in float32. With the database's own seed on a machine of the
other precision, the same fits are repeated with only the rounding changed, which tells
whether records from both kinds of machine are the same label.

    python benchmarks/label_retest.py --tasks t00008 t00002 --device cpu --out docs/label_retest.json

A label costs what a database record cost on the same device (minutes each on a 2-core CPU).
Labels made on a lent GPU (`gpu_pack.py --tasks ...`, then `gpu_labels.py` there) come in as
one more run with ``--import-labels RUN``, at the database's seed and rate:

    python benchmarks/label_retest.py --db databases/nb201_30ep --import-labels FILES_AT \
        --out docs/label_precision_30ep_float32_tasks.json
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

from gpu_import import check_schedule
from label_budget import locked_update, read_labels
from label_reliability import precision, published_accuracy, sampling_noise

from metad2a_cli.meta.db import BuildSettings, Database, Record, device_name, load_task_images, task_seed
from metad2a_cli.meta.table import TABLE_FILE, load_table
from metad2a_cli.meta.train import average_ranks, spearman
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.labels import label_cells
from metad2a_cli.training.policies import DEFAULT_LR

REPO = Path(__file__).resolve().parents[1]


def runs_by_rate(records: list[Record], settings: BuildSettings, retest: list[dict]) -> dict:
    """{lr: {(seed, precision): {(task, cell): label}}}, the database's records as its own seed's run."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        run = settings.seed, precision(r.device)
        runs[settings.schedule.lr][run][r.task, r.cell] = {"cell": r.cell, "accuracy": r.accuracy, "curve": r.curve,
                                                              "device": r.device}
    for r in retest:
        runs[r.get("lr", DEFAULT_LR)][r["seed"], precision(r["device"])][r["task"], r["cell"]] = r
    return runs


def summarise(tasks: dict, runs: dict, published: np.ndarray | None = None) -> list[tuple[dict, tuple | None]]:
    """Per task, learning rate and pair of seeds, the cells both runs labelled: ``compare``'s row
    and (second run minus first, table) on those cells."""
    rows = []
    for lr, by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        for tid in sorted({k[0] for s in seeds for k in by_seed[s]}):
            for s1, s2 in combinations(seeds, 2):
                one, two = by_seed[s1], by_seed[s2]
                pairs = [(one[k], two[k]) for k in one if k[0] == tid and k in two]
                if len(pairs) >= 3:
                    rows.append(compare(tasks[tid], lr, [s1, s2], pairs, published))
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


def rows_against(rows: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``rows`` with ``ranks``: Spearman, given ranks."""
    x = rows - rows.mean(axis=1, keepdims=True)
    y = ranks - ranks.mean()
    return x @ y / np.sqrt((x * x).sum(axis=1) * (y @ y))


def table_change_by_noise(a: np.ndarray, b: np.ndarray, table: np.ndarray, draws: int = 4000) -> dict:
    """Each run's Spearman against the table, and the spread of that Spearman when run ``a``
    gets a normal difference with the sd of ``a - b`` (seeded): what label noise alone moves."""
    first, second = spearman(a, table), spearman(b, table)
    rng = np.random.default_rng(0)
    sd = float(np.std(a - b, ddof=1))
    noisy = a + rng.normal(0, sd, (draws, len(a)))  # row by row the stream a draw at a time would take
    ranks = np.argsort(np.argsort(noisy, axis=1), axis=1)  # continuous noise: no ties
    moved = rows_against(ranks, average_ranks(table)) - first
    return {"table_spearman": [round(first, 3), round(second, 3)], "table_spearman_change": round(second - first, 3),
            "noise_change_sd": round(float(moved.std()), 3),
            "noise_share_at_least_change": round(float(np.mean(np.abs(moved) >= abs(second - first) - 1e-12)), 3),
            "noise_draws": draws}


def difference_follows_table(samples: list[tuple[np.ndarray, np.ndarray]], draws: int = 4000) -> dict:
    """Mean over tasks of Spearman(b - a, table) for ``samples`` of (b - a, table) per task, and
    the share of draws, each difference shuffled within its task (seeded), whose mean is at
    least as far from zero: a systematic shift between runs along the table, or its absence."""
    observed = float(np.mean([spearman(d, t) for d, t in samples]))
    rng = np.random.default_rng(0)
    # Shuffling a difference shuffles its ranks, ties and all.
    shuffled = np.mean([rows_against(rng.permuted(np.tile(average_ranks(d), (draws, 1)), axis=1), average_ranks(t))
                        for d, t in samples], axis=0)
    return {"tasks": len(samples), "mean_spearman": round(observed, 3),
            "shuffle_share_at_least": round(float(np.mean(np.abs(shuffled) >= abs(observed) - 1e-12)), 3),
            "draws": draws}


def compare(task, lr: float, runs: list[tuple[int, str]], pairs: list[tuple[dict, dict]],
            published: np.ndarray | None = None) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
    a = np.array([p["accuracy"] for p, _ in pairs])
    b = np.array([q["accuracy"] for _, q in pairs])
    n_val = sum(len(f) for f in task.val)
    p = np.concatenate([a, b]) / 100
    noise, spread = sampling_noise(p, n_val), float(np.var(p, ddof=1))
    diff_sd = float(np.std(a - b, ddof=1))
    chance = 100.0 / len(task.classes)
    epochs = min(len(x["curve"]) for pair in pairs for x in pair)
    versus_table, along_table = {}, None
    if published is not None:
        table = published[[Cell.parse(x["cell"]).code for x, _ in pairs]]
        versus_table = {**table_change_by_noise(a, b, table),
                        "difference_table_spearman": round(spearman(b - a, table), 3)}
        along_table = b - a, table
    row = {
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
        "label_sd_by_run": [round(float(np.std(a, ddof=1)), 2), round(float(np.std(b, ddof=1)), 2)],
        "sampling_noise_sd": round(100 * noise**0.5, 2),
        # Two runs' labels differ by sqrt(2) times one run's noise (sampling and seed together).
        "run_diff_sd": round(diff_sd, 2),
        "sampling_reliability": round(1 - noise / spread, 3),
        "retest_reliability": round(1 - diff_sd**2 / 2 / (100**2 * spread), 3),
        **versus_table,
        "retest_spearman_by_epoch": [
            round(spearman([p["curve"][e] for p, _ in pairs], [q["curve"][e] for _, q in pairs]), 3)
            for e in range(epochs)
        ],
    }
    return row, along_table


def imported(run: Path, db: Database, records: list[Record], seed: int) -> list[dict]:
    """A GPU run's labels (`gpu_labels.py`'s records.jsonl; it fits with task seeds from the
    database's build seed, ``seed``) as retest entries, held to the database's schedule; a cell
    whose record has the run's precision is left out (it would stand for the database's own
    run)."""
    check_schedule(db, run)
    own = {(r.task, r.cell): precision(r.device) for r in records}
    out = []
    for line in (run / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if (r["task"], r["cell"]) not in own:
            raise SystemExit(f"{r['task']} {r['cell']}: the database holds no such record to retest")
        if own[r["task"], r["cell"]] != precision(r["device"]):
            out.append({"task": r["task"], "cell": r["cell"], "seed": seed, "lr": db.schedule.lr,
                        "accuracy": r["accuracy"], "curve": r["curve"], "seconds": r["seconds"], "device": r["device"]})
    return out


def report(db: Database, settings: BuildSettings, tasks: dict, records: list[Record], retest: list[dict],
           published: np.ndarray | None = None) -> dict:
    runs = runs_by_rate(records, settings, retest)
    compared = summarise(tasks, runs, published)
    by_lr, along_table = defaultdict(list), defaultdict(list)
    for r, sample in compared:
        by_lr[r["lr"]].append(r)
        along_table[r["lr"]].append(sample)
    return {
        "database": str(db.path.relative_to(REPO) if db.path.is_relative_to(REPO) else db.path),
        "schedule": settings.schedule.to_dict(),
        "by_lr": {str(lr): {"pairs": len(rs),
                            "median_retest_spearman": statistics.median(r["retest_spearman"] for r in rs),
                            "median_retest_reliability": statistics.median(r["retest_reliability"] for r in rs),
                            **({"median_table_spearman_change": statistics.median(r["table_spearman_change"] for r in rs),
                                "difference_follows_table": difference_follows_table(along_table[lr])}
                               if published is not None else {}),
                            "mean_accuracy": round(statistics.mean(r["mean_accuracy"] for r in rs), 2)}
                  for lr, rs in sorted(by_lr.items())},
        "tasks": [r for r, _ in compared], "rates": rates_compared(runs), "labels": retest,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "databases/nb201")
    ap.add_argument("--sources", type=Path, default=REPO.parent / "shared/data/images",
                    help="folder holding the database's sources by name")
    ap.add_argument("--tasks", nargs="*", default=[], help="task ids, labelled in this order")
    ap.add_argument("--seed", type=int, default=1, help="build seed of the retest run (the database's, in its manifest, only on a machine of the other precision)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate of the retest run (the database's by default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--share", default="0/1", metavar="I/N",
                    help="label every N-th cell of a task from the I-th (a process a core; shares write one --out)")
    ap.add_argument("--out", type=Path, default=REPO / "docs/label_retest.json")
    ap.add_argument("--report-only", action="store_true", help="summarise what --out holds, label nothing")
    ap.add_argument("--print-only", action="store_true", help="print the summary, write nothing")
    ap.add_argument("--import-labels", type=Path, metavar="RUN",
                    help="a gpu_labels.py run's folder: its labels join --out as a run at the database's seed; nothing labelled here")
    ap.add_argument("--table", type=Path, help=f"published accuracies (default: the database's {TABLE_FILE}, if any)")
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
    table = args.table or args.db / TABLE_FILE
    published = published_accuracy(load_table(table)) if table.is_file() else None
    missing = [t for t in args.tasks if t not in tasks]
    if missing:
        raise SystemExit(f"no such task in {args.db}: {', '.join(missing)}")
    dev, name = torch.device(args.device), device_name(args.device)
    share, shares = (int(x) for x in args.share.split("/"))
    labelling = not (args.report_only or args.print_only or args.import_labels)
    if labelling and not args.tasks:
        raise SystemExit("name the --tasks to label")
    if labelling and args.seed == settings.seed and args.lr == settings.schedule.lr:
        same = sorted({r.task for r in records if r.task in args.tasks and precision(r.device) == precision(name)})
        if same:
            raise SystemExit(f"--seed {args.seed} is the database's own and {', '.join(same)} already has "
                             f"{precision(name)} records; a retest needs another seed or the other precision")

    retest = read_labels(args.out)
    done = {(r["task"], r["cell"]) for r in retest
            if r["seed"] == args.seed and r.get("lr", DEFAULT_LR) == args.lr and precision(r["device"]) == precision(name)}

    if args.import_labels:
        def key(r: dict) -> tuple:  # a label's place in runs_by_rate
            return r.get("lr", DEFAULT_LR), r["seed"], precision(r["device"]), r["task"], r["cell"]

        held = {key(x) for x in retest}
        imports = [r for r in imported(args.import_labels, db, records, settings.seed) if key(r) not in held]
        print(f"{len(imports)} labels imported from {args.import_labels}")
    else:
        imports = []

    def save(new: list[dict]) -> dict:
        """Other shares write the same --out: what it holds now, plus ``new``, under its lock."""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        return locked_update(args.out, None, lambda labels: report(db, settings, tasks, records, labels + new, published))

    if labelling:
        for tid in args.tasks:
            task = tasks[tid]
            todo = [c for c in labelled[tid][share::shares] if (tid, c) not in done]
            if not todo:
                continue
            root = args.sources / task.source
            size = settings.schedule.input_size
            train, val = load_task_images(root, task.train, size), load_task_images(root, task.val, size)
            for cell in todo:
                t0 = time.perf_counter()
                [label] = label_cells([Cell.parse(cell)], train, val, schedule,
                                      task_seed(args.seed, tid), dev)
                entry = {
                    "task": tid, "cell": cell, "seed": args.seed, "lr": args.lr, "accuracy": round(label.accuracy, 4),
                    "curve": [round(a, 4) for a in label.curve], "seconds": round(time.perf_counter() - t0, 1),
                    "device": name,
                }
                save([entry])
                print(f"{tid} lr {args.lr} seed {args.seed} {cell} {label.accuracy:.2f} ({entry['seconds']} s)", flush=True)
    if args.print_only:
        result = report(db, settings, tasks, records, read_labels(args.out) + imports, published)
    else:
        result = save(imports)
    for row in result["tasks"]:
        print({k: v for k, v in row.items() if k != "retest_spearman_by_epoch"})
    for row in result["rates"]:
        print(row)


if __name__ == "__main__":
    main()
