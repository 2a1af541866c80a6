"""What `fit --top-k K` buys: the winner of successive halving over the search's top K
cells, against fitting only the search's first cell and against fitting all K in full.

For each set: search the set (the packaged weights), then on the held-out evaluation's
subsample (`heldout_fit.py`'s images per class, split and seed)

1. `metad2a fit LIST --run ID --top-k K` with fit's default recipe (timed);
2. the full fit of every candidate the halving stopped: from `docs/heldout_fits.json` where
   the held-out evaluation already fitted that cell with the same recipe and seed, else
   resumed to the full schedule (`metad2a fit --resume -o RUN_DIR/<candidate>`). A resumed
   fit ends with the weights of an uninterrupted one (tests/test_halving.py,
   tests/test_fit.py), so either way this gives each of the K cells' full fits. The winner's
   own fit is compared with the held-out evaluation's fit of the same cell: the same recipe
   on the same data should give the same figure.

Training seconds are summed from the runs' per-epoch times (fit.json); a full fit taken from
docs/heldout_fits.json counts its wall time there. The halving's wall time is given as well.

    python benchmarks/top_k.py --results docs/top_k.json
    python benchmarks/top_k.py --results docs/top_k.json --table   # as docs/fit.md's table
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from heldout_fit import IMAGES, REPO, SETS, load_results, metad2a, recipe_key, subsample_list, trains_in_bf16

from metad2a_cli.meta.db import device_name
from metad2a_cli.training.halving import plan_rungs

K = 5
EPOCHS = 30  # fit's default
HELDOUT_FITS = REPO / "docs" / "heldout_fits.json"


def fitted(run_dir: Path) -> dict:
    record = json.loads((run_dir / "fit.json").read_text())
    history = record["state"]["history"]
    return {
        "epochs": len(history),
        "best_val_acc": max(e["val_acc"] for e in history),
        "train_seconds": round(sum(e["seconds"] for e in history), 1),
    }


def seconds(fits) -> dict:
    """Training seconds when every fit was timed by its epochs, else wall seconds (the fits
    taken from docs/heldout_fits.json are timed only so) with the timed ones' training added."""
    fits = list(fits)
    kind = "train_seconds" if all("train_seconds" in f for f in fits) else "seconds_wall_and_train"
    return {kind: round(sum(f.get("train_seconds", f.get("wall_seconds", 0.0)) for f in fits), 1)}


def measure(name: str, args, tmp: str) -> dict:
    listing = subsample_list(name, SETS[name], args.seed, Path(tmp))
    key = recipe_key(args.epochs, args.seed, SETS[name], bf16=trains_in_bf16("cpu"), augment="none")
    stored = {r["cell"]: r for r in load_results(HELDOUT_FITS) if (r["set"], r["recipe"]) == (name, key)}
    search = metad2a("search", str((IMAGES / name).resolve()), "--top-k", str(args.k), "--seed", str(args.seed))
    run_dir = Path(tmp) / f"{name}-top{args.k}"
    t0 = time.perf_counter()
    halving = metad2a("fit", str(listing), "--run", search["id"], "--top-k", str(args.k), "--epochs", str(args.epochs),
                      "--seed", str(args.seed), "--device", "cpu", "-o", str(run_dir))
    wall = time.perf_counter() - t0
    full = {}
    for cell in halving["cells"]:
        known = None if cell["completed"] else stored.get(cell["cell"])
        if known:
            # its wall time (decoding and start-up included), not the sum of its epochs
            full[cell["rank"]] = {"cell": cell["cell"], "epochs": args.epochs, "best_val_acc": known["best_val_acc"],
                                  "wall_seconds": known["seconds"], "from": "docs/heldout_fits.json"}
            continue
        if not cell["completed"]:
            metad2a("fit", "--resume", "-o", cell["run_dir"], "--device", "cpu")
        full[cell["rank"]] = {"cell": cell["cell"], **fitted(Path(cell["run_dir"])), "from": "this run"}
    winner = halving["winner"]
    best_of_k = max(full.values(), key=lambda f: f["best_val_acc"])
    same_fit = stored.get(winner["cell"])
    return {
        "set": name, "images_per_class": SETS[name], "k": args.k, "epochs": args.epochs, "seed": args.seed,
        "weights": "packaged", "recipe": key,
        "num_train": json.loads((Path(winner["run_dir"]) / "fit.json").read_text())["dataset"]["num_train"],
        "rungs": halving["rungs"],
        "halving": {
            "winner_rank": winner["rank"], "val_acc": winner["best_val_acc"], "epochs": halving["budget_epochs"],
            "train_seconds": round(halving["train_seconds"], 1), "wall_seconds": round(wall, 1),
            "val_acc_per_rung": {c["rank"]: c["val_acc_per_rung"] for c in halving["cells"]},
            "heldout_fit_of_winner": same_fit["best_val_acc"] if same_fit else None,
        },
        "top1": {"val_acc": full[1]["best_val_acc"], "epochs": args.epochs, **seconds([full[1]])},
        "all_k": {
            "best_rank": min((r for r, f in full.items() if f["best_val_acc"] == best_of_k["best_val_acc"])),
            "val_acc": best_of_k["best_val_acc"], "epochs": args.k * args.epochs, **seconds(full.values()),
        },
        "cells": full,
        "device": device_name("cpu"),
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
            secs = f"{m['train_seconds']:.0f}" if "train_seconds" in m else f"{m['seconds_wall_and_train']:.0f} (wall)"
            lines.append(f"| {name} | {strategy} | {epochs} | {rank} | {m['val_acc']:.1f} | {secs} |")
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
    rungs = [asdict(r) for r in plan_rungs(args.epochs, args.k)]  # a new plan is a new measurement
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            done = (name, SETS[name], args.k, args.epochs, args.seed, "packaged", rungs)
            if any((r["set"], r["images_per_class"], r["k"], r["epochs"], r["seed"], r.get("weights"), r["rungs"]) == done
                   for r in results):
                continue
            results.append(measure(name, args, tmp))
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(results[-1], indent=1), flush=True)


if __name__ == "__main__":
    main()
