"""What `fit --top-k K` buys: the winner of successive halving over the search's top K
cells, against fitting only the search's first cell and against fitting all K in full.

For each set: search the set (the packaged weights), then on a fixed subsample

1. `metad2a fit LIST --run ID --top-k K` (timed);
2. every candidate the halving stopped is resumed to the full schedule
   (`metad2a fit --resume -o RUN_DIR/<candidate>`). A resumed fit ends with the weights of
   an uninterrupted one (tests/test_halving.py, tests/test_fit.py), so this gives each of
   the K cells' full fits without training their first epochs twice.

Training seconds are summed from the runs' per-epoch times (fit.json), so the three
strategies are timed by the same clock; the halving's wall time is given as well.

    python benchmarks/top_k.py --results docs/top_k.json
    python benchmarks/top_k.py --results docs/top_k.json --table   # as docs/fit.md's table
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from heldout_fit import IMAGES, REPO, metad2a, subsample_list

SETS = {"fashion_mnist": 50, "gtsrb": 20}  # images per class: small, the CPU is shared and slow
K = 4
EPOCHS = 10


def fitted(run_dir: Path) -> dict:
    record = json.loads((run_dir / "fit.json").read_text())
    history = record["state"]["history"]
    return {
        "epochs": len(history),
        "best_val_acc": max(e["val_acc"] for e in history),
        "train_seconds": round(sum(e["seconds"] for e in history), 1),
    }


def measure(name: str, args, tmp: str) -> dict:
    listing = subsample_list(name, SETS[name], args.seed, Path(tmp))
    search = metad2a("search", str((IMAGES / name).resolve()), "--top-k", str(args.k), "--seed", str(args.seed))
    run_dir = Path(tmp) / f"{name}-top{args.k}"
    t0 = time.perf_counter()
    halving = metad2a("fit", str(listing), "--run", search["id"], "--top-k", str(args.k), "--epochs", str(args.epochs),
                      "--seed", str(args.seed), "--device", "cpu", "-o", str(run_dir))
    wall = time.perf_counter() - t0
    for cell in halving["cells"]:
        if not cell["completed"]:
            metad2a("fit", "--resume", "-o", cell["run_dir"], "--device", "cpu")
    full = {c["rank"]: {"cell": c["cell"], **fitted(Path(c["run_dir"]))} for c in halving["cells"]}
    winner = halving["winner"]
    best_of_k = max(full.values(), key=lambda f: f["best_val_acc"])
    return {
        "set": name, "images_per_class": SETS[name], "k": args.k, "epochs": args.epochs, "seed": args.seed,
        "num_train": json.loads((Path(winner["run_dir"]) / "fit.json").read_text())["dataset"]["num_train"],
        "rungs": halving["rungs"],
        "halving": {
            "winner_rank": winner["rank"], "val_acc": winner["best_val_acc"], "epochs": halving["budget_epochs"],
            "train_seconds": round(halving["train_seconds"], 1), "wall_seconds": round(wall, 1),
            "val_acc_per_rung": {c["rank"]: c["val_acc_per_rung"] for c in halving["cells"]},
        },
        "top1": {"val_acc": full[1]["best_val_acc"], "epochs": args.epochs, "train_seconds": full[1]["train_seconds"]},
        "all_k": {
            "best_rank": min((r for r, f in full.items() if f["best_val_acc"] == best_of_k["best_val_acc"])),
            "val_acc": best_of_k["best_val_acc"], "epochs": args.k * args.epochs,
            "train_seconds": round(sum(f["train_seconds"] for f in full.values()), 1),
        },
        "cells": full,
        "device": "cpu (2 cores, shared with other jobs)",
    }


def table(results: list[dict]) -> str:
    lines = ["| set (images per class) | strategy | epochs trained | cell kept (search rank) | its best val. acc. % | training s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        name = f"{r['set']} ({r['images_per_class']})"
        h, top1, all_k = r["halving"], r["top1"], r["all_k"]
        rows = [
            ("top-1 only", top1["epochs"], 1, top1),
            (f"`--top-k {r['k']}` (halving)", h["epochs"], h["winner_rank"], h),
            (f"all {r['k']} in full, best kept", all_k["epochs"], all_k["best_rank"], all_k),
        ]
        for strategy, epochs, rank, m in rows:
            lines.append(f"| {name} | {strategy} | {epochs} | {rank} | {m['val_acc']:.1f} | {m['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "top_k.json")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.results.read_text())))
        return
    results = json.loads(args.results.read_text()) if args.results.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            if any(r["set"] == name and r["k"] == args.k and r["epochs"] == args.epochs for r in results):
                continue
            results.append(measure(name, args, tmp))
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(results[-1], indent=1), flush=True)


if __name__ == "__main__":
    main()
