"""Is `fit`'s default augmentation right at its default 30 epochs? Label fixed cells on
database tasks with another policy, exactly as `db build` labels (the task's split and fit
seed, `meta.db.label_unit`), and compare each with the same cell's label under the
database's policy on the same task, same initial weights and batches.

`fit` defaults to `--augment none`, chosen on 10-epoch fits of one cell (docs/fit.md,
"Augmentation"), while the databases and the held-out evaluation use crop-flip. The other
side of each pair is already measured: `benchmarks/anchor_labels.py` labelled the table's
first pick (857) and the ResNet cell (11472) at 30 epochs with crop-flip on these tasks
(`docs/anchor_labels.json`). Only meta-training tasks: the held-out sets are not read.
Labels are merged into ``--out`` after every cell (a killed run resumes).

    python benchmarks/augment_budget.py --augment none --per-source 1

At 30 epochs a label costs 3-5.5 minutes on one core of the 2-core development CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from anchor_labels import spread_by_source
from label_budget import locked_update, read_labels
from paired import sign_flip_p, sign_test

from metad2a_cli.meta.db import BuildSettings, Database, WorkUnit, label_unit
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.policies import AUGMENT_POLICIES

REPO = Path(__file__).resolve().parents[1]


def report(labels: list[dict], base: list[dict], base_augment: str, tasks: dict) -> dict:
    """Per (cell, epochs): the other policy's label minus the base policy's, paired by task."""
    ours = {(x["task"], x["cell"], x["epochs"], x["augment"]): x for x in labels}
    theirs = {(x["task"], x["cell"], x["epochs"]): x for x in base}
    pairs: dict[str, list[dict]] = {}
    for (tid, cell, epochs, augment), x in sorted(ours.items()):
        other = theirs.get((tid, cell, epochs))
        if other:
            key = f"{augment} - {base_augment}, {epochs} epochs, cell {Cell.parse(cell).index}"
            pairs.setdefault(key, []).append({"task": tid, "source": tasks[tid].source,
                                              augment: x["accuracy"], base_augment: other["accuracy"],
                                              "difference": round(x["accuracy"] - other["accuracy"], 2)})
    summary = {}
    for key, rows in pairs.items():
        d = [r["difference"] for r in rows]
        summary[key] = {"tasks": len(d), "mean_points": round(statistics.mean(d), 2),
                        "median_points": round(statistics.median(d), 2),
                        "wins": sum(v > 0 for v in d), "losses": sum(v < 0 for v in d),
                        "sign_test_p": sign_test(sum(v > 0 for v in d), sum(v < 0 for v in d)),
                        "sign_flip_p": sign_flip_p(d), "tasks_detail": rows}
    for augment in sorted({x["augment"] for x in labels}):
        pooled = [r["difference"] for key, rows in pairs.items() if key.startswith(f"{augment} - ") for r in rows]
        if pooled:
            summary[f"{augment} - {base_augment}, all cells"] = {
                "pairs": len(pooled), "mean_points": round(statistics.mean(pooled), 2),
                "wins": sum(v > 0 for v in pooled), "losses": sum(v < 0 for v in pooled),
                "sign_flip_p": sign_flip_p(pooled)}
    return {"base_augment": base_augment, "comparisons": summary, "labels": labels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "databases/nb201")
    ap.add_argument("--sources", type=Path, default=REPO.parent / "shared/data/images",
                    help="folder holding the database's sources by name")
    ap.add_argument("--base", type=Path, default=REPO / "docs/anchor_labels.json",
                    help="labels of the database's policy to pair with (anchor_labels.py's)")
    ap.add_argument("--augment", default="none", choices=AUGMENT_POLICIES, help="the policy to compare with the database's")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--per-source", type=int, default=1, help="tasks a source, from those --base labelled")
    ap.add_argument("--share", default="0/1", help="i/n: label every n-th of the tasks from the i-th")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "docs/augment_budget.json")
    ap.add_argument("--report-only", action="store_true", help="summarise what --out holds, label nothing")
    args = ap.parse_args()

    db = Database(args.db.resolve())
    settings = BuildSettings.from_dict(db.manifest["settings"])
    if args.augment == settings.schedule.augment:
        raise SystemExit(f"{args.db} labels with {args.augment} already; name another policy")
    other = replace(settings, schedule=replace(settings.schedule, epochs=args.epochs, augment=args.augment))
    tasks = {t.id: t for t in db.tasks()}
    # a label without an epoch count is at the database's budget, as anchor_labels.py reads it
    base = [{**x, "epochs": x.get("epochs", settings.schedule.epochs)} for x in read_labels(args.base)]
    base = [x for x in base if x["epochs"] == args.epochs]
    labelled = {x["task"] for x in base}
    order, taken = [], {}
    for tid in spread_by_source([tasks[t] for t in labelled]):
        if taken.get(tasks[tid].source, 0) < args.per_source:
            order.append(tid)
            taken[tasks[tid].source] = taken.get(tasks[tid].source, 0) + 1
    i, n = (int(x) for x in args.share.split("/"))

    def save(new: dict | None) -> dict:
        return locked_update(args.out, new, lambda labels: report(labels, base, settings.schedule.augment, tasks))

    if not args.report_only:
        for tid in order[i::n]:
            have = {(x["task"], x["cell"]) for x in read_labels(args.out)
                    if x["epochs"] == args.epochs and x["augment"] == args.augment}
            todo = tuple(sorted({x["cell"] for x in base if x["task"] == tid} - {c for t, c in have if t == tid}))
            if not todo:
                continue
            for [record] in label_unit(WorkUnit(tasks[tid], args.sources / tasks[tid].source, todo), other, args.device, 1):
                save({**asdict(record), "epochs": args.epochs, "augment": args.augment})
                print(f"{tid} {Cell.parse(record.cell).index} {args.augment} {record.accuracy:.2f} ({record.seconds:.0f} s)", flush=True)
    result = save(None)
    print(json.dumps({k: {f: v for f, v in s.items() if f != "tasks_detail"} for k, s in result["comparisons"].items()}, indent=1))


if __name__ == "__main__":
    main()
