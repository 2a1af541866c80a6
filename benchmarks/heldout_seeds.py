"""The held-out evaluation over several seeds: does what one seed says hold at another?

Reads the fits `heldout_fit.py` keeps (docs/heldout_fits.json) for one recipe at each given
seed (a seed draws its own subsample of the set and its own initialisation and batches) and
the search's picks from a report of that script. For each set and seed it gives the issue's
two checks (top-1 >= the better of the ResNet and the largest cell minus 1 point; best of the
top 5 >= best of the random panel), then the same checks on each cell's mean over the seeds
(cells fitted at every seed), how well one seed's fits rank the cells of another (Spearman
over the cells both have), and how the table (published ImageNet16-120 accuracy) ranks the
mean. The picks are read from one report and judged at every seed: the search's picks can
depend on its `--seed`, so check that the report of each seed lists the same cells. Nothing
is trained.

    python benchmarks/heldout_seeds.py --seeds 0 1 --report docs/heldout_eval_default_recipe.json \\
        --out docs/heldout_seeds_default_recipe.json

A seed fitted on a GPU (`gpu_heldout.py`'s records) is read from there instead, whole: with
`--gpu-seeds 2 --gpu-fits docs/heldout_gpu/heldout.jsonl` every cell of seed 2 comes from
the GPU run and none from the CPU, so no seed's cells are ranked across devices.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from gpu_heldout import recipe_records
from heldout_fit import LARGEST, LR, REPO, RESNET, SETS, criterion, load_results, panel_cells, recipe_key
from label_reliability import published_accuracy

from metad2a_cli.meta.table import TABLE_FILE, load_table
from metad2a_cli.meta.train import spearman
from metad2a_cli.nb201.cells import Cell


def rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def checks(acc: dict[str, float], picks: list[str], randoms: list[str]) -> dict:
    random_best = max(acc[c] for c in randoms)
    judged = criterion(acc, picks, random_best)
    ordered = sorted(acc.values(), reverse=True)
    return {
        "cells": len(acc),
        "top1": round(judged["top1"], 2), "resnet": round(acc[RESNET], 2), "largest": round(acc[LARGEST], 2),
        "top1_ok": judged["top1_ok"],
        "top5_best": round(judged["top5_best"], 2), "random_best": round(random_best, 2), "top5_ok": judged["top5_ok"],
        "random_median": round(statistics.median(acc[c] for c in randoms), 2),
        "pick_ranks_among_these_cells": [1 + sum(a > acc[c] for a in ordered) for c in picks],
        "top5_mean": round(statistics.mean(acc[c] for c in picks), 2),
    }


def summarise(fits: list[dict], name: str, seeds: list[int], recipe: dict, picks: list[str], table) -> dict:
    randoms = [c for label, c in panel_cells() if label.startswith("random")]
    wanted = set(picks) | {RESNET, LARGEST} | set(randoms)
    by_seed = {}
    for seed in seeds:
        key = recipe_key(seed=seed, per_class=SETS[name], **recipe)
        by_seed[seed] = {f["cell"]: f["best_val_acc"] for f in fits if f["set"] == name and f["recipe"] == key and f["cell"] in wanted}
    out = {"set": name, "per_seed": {}}
    for seed, acc in by_seed.items():
        missing = wanted - acc.keys()
        out["per_seed"][seed] = checks(acc, picks, randoms) if picks and not missing else {"cells": len(acc), "missing": len(missing)}
    common = sorted(set.intersection(*(set(a) for a in by_seed.values()))) if by_seed else []
    if len(seeds) > 1 and len(common) >= 3:
        out["seed_to_seed_spearman"] = {
            f"{a}-{b}": rounded(spearman([by_seed[a][c] for c in common], [by_seed[b][c] for c in common]))
            for i, a in enumerate(seeds) for b in seeds[i + 1:]
        }
        out["cells_at_every_seed"] = len(common)
        mean = {c: statistics.mean(by_seed[s][c] for s in seeds) for c in common}
        out["table_spearman_of_mean"] = rounded(spearman([table[Cell.parse(c).code] for c in common], [mean[c] for c in common]))
        out["cell_means"] = {c: round(a, 3) for c, a in mean.items()}
        if picks and wanted <= set(common):
            out["mean_over_seeds"] = checks(mean, picks, randoms)
    if picks:
        out["top1_minus_resnet"] = {s: round(a[picks[0]] - a[RESNET], 2) for s, a in by_seed.items() if picks[0] in a and RESNET in a}
    return out


def gpu_fits(path: Path, seeds: list[int], recipe: dict) -> list[dict]:
    """`gpu_heldout.py` records of ``recipe`` at ``seeds``, as heldout_fits.json entries."""
    return [{"set": r["set"], "cell": r["cell"], "recipe": recipe_key(seed=r["seed"], per_class=SETS[r["set"]], **recipe),
             "best_val_acc": r["accuracy"], "device": r["device"]}
            for r in recipe_records(path, recipe["epochs"], recipe["augment"]) if r["seed"] in seeds and r["lr"] == LR]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--report", type=Path, required=True, help="a heldout_fit.py report: the search's picks per set")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--augment", default="none")
    ap.add_argument("--float32", action="store_true", help="the fits in float32 (default: the bfloat16 ones)")
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "heldout_fits.json")
    ap.add_argument("--gpu-fits", type=Path, default=None, help="gpu_heldout.py records (a heldout.jsonl)")
    ap.add_argument("--gpu-seeds", type=int, nargs="*", default=[], help="seeds whose fits all come from --gpu-fits")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.gpu_seeds and args.gpu_fits is None:
        ap.error("--gpu-seeds needs --gpu-fits")
    if args.gpu_seeds and args.float32:
        ap.error("a GPU fits in bfloat16: its seeds cannot stand among float32 fits")
    recipe = {"epochs": args.epochs, "augment": args.augment, "bf16": not args.float32}
    fits = load_results(args.results)
    if args.gpu_seeds:
        gpu_keys = {recipe_key(seed=s, per_class=n, **recipe) for s in args.gpu_seeds for n in SETS.values()}
        fits = [f for f in fits if f["recipe"] not in gpu_keys] + gpu_fits(args.gpu_fits, args.gpu_seeds, recipe)
    table = published_accuracy(load_table(REPO / "databases" / "nb201" / TABLE_FILE))
    sets = []
    for entry in json.loads(args.report.read_text())["sets"]:
        picks = [p["cell"] for p in entry["picks"]]
        sets.append(summarise(fits, entry["set"], args.seeds, recipe, picks, table))
    doc = {"recipe": recipe_key(seed=-1, per_class=0, **recipe).replace("seed-1", "seed*").replace("/0-per-class", ""),
           "seeds": args.seeds, "gpu_seeds": {s: str(args.gpu_fits) for s in args.gpu_seeds}, "picks_from": str(args.report), "sets": sets}
    print(json.dumps(doc, indent=1))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
