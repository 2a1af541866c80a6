"""Which `--augment` policy should `fit` use by default? Each policy, fitted on subsets of
three sets whose images mean different things under a mirror (traffic signs, clothes,
digits), with the ResNet cell, a fixed epoch count and seed.

    python benchmarks/augment_policies.py --results docs/augment_policies.json
    python benchmarks/augment_policies.py --speed     # the policies' cost per batch, no fits
    python benchmarks/augment_policies.py --table     # the results file as docs/fit.md's table

Every fit's result is kept in the results file, keyed by (set, policy, recipe), so an
interrupted measurement goes on where it stopped. Runs the CLI in subprocesses, as a user
would, one fit at a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from heldout_fit import REPO, RESNET, metad2a, subsample_list

# set -> images per class (train + validation); small, so that a fit takes minutes on a
# 2-core CPU shared with other jobs (about 30 images/s there)
SETS = {"sklearn_digits": 100, "fashion_mnist": 100, "gtsrb": 30}
POLICIES = ("none", "crop", "crop-flip", "trivialaugment")
EPOCHS = 10


def recipe_key(epochs: int, seed: int, per_class: int) -> str:
    return f"resnet/epochs{epochs}/seed{seed}/{per_class}-per-class"


def fit(name: str, policy: str, args, listing: Path, tmp: str) -> dict:
    t0 = time.perf_counter()
    summary = metad2a(
        "fit", str(listing), "--arch", RESNET, "--augment", policy, "--epochs", str(args.epochs),
        "--seed", str(args.seed), "--device", "cpu", "-o", f"{tmp}/{name}-{policy}",
    )
    record = json.loads(Path(summary["files"]["fit.json"]).read_text())
    rates = sorted(e["images_per_s"] for e in record["state"]["history"])
    return {
        "set": name, "policy": policy, "recipe": recipe_key(args.epochs, args.seed, SETS[name]),
        "best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"],
        "curve": [round(e["val_acc"], 2) for e in record["state"]["history"]],
        "num_train": summary["num_train"], "num_val": summary["num_val"],
        "median_images_per_s": round(rates[len(rates) // 2], 1), "seconds": round(time.perf_counter() - t0, 1),
        "device": f"cpu ({platform.machine()}, shared with other jobs)",
    }


def speed(batch: int = 256, size: int = 32, repeats: int = 20) -> dict:
    """Milliseconds to augment one uint8 batch on the CPU: each policy batched, and
    torchvision's TrivialAugmentWide called image by image (what per-image ops would cost
    without batching)."""
    import torch
    from torchvision.transforms.v2 import TrivialAugmentWide

    from metad2a_cli.training.augment import make_policy

    torch.set_num_threads(1)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = {"batch": batch, "size": size, "threads": 1}

    def timed(fn) -> float:  # the fastest of the repeats: the CPU is shared with other jobs
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(1000 * min(times), 2)

    for name in POLICIES:
        policy = make_policy(name, size)
        params = policy.draw(g, batch)
        out[f"{name}_ms"] = timed(lambda p=policy, a=params: p.apply(x, *a))
        out[f"{name}_draw_ms"] = timed(lambda p=policy: p.draw(g, batch))
    ta = TrivialAugmentWide()
    out["torchvision_per_image_ms"] = timed(lambda: torch.stack([ta(im) for im in x]))
    return out


def table(fits: list[dict]) -> str:
    """Best validation accuracy of each (set, policy), and each policy's mean over the sets."""
    sets = list(dict.fromkeys(r["set"] for r in fits))
    acc = {(r["set"], r["policy"]): r["best_val_acc"] for r in fits}
    lines = ["| set (images per class, epochs) | " + " | ".join(f"`{p}`" for p in POLICIES) + " |",
             "|---" * (len(POLICIES) + 1) + "|"]
    for name in sets:
        recipe = next(r["recipe"] for r in fits if r["set"] == name).split("/")
        cells = [f"{acc[name, p]:.1f}" if (name, p) in acc else "" for p in POLICIES]
        lines.append(f"| {name} ({recipe[3].split('-')[0]}, {recipe[1][len('epochs'):]}) | " + " | ".join(cells) + " |")
    means = [sum(acc[n, p] for n in sets) / len(sets) if all((n, p) in acc for n in sets) else None for p in POLICIES]
    lines.append("| mean | " + " | ".join(f"{m:.1f}" if m is not None else "" for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "augment_policies.json")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.results.read_text())["fits"]))
        return
    if args.speed:
        print(json.dumps(speed(), indent=1))
        return
    data = json.loads(args.results.read_text()) if args.results.is_file() else {"fits": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            listing = subsample_list(name, SETS[name], args.seed, Path(tmp))
            for policy in args.policies:
                key = (name, policy, recipe_key(args.epochs, args.seed, SETS[name]))
                if any((r["set"], r["policy"], r["recipe"]) == key for r in data["fits"]):
                    continue
                data["fits"].append(fit(name, policy, args, listing, tmp))
                args.results.write_text(json.dumps(data, indent=1) + "\n")
                print(json.dumps(data["fits"][-1]), flush=True)


if __name__ == "__main__":
    main()
