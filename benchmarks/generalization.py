"""Does meta-learning transfer to datasets it never saw? (issue: train --db nb201)

For each held-out set (gtsrb, fashion_mnist; never in a database) this draws one task the
way `db build` does (classes, train/validation images), then trains with the database's own
proxy schedule:
  - 30 random cells, the search's top 20 (generated candidates), the NB201 ResNet-like cell,
  - and the best cell of 50 random cells by NASWOT (a zero-cost score a user could use),
and reports
  - the predictor's Spearman correlation with the proxy accuracies of all those cells,
  - search top-1 and best-of-top-5 proxy accuracy against the ResNet cell, the median and
    the best of the random cells, and the NASWOT pick.

    python benchmarks/generalization.py --weights weights/nb201 --out docs/generalization.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from metad2a_cli.data.features import encode_folder
from metad2a_cli.data.images import read_image_folder
from metad2a_cli.meta.db import (
    BuildSettings,
    Database,
    draw_tasks,
    load_task_images,
    normalise_task,
)
from metad2a_cli.meta.search import SearchModel
from metad2a_cli.meta.train import spearman
from metad2a_cli.meta.weights import load_checkpoint_config
from metad2a_cli.nb201.cells import RESNET_CELL, Cell
from metad2a_cli.nb201.network import Network, NetworkConfig
from metad2a_cli.training.proxy import ProxySchedule, train_cells

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"


def naswot(cell: Cell, x: torch.Tensor, num_classes: int, schedule: ProxySchedule) -> float:
    """Mellor et al.'s score: log|K| of the ReLU activation-pattern kernel on one batch."""
    torch.manual_seed(0)
    net = Network(cell, NetworkConfig(num_classes, schedule.channels, schedule.cells_per_stage, 3,
                                      (schedule.input_size, schedule.input_size)))
    codes = []

    def hook(module, inputs, output):
        codes.append((inputs[0] > 0).flatten(1).float())

    for m in net.modules():
        if isinstance(m, torch.nn.ReLU):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(x)
    if not codes:
        return float("-inf")
    c = torch.cat(codes, 1)
    k = c @ c.T + (1 - c) @ (1 - c).T
    return float(torch.slogdet(k.double())[1])


def evaluate(name: str, model: SearchModel, settings: BuildSettings, resolution: int, seed: int) -> dict:
    root = IMAGES / name
    folder = read_image_folder(root)
    s = BuildSettings(**{**settings.__dict__, "num_tasks": 1, "seed": seed})
    task = draw_tasks({name: folder}, s)[0]
    # The dataset as a search sees it: 20 images per class of the task's classes.
    feats = encode_folder(root, 20, seed, "cpu", cache=True, resolution=resolution)
    index = {c: i for i, c in enumerate(feats.classes)}
    features = [feats.features[index[c]] for c in task.classes]

    result = model.search(features, top_k=20, num_candidates=500, seed=seed)
    top = [Cell.parse(r.cell) for r in result.ranking]
    rng = np.random.default_rng(seed)
    random_cells = [Cell.from_code(int(c)) for c in rng.choice(15625, 50, replace=False)]
    schedule = s.schedule
    train, val = normalise_task(load_task_images(root, task.train, schedule.input_size),
                            load_task_images(root, task.val, schedule.input_size))
    nw = [naswot(c, train[0][:64], len(task.classes), schedule) for c in random_cells]
    naswot_pick = random_cells[int(np.argmax(nw))]
    resnet = Cell.parse(RESNET_CELL)
    cells = list(dict.fromkeys(top + random_cells[:30] + [resnet, naswot_pick]))
    t0 = time.perf_counter()
    acc = dict(zip(cells, train_cells(cells, train, val, schedule, seed=seed)))
    train_s = time.perf_counter() - t0
    x, mask = model.dataset_batch(features)
    predicted = model.predict_all(x, mask)
    pred = np.array([predicted[c.code] for c in cells])
    true = np.array([acc[c] for c in cells])
    rand = np.array([acc[c] for c in random_cells[:30]])
    return {
        "classes": len(task.classes),
        "train_images": len(train[1]),
        "val_images": len(val[1]),
        "cells_trained": len(cells),
        "predictor_spearman": spearman(pred, true),
        "predictor_spearman_random_cells": spearman(np.array([predicted[c.code] for c in random_cells[:30]]), rand),
        "search_top1": acc[top[0]],
        "search_best_of_top5": max(acc[c] for c in top[:5]),
        "search_top1_cell": str(top[0]),
        "resnet_cell": acc[resnet],
        "random_median": float(np.median(rand)),
        "random_best": float(rand.max()),
        "naswot_pick": acc[naswot_pick],
        "naswot_pick_cell": str(naswot_pick),
        "proxy_train_seconds": train_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--db", default=None, help="database whose proxy schedule and task shape to use")
    ap.add_argument("--sets", default="gtsrb,fashion_mnist")
    ap.add_argument("--seeds", default="0", help="comma-separated; one task per seed and set")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    config = load_checkpoint_config(args.weights)
    model = SearchModel.load(Path(args.weights), config)
    settings = BuildSettings.from_dict(Database(Path(args.db)).manifest["settings"]) if args.db else BuildSettings()
    resolution = int(config["encoder"]["resolution"])
    results = {}
    for name in args.sets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            r = evaluate(name, model, settings, resolution, seed)
            results[f"{name}/seed{seed}"] = r
            print(name, seed, json.dumps(r), flush=True)
    out = {"machine": f"{os.cpu_count()}-core CPU", "weights": args.weights, "schedule": settings.schedule.to_dict(),
           "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
