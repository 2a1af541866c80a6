"""The held-out evaluation's fits on a GPU, over seeds and peak learning rates.

`heldout_fit.py` fits the search's picks, the ResNet and largest cells and a random panel
on gtsrb and fashion_mnist subsets with `metad2a fit`, one fit at a time: 5-20 minutes a
fit on the 2-core CPU, so one recipe's panel takes a day and only seed 0 at lr 0.1 was
ever fitted in full. Whether a smaller rate serves users better (`docs/fit.md`, "Learning
rate at small batches") needs every cell at both rates over a few seeds. A fit's best
validation accuracy is what `training.labels.label_cells` gives for the same split, seed
and schedule (a test holds them equal), so on a GPU the cells of a set train together.

    python benchmarks/gpu_heldout.py pack                 # here: subsamples, split as fit splits
    python benchmarks/gpu_heldout.py run --out $OUT       # on the device (device_heldout.sh)
    python benchmarks/gpu_heldout.py report FILES_AT --report docs/heldout_gpu.json
    python benchmarks/gpu_heldout.py run --out $OUT --epochs 30 --rates 0.1 --augment none   # fit's defaults

`pack` writes into `.gpu-heldout/` each set's subsample for each seed
(heldout_fit's subsample for that seed, split by fit's rule with that seed, decoded at 32
px) and the cells: every cell `docs/heldout_fits.json` holds for the set, the panel among
them. `run` labels them for each (seed, rate) in turn, most wanted first, appending to
`OUT/heldout.jsonl` after every group of cells, until ``--deadline``. `report` reads
those records and the CPU fits of `docs/heldout_fits.json`: per set, seed and rate, the
criterion of the search-quality issue for the packaged weights' picks, and how the two
rates and the two devices agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from heldout_fit import AUGMENT, EPOCHS, LARGEST, RESNET, SETS, panel_cells, recipe_key, subsample_list

from metad2a_cli.meta.train import spearman
from metad2a_cli.training.policies import AUGMENT_POLICIES

REPO = Path(__file__).resolve().parents[1]
FITS = REPO / "docs" / "heldout_fits.json"
EVAL = REPO / "docs" / "heldout_eval.json"
SIZE = 32
VAL_FRACTION = 0.2  # fit's default
# (seed, peak rate), most wanted first: seed 0 is the CPU evaluation's own seed.
RUNS = [(0, 0.025), (0, 0.1), (1, 0.025), (1, 0.1), (2, 0.025), (2, 0.1)]


def pack(out: Path, seeds: list[int]) -> None:
    import tempfile

    from metad2a_cli.data.images import read_image_folder
    from metad2a_cli.training.fitdata import split_and_decode

    out.mkdir(parents=True, exist_ok=True)
    fits = json.loads(FITS.read_text())
    panel = [c for _, c in panel_cells()]
    cells = {name: panel + sorted({r["cell"] for r in fits if r["set"] == name} - set(panel)) for name in SETS}
    (out / "heldout_cells.json").write_text(json.dumps(cells, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        for name, per_class in SETS.items():
            for seed in seeds:
                listing = subsample_list(name, per_class, seed, Path(tmp))
                _, train, val, _ = split_and_decode(read_image_folder(listing), VAL_FRACTION, SIZE, seed)
                np.savez_compressed(out / f"heldout-{name}-seed{seed}.npz", train_x=train.images,
                                    train_y=train.labels, val_x=val.images, val_y=val.labels)
                print(f"{name} seed {seed}: {len(train)} train / {len(val)} validation images", flush=True)


def run(args) -> None:
    import torch

    from metad2a_cli.nb201.cells import Cell
    from metad2a_cli.training.fitdata import LabeledImages
    from metad2a_cli.training.labels import label_cells
    from metad2a_cli.training.schedule import LabelSchedule

    t_start = time.perf_counter()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cells = json.loads((args.pack / "heldout_cells.json").read_text())
    path = args.out / "heldout.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    done = set()
    if path.is_file():
        done = {(r["set"], r["seed"], r["lr"], r["epochs"], r.get("augment", AUGMENT), r["cell"])
                for r in map(json.loads, path.read_text().splitlines())}
    slowest = 0.0
    epochs = 1 if args.smoke else args.epochs
    for seed, lr in [(s, lr) for s, lr in RUNS if lr in args.rates]:
        for set_name in SETS:
            data = args.pack / f"heldout-{set_name}-seed{seed}.npz"
            if not data.is_file():
                continue
            arrays = np.load(data)
            train = LabeledImages(arrays["train_x"], arrays["train_y"])
            val = LabeledImages(arrays["val_x"], arrays["val_y"])
            todo = [c for c in cells[set_name] if (set_name, seed, lr, epochs, args.augment, c) not in done]
            if args.smoke:
                train = LabeledImages(train.images[:80], train.labels[:80])
                todo = todo[:2]
            schedule = LabelSchedule(epochs=epochs, augment=args.augment, lr=lr)
            for i in range(0, len(todo), args.chunk):
                if time.perf_counter() - t_start + slowest > args.deadline:
                    print(f"out of time at seed {seed}, lr {lr:g}, {set_name}", flush=True)
                    return
                group = todo[i : i + args.chunk]
                t0 = time.perf_counter()
                labels = label_cells([Cell.parse(c) for c in group], train, val, schedule, seed, device)
                seconds = time.perf_counter() - t0
                slowest = max(slowest, seconds)
                with open(path, "a") as fh:
                    for c, lab in zip(group, labels):
                        fh.write(json.dumps({"set": set_name, "seed": seed, "lr": lr, "epochs": schedule.epochs,
                                             "augment": schedule.augment, "cell": c,
                                             "accuracy": round(lab.accuracy, 4), "curve": [round(a, 4) for a in lab.curve],
                                             "seconds": round(seconds / len(group), 3), "device": name}) + "\n")
                print(f"{set_name} seed {seed} lr {lr:g}: {len(group)} cells in {seconds:.1f} s "
                      f"({len(train)} train images)", flush=True)


def criterion(acc: dict, picks: list[str]) -> dict | None:
    """The search-quality issue's test on one set's fits: {cell: accuracy}."""
    panel = dict(panel_cells())
    random_cells = [c for w, c in panel.items() if w.startswith("random")]
    needed = [RESNET, LARGEST, *random_cells, *picks]
    if any(c not in acc for c in needed):
        return None
    guess = max(acc[RESNET], acc[LARGEST])
    top5 = max(acc[c] for c in picks)
    best_random = max(acc[c] for c in random_cells)
    return {"top1": acc[picks[0]], "resnet": acc[RESNET], "largest": acc[LARGEST],
            "top1_ok": acc[picks[0]] >= guess - 1.0, "top5_best": top5, "panel_best": best_random,
            "top5_ok": top5 >= best_random, "panel_median": statistics.median(acc[c] for c in random_cells),
            "top1_rank": 1 + sum(1 for a in acc.values() if a > acc[picks[0]]), "cells": len(acc)}


def recipe_records(path: Path, epochs: int, augment: str) -> list[dict]:
    """The records of a run's heldout.jsonl fitted with ``epochs`` and ``augment`` (records
    written before runs took --augment are crop-flip); another recipe's, or a smoke run's, are left out."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in records if r["epochs"] == epochs and r.get("augment", AUGMENT) == augment]


def report(args) -> dict:
    records = [r for f in args.runs for r in recipe_records(f / "heldout.jsonl", args.epochs, args.augment)]
    picks = {s["set"]: [p["cell"] for p in s["picks"]] for s in json.loads(EVAL.read_text())["sets"]}
    runs: dict = {}
    for r in records:
        runs.setdefault((r["set"], r["seed"], r["lr"], r["device"]), {})[r["cell"]] = r["accuracy"]
    # The CPU fits of the runs' own recipes, found by their keys.
    keyed = {(s, recipe_key(args.epochs, seed, SETS[s], lr, bf16, args.augment)): (s, seed, lr, "cpu bfloat16" if bf16 else "cpu")
             for s in SETS for seed, lr in RUNS for bf16 in (False, True)}
    cpu: dict = {}
    for r in json.loads(FITS.read_text()):
        if (r["set"], r["recipe"]) in keyed:
            cpu.setdefault(keyed[r["set"], r["recipe"]], {})[r["cell"]] = r["best_val_acc"]
    rows = []
    for (set_name, seed, lr, device), acc in sorted(runs.items()):
        row = {"set": set_name, "seed": seed, "lr": lr, "device": device, "cells": len(acc),
               "mean": round(statistics.mean(acc.values()), 2), "criterion": criterion(acc, picks[set_name])}
        other = runs.get((set_name, seed, 0.1, device)) if lr != 0.1 else None
        # bfloat16 CPU fits first (a GPU fits in bfloat16 too), then float32 ones
        for precision in ("cpu bfloat16", "cpu"):
            same_cpu = cpu.get((set_name, seed, lr, precision), {})
            common = [c for c in acc if c in same_cpu]
            if len(common) >= 5:
                break
        if len(common) >= 5:
            row["vs_cpu_same_recipe"] = {"cpu": precision, "cells": len(common), "spearman": round(spearman(
                [acc[c] for c in common], [same_cpu[c] for c in common]), 3),
                "mean_diff": round(statistics.mean(acc[c] - same_cpu[c] for c in common), 2)}
        if other:
            both = [c for c in acc if c in other]
            if len(both) >= 5:
                row["vs_lr0.1_same_seed"] = {"cells": len(both), "mean_diff": round(statistics.mean(
                    acc[c] - other[c] for c in both), 2), "higher": sum(acc[c] > other[c] for c in both),
                    "spearman": round(spearman([acc[c] for c in both], [other[c] for c in both]), 3)}
        rows.append(row)
    out = {"epochs": args.epochs, "augment": args.augment, "sets": {k: f"{v} images a class" for k, v in SETS.items()},
           "picks": "docs/heldout_eval.json (packaged weights, search seed 0)", "runs": rows}
    if args.report:
        args.report.write_text(json.dumps(out, indent=1) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", type=Path, default=REPO / ".gpu-heldout")
    p.add_argument("--seeds", type=int, nargs="+", default=sorted({s for s, _ in RUNS}))
    r = sub.add_parser("run")
    r.add_argument("--pack", type=Path, default=REPO / ".gpu-heldout")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--chunk", type=int, default=16, help="cells trained together (labels do not depend on it)")
    r.add_argument("--deadline", type=float, default=480.0, help="seconds from start; no group starts that would end after")
    r.add_argument("--smoke", action="store_true", help="2 cells, 80 images, 1 epoch per set and run: checks the script")
    r.add_argument("--epochs", type=int, default=EPOCHS, help="fit's budget; 30 is fit's default (3x the time a fit)")
    r.add_argument("--rates", type=float, nargs="+", default=sorted({lr for _, lr in RUNS}), help="peak rates to fit at")
    r.add_argument("--augment", default=AUGMENT, choices=AUGMENT_POLICIES, help="augmentation of every fit (fit's own default is none)")
    q = sub.add_parser("report")
    q.add_argument("runs", type=Path, nargs="+", help="folders holding a run's heldout.jsonl")
    q.add_argument("--report", type=Path)
    q.add_argument("--epochs", type=int, default=EPOCHS, help="report the runs at this budget")
    q.add_argument("--augment", default=AUGMENT, choices=AUGMENT_POLICIES, help="report the runs with this augmentation")
    args = ap.parse_args()
    if args.what == "pack":
        pack(args.out, args.seeds)
    elif args.what == "run":
        run(args)
    else:
        out = report(args)
        for row in out["runs"]:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
