"""Pack what a GPU machine needs to build database labels, into a folder to carry there.

A device machine gets a copy of the repository and nothing beside it, so the images of the
database's tasks travel decoded as `fit` decodes them (uint8, 32x32), one compressed file
per source holding only the files the packed tasks use. Tasks are packed in the
database's order until the size budget is spent; the device labels them in that order.
With ``--tasks``, the named tasks instead, in that order and with every cell, labelled or
not: labels of cells the database holds are a retest (`label_retest.py --import-labels`),
e.g. of float32 CPU records in bfloat16 on the GPU.
Also packed: a 1,000-image CIFAR-10 calibration task (10 classes x 100 images, 25%
validation) with the published accuracies of the calibration cells, used only to check
how well a label schedule ranks cells.

    python benchmarks/gpu_pack.py --db databases/nb201_30ep --out .gpu --budget-mb 40
    python benchmarks/gpu_pack.py --tasks t00084 t00085 --out .gpu   # a retest of two tasks
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import zlib
from pathlib import Path

import numpy as np

from metad2a_cli.meta.db import Database
from metad2a_cli.training.fitdata import decode

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
SIZE = 32


def pack_calibration(out: Path, per_class: int = 100, val_fraction: float = 0.25, seed: int = 0) -> None:
    root = SHARED / "calibration" / "cifar10_train500"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    train, val = [], []
    for label, cls in enumerate(classes):
        files = sorted((root / cls).iterdir())
        random.Random(f"calibration/{seed}/{cls}").shuffle(files)
        files = files[:per_class]
        n_val = round(per_class * val_fraction)
        val += [(f, label) for f in files[:n_val]]
        train += [(f, label) for f in files[n_val:]]
    arrays = {}
    for side, items in (("train", train), ("val", val)):
        images, _ = decode([f for f, _ in items], SIZE)
        arrays[f"{side}_x"] = np.stack(images)
        arrays[f"{side}_y"] = np.array([y for _, y in items], dtype=np.int64)
    with open(SHARED / "calibration" / "nb201_cifar10_subset200.csv") as fh:
        rows = list(csv.DictReader(fh))
    arrays["cells"] = np.array([r["arch_str"] for r in rows])
    arrays["cifar10"] = np.array([float(r["cifar10_test"]) for r in rows])
    np.savez_compressed(out / "calibration.npz", **arrays)


def pack_tasks(db: Path, out: Path, budget: float, named: list[str] | None = None) -> int:
    tasks = json.loads((db / "tasks.json").read_text())
    database = Database(db)
    if named:
        by_id = {t["id"]: t for t in tasks}
        unknown = [t for t in named if t not in by_id]
        if unknown:
            raise SystemExit(f"no such task in {db}: {', '.join(unknown)}")
        tasks = [by_id[t] for t in named]
    elif database.manifest["format_version"] >= 2:  # labels of this kind exist: pack only what is left
        done = {(r.task, r.cell) for r in database.records()}
        tasks = [t for t in tasks if any((t["id"], c) not in done for c in t["cells"])]
    chosen, per_source, size = [], {}, 0.0
    estimate = {}  # source -> compressed bytes per image, measured on its first task
    for task in tasks:
        files = {f for side in ("train", "val") for cls in task[side] for f in cls}
        new = files - per_source.get(task["source"], set())
        if task["source"] not in estimate:
            sample, _ = decode([SHARED / "images" / task["source"] / f for f in sorted(files)[:64]], SIZE)
            block = np.stack([a for a in sample if a is not None])
            estimate[task["source"]] = len(zlib.compress(block.tobytes(), 6)) / len(block)
        cost = len(new) * estimate[task["source"]]
        if size + cost > budget:
            if named:
                raise SystemExit(f"the named tasks need more than --budget-mb {budget / 1e6:g}")
            break
        size += cost
        per_source.setdefault(task["source"], set()).update(new)
        chosen.append(task)
    for source, files in per_source.items():
        names = sorted(files)
        images, _ = decode([SHARED / "images" / source / f for f in names], SIZE)
        keep = [i for i, a in enumerate(images) if a is not None]
        np.savez_compressed(out / f"source-{source}.npz", images=np.stack([images[i] for i in keep]),
                            names=np.array([names[i] for i in keep]))
    (out / "tasks.json").write_text(json.dumps(chosen))
    # The labels must be the database's kind: its schedule, read as this version reads it.
    (out / "schedule.json").write_text(json.dumps(database.schedule.to_dict()))
    return len(chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=REPO / "databases" / "nb201_30ep")
    ap.add_argument("--out", type=Path, default=REPO / ".gpu")
    ap.add_argument("--budget-mb", type=float, default=40.0)
    ap.add_argument("--tasks", nargs="+", help="pack these tasks, every cell, in this order")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pack_calibration(args.out)
    n = pack_tasks(args.db, args.out, args.budget_mb * 1e6, args.tasks)
    # The proxy that labelled format-1 databases, for the speed comparison in the same run.
    old = subprocess.run(["git", "show", "b453a4c:src/metad2a_cli/proxy.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    (args.out / "old_proxy.py").write_text(old.replace("from .space import", "from metad2a_cli.nb201.cells import"))
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"packed {n} tasks and the calibration task: {total / 1e6:.1f} MB in {args.out}")


if __name__ == "__main__":
    main()
