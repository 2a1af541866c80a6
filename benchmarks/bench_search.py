"""Search speed on this machine (issue: MetaD2A models and `metad2a search`).

Measures, with full-size networks (MetaD2A's sizes, random weights unless --weights):
  - generating 500 unique valid candidate cells from one dataset,
  - scoring all 15,625 cells (cell embeddings cached) and computing those embeddings once,
  - `metad2a search` end to end on a 10-class folder with warm feature cache, as a fresh
    process (Python start-up and imports included), against `python -c pass` as baseline.
Medians over --repeats runs. Writes JSON with --out.

    python benchmarks/bench_search.py --out docs/bench_search.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "images"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_checkpoint(folder: Path) -> Path:
    import torch

    from metad2a_cli.data import encoder
    from metad2a_cli.meta.checkpoint import save_models
    from metad2a_cli.meta.models import CellGenerator, MetaPredictor

    torch.manual_seed(0)
    save_models(folder, CellGenerator(), MetaPredictor(),
                encoder={"identity": encoder.identity(64), "resolution": 64, "feature_dim": 1280}, name="random")
    return folder


def make_folder(root: Path, classes: int = 10, per_class: int = 20) -> Path:
    """10 classes of gtsrb (held-out data) when present, else synthetic images."""
    from PIL import Image

    src = IMAGES / "gtsrb"
    names = sorted(p.name for p in src.iterdir())[:classes] if src.is_dir() else [f"c{i}" for i in range(classes)]
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        files = sorted((src / name).iterdir())[:per_class] if src.is_dir() else []
        for i in range(per_class):
            if files:
                (root / name / files[i].name).write_bytes(files[i].read_bytes())
            else:
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None, help="checkpoint folder (default: random full-size weights)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from metad2a_cli.meta.search import SearchModel
    from metad2a_cli.meta.weights import load_checkpoint_config

    tmp = Path(tempfile.mkdtemp())
    env = dict(os.environ, METAD2A_CACHE=str(tmp / "cache"))
    os.environ["METAD2A_CACHE"] = env["METAD2A_CACHE"]
    ckpt = Path(args.weights) if args.weights else random_checkpoint(tmp / "ckpt")
    config = load_checkpoint_config(ckpt)
    rng = np.random.default_rng(0)
    feats = [rng.random((20, 1280), dtype=np.float32) for _ in range(10)]

    fresh = SearchModel.load(ckpt, config)
    t = time.perf_counter()
    fresh.cell_embeddings()
    embed_once = time.perf_counter() - t
    model = SearchModel.load(ckpt, config)
    x, mask = model.dataset_batch(feats)
    model.cell_embeddings()
    gen = median_time(lambda: model.generate(x, mask, 500, np.random.default_rng(0)), args.repeats)
    codes, drawn = model.generate(x, mask, 500, np.random.default_rng(0))
    score_all = median_time(lambda: model.predict_all(x, mask), args.repeats)
    search_generate = median_time(lambda: model.search(feats, num_candidates=500), args.repeats)
    search_exhaustive = median_time(lambda: model.search(feats, exhaustive=True), args.repeats)

    folder = make_folder(tmp / "images")
    cmd = [str(Path(sys.executable).parent / "metad2a"), "search", str(folder), "--weights", str(ckpt), "--json", "--device", "cpu"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # warms the feature cache
    e2e = median_time(lambda: subprocess.run(cmd, env=env, check=True, capture_output=True), args.repeats)
    baseline = median_time(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), args.repeats)
    torch_import = median_time(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True), 3)

    results = {
        "machine": f"{os.cpu_count()}-core CPU, load {os.getloadavg()[0]:.1f}",
        "weights": "random full-size" if not args.weights else str(args.weights),
        "generate_500_unique_s": gen,
        "generate_samples_drawn": drawn,
        "score_all_15625_s": score_all,
        "cell_embeddings_once_s": embed_once,
        "search_generate_500_s": search_generate,
        "search_exhaustive_s": search_exhaustive,
        "cli_search_warm_cache_s": e2e,
        "python_startup_s": baseline,
        "import_torch_s": torch_import,
    }
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
