"""Search, then fit, on the held-out image sets: does the searched cell train well?

For each set: `metad2a search ROOT` with the default weights, then `metad2a fit` of the
search's rank-1 cell and of NAS-Bench-201's ResNet-like cell with the same settings (the
default network and recipe, fewer epochs). Reports each fit's best validation accuracy
and wall time. Runs the installed CLI as a user would.

    python benchmarks/fit_heldout.py --out docs/fit_heldout.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "images"
RESNET = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"
SETS = {"fashion_mnist": 15, "gtsrb": 10}  # name -> epochs


def metad2a(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "metad2a_cli", *args, "--json"], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            root = (IMAGES / name).resolve()
            search = metad2a("search", str(root), "--seed", str(args.seed))
            picked = search["ranking"][0]["cell"]
            for label, cell in (("search rank 1", picked), ("ResNet cell", RESNET)):
                t0 = time.perf_counter()
                summary = metad2a("fit", str(root), "--arch", cell, "--epochs", str(SETS[name]),
                                  "--seed", str(args.seed), "--device", "cpu", "-o", f"{tmp}/{name}-{len(results)}")
                entry = {
                    "set": name, "which": label, "cell": cell, "epochs": SETS[name],
                    "best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"],
                    "num_train": summary["num_train"], "num_val": summary["num_val"],
                    "classes": len(summary["classes"]), "seconds": time.perf_counter() - t0,
                }
                results.append(entry)
                print(json.dumps(entry), flush=True)
                if args.out:
                    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
