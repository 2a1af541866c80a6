"""Append the records a GPU run wrote (`gpu_labels.py`'s OUT/records.jsonl) to a database.

Each record must name a task of the database and one of that task's cells, and the run's
label schedule (`gpu_labels.json`'s `schedule`: epochs, augmentation, rate, network) must
be the database's; records the database already holds are skipped. Writes through the
database's own shard writer (append-only, fsynced, locked), as `metad2a db build` does.

    python benchmarks/gpu_import.py databases/nb201 /work/.device/1/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metad2a_cli.meta.db import Database, Record, parse_shard


def check_schedule(db: Database, run: Path) -> None:
    """Refuse a run whose labels are not the database's kind (another schedule)."""
    ran = json.loads((run / "gpu_labels.json").read_text()).get("schedule")
    if ran != db.schedule.to_dict():
        raise SystemExit(f"the run labelled with schedule {ran}; {db.path} labels with {db.schedule.to_dict()}")


def append_new(db: Database, records: list[Record], shard: tuple[int, int]) -> int:
    """Append the records ``db`` does not hold yet through its shard writer; returns how many."""
    done = {(r.task, r.cell) for r in db.records()}
    added = 0
    with db.shard_writer(shard) as append:
        for r in records:
            if (r.task, r.cell) not in done:
                append(r)
                done.add((r.task, r.cell))
                added += 1
    return added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", type=Path)
    ap.add_argument("run", type=Path, help="the folder holding records.jsonl and gpu_labels.json")
    ap.add_argument("--shard", default="0/1")
    args = ap.parse_args()
    db = Database(args.db)
    check_schedule(db, args.run)
    cells = {t.id: set(t.cells) for t in db.tasks()}
    new = [Record(**json.loads(line)) for line in (args.run / "records.jsonl").read_text().splitlines() if line.strip()]
    for r in new:
        if r.cell not in cells.get(r.task, ()):
            raise SystemExit(f"{r.task} has no cell {r.cell}: the run's pack came from another database")
    added = append_new(db, new, parse_shard(args.shard))
    print(f"{added} records added to {args.db} ({len(new) - added} already there)")


if __name__ == "__main__":
    main()
