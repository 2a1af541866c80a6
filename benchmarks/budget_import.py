"""Append the labels `label_budget.py` made to a database built at their budget.

`label_budget.py` labels a database's tasks again at another epoch budget, each cell exactly as
`metad2a db build --epochs N` would: the same split, fit seed, augmentation, rate and network,
one cell at a time. A database drawn with the same settings at that budget (same tasks, same
cells) can therefore take those labels as its records instead of training them again. This
checks that it is such a database: the two manifests' draws and sources must be equal, their
schedules may differ only in the epochs, and the labels file must have been made from
``--from`` (its database, schedule and seed). Labels at another budget than the new
database's are left out; the rest become records, each a full curve of that budget.

    python benchmarks/budget_import.py databases/nb201_30ep --from databases/nb201 --labels docs/label_budget.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_import import append_new

from metad2a_cli.meta.db import Database, Record, parse_shard

REPO = Path(__file__).resolve().parents[1]


def best_epoch(curve: list[float]) -> int:
    """1-based: the earliest best epoch, as fit keeps it."""
    return 1 + max(range(len(curve)), key=lambda e: (curve[e], -e))


def importable(target: Database, source: Database, made: dict) -> list[Record]:
    """``made``: label_budget.py's report. Its labels as ``target``'s records; SystemExit when
    they were not made from ``source``, or ``target`` is not ``source`` drawn again at their budget."""
    if (REPO / made["database"]).resolve() != source.path.resolve():  # label_budget.py names it from the repository
        raise SystemExit(f"the labels were made from {made['database']}, not {source.path}")
    if made["schedule"] != source.schedule.to_dict() or made["seed"] != source.manifest["settings"]["seed"]:
        raise SystemExit(f"the labels were made with schedule {made['schedule']} and seed {made['seed']}, not {source.path}'s")
    new, old = target.manifest, source.manifest
    if new["sources"] != old["sources"] or new["encoder"] != old["encoder"]:
        raise SystemExit(f"{target.path} was drawn from other sources or features than {source.path}")
    draw = {k: v for k, v in new["settings"].items() if k != "schedule"}
    if draw != {k: v for k, v in old["settings"].items() if k != "schedule"}:
        raise SystemExit(f"{target.path} drew its tasks with other settings than {source.path}")
    schedule = target.schedule.to_dict()
    if {**source.schedule.to_dict(), "epochs": schedule["epochs"]} != schedule:
        raise SystemExit(f"{target.path} labels with {schedule}: more than the epochs differ from {source.path}'s")
    if target.tasks() != source.tasks():
        raise SystemExit(f"{target.path} and {source.path} hold different tasks")
    cells = {t.id: set(t.cells) for t in target.tasks()}
    records = []
    for x in made["labels"]:
        if x["epochs"] != schedule["epochs"]:
            continue
        if x["cell"] not in cells.get(x["task"], ()):
            raise SystemExit(f"{x['task']} has no cell {x['cell']}")
        if len(x["curve"]) != x["epochs"] or x["accuracy"] != max(x["curve"]):
            raise SystemExit(f"{x['task']} {x['cell']}: the label is not the best of a {x['epochs']}-epoch curve")
        records.append(Record(x["task"], x["cell"], x["accuracy"], x["seconds"], best_epoch(x["curve"]), x["curve"], x["device"]))
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", type=Path, help="the database at the labels' budget")
    ap.add_argument("--from", dest="source", type=Path, required=True, help="the database label_budget.py relabelled")
    ap.add_argument("--labels", type=Path, required=True, help="label_budget.py's --out")
    ap.add_argument("--shard", default="0/1", help="the shard file to append to (stop and merge running builders first)")
    args = ap.parse_args()
    target = Database(args.db)
    records = importable(target, Database(args.source), json.loads(args.labels.read_text()))
    added = append_new(target, records, parse_shard(args.shard))
    print(f"{added} records added to {args.db} ({len(records) - added} already there)")


if __name__ == "__main__":
    main()
