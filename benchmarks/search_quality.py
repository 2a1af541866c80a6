"""How weights rank cells, before any fit: the checks of the search-quality issue.

- Calibration: the predictor's exhaustive scores for the CIFAR-10 calibration images,
  against NAS-Bench-201's published CIFAR-10 accuracies of the 200 calibration cells
  (Spearman). Evaluation only: these accuracies never enter training or selection.
- Does the dataset matter: exhaustive rankings of all 15,625 cells for gtsrb,
  fashion_mnist and examples/shapes; the Spearman between each pair and their top-5s,
  with the full predictor and, where the weights have one, the table term alone.

    python benchmarks/search_quality.py --weights /tmp/runs/w_table --out docs/search_quality_table.json
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path

import numpy as np

from metad2a_cli.data.features import encode_folder
from metad2a_cli.meta.search import SearchModel
from metad2a_cli.meta.train import spearman
from metad2a_cli.meta.weights import resolve_weights
from metad2a_cli.nb201.cells import NUM_CELLS, Cell

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
SETS = {
    "gtsrb": DATA / "images" / "gtsrb",
    "fashion_mnist": DATA / "images" / "fashion_mnist",
    "shapes": REPO / "examples" / "shapes",
}


def scores(model: SearchModel, root: Path, terms=None) -> np.ndarray:
    """Every cell's score (indexed by Cell.code) for the images under ``root``."""
    feats = encode_folder(root, 20, 0, "cpu", cache=True)
    x, mask = model.dataset_batch(feats.features)
    saved = model.terms
    model.terms = tuple(terms or saved)
    try:
        return model.predict_all(x, mask)
    finally:
        model.terms = saved


def top(s: np.ndarray, k: int = 5) -> list[int]:
    return [Cell.from_code(int(c)).index for c in np.argsort(-s, kind="stable")[:k]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ckpt = resolve_weights(args.weights)
    model = SearchModel.load(ckpt.path, ckpt.config)
    out: dict = {"weights": str(ckpt.path), "terms": list(model.terms)}

    with open(DATA / "calibration" / "nb201_cifar10_subset200.csv") as fh:
        rows = list(csv.DictReader(fh))
    cal = scores(model, DATA / "calibration" / "cifar10_train500")
    codes = [Cell.parse(r["arch_str"]).code for r in rows]
    out["calibration_spearman_cifar10"] = spearman(cal[codes], [float(r["cifar10_test"]) for r in rows])
    out["calibration_top1_cifar10"] = max(rows, key=lambda r: cal[Cell.parse(r["arch_str"]).code])["cifar10_test"]

    variants = {"full": None}
    if "table" in model.terms and len(model.terms) > 1:
        variants["table term alone"] = ("table",)
    for name, terms in variants.items():
        per_set = {s: scores(model, root, terms) for s, root in SETS.items()}
        out[name] = {
            "top5": {s: top(v) for s, v in per_set.items()},
            "spearman_between_sets": {f"{a}/{b}": spearman(per_set[a], per_set[b]) for a, b in itertools.combinations(SETS, 2)},
        }
    assert len(cal) == NUM_CELLS
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
