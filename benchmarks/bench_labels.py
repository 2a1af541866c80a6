"""Speed of database labels: records per minute and training FLOP/s, against the old proxy.

On the 1,000-image CIFAR-10 calibration task (10 classes, 750 train / 250 validation, from
the folder `benchmarks/gpu_pack.py` writes), in one run on one machine:

- the proxy that labelled format-1 databases (C=8, N=1, 16 px, 3 epochs, batch 64), whose
  code the pack carries from this repository's history;
- `training.labels` (the full network, fit's recipe) for a few numbers of cells trained
  together: as one grouped-convolution ensemble with eager steps and, on a GPU, with the
  training step in a CUDA graph; and apart, each cell its own network taking turns a step
  at a time (on a GPU each on its own stream, its step in a CUDA graph). Every variant's
  labels are compared with the eager ensemble's.

Training FLOP/s counts 6 x the forward multiply-adds of every image seen (NB201's FLOPs).

    PYTHONPATH=src python benchmarks/bench_labels.py --device cuda --out docs/
    PYTHONPATH=src python benchmarks/bench_labels.py --device cpu --cells 1 2 --epochs 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metad2a_cli.nb201.cells import Cell
from metad2a_cli.nb201.cost import cell_cost
from metad2a_cli.training.fitdata import LabeledImages
from metad2a_cli.training.labels import label_cells
from metad2a_cli.training.schedule import LabelSchedule

START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def log(*parts) -> None:
    print(f"[{elapsed():6.1f}s]", *parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops(cells: list[Cell], classes: int, images: int, schedule: LabelSchedule) -> float:
    """Forward multiply-adds x 2 (FLOPs) x 3 (forward and backward) for every image seen."""
    macs = sum(cell_cost(c, classes, schedule.channels, schedule.cells_per_stage, 3, (schedule.input_size,) * 2).flops for c in cells)
    return 6.0 * macs * images


def load_calibration(pack: Path):
    data = np.load(pack / "calibration.npz")
    train = LabeledImages(data["train_x"], data["train_y"])
    val = LabeledImages(data["val_x"], data["val_y"])
    cells = [Cell.parse(str(s)) for s in data["cells"]]
    return train, val, cells, data["cifar10"].astype(float)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def old_proxy_speed(pack: Path, cells, train, val, device, results) -> None:
    """The format-1 proxy's default schedule (C=8, N=1, 16 px, 3 epochs, batch 64)."""
    spec = importlib.util.spec_from_file_location("old_proxy", pack / "old_proxy.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_proxy"] = old  # dataclasses look their module up there
    spec.loader.exec_module(old)
    schedule = old.ProxySchedule()
    small = torch.nn.functional.interpolate(torch.from_numpy(train.images).float() / 255, size=schedule.input_size, mode="bilinear")
    small_val = torch.nn.functional.interpolate(torch.from_numpy(val.images).float() / 255, size=schedule.input_size, mode="bilinear")
    mean, std = small.mean((0, 2, 3), keepdim=True), small.std((0, 2, 3), keepdim=True)
    tr = ((small - mean) / std, torch.from_numpy(train.labels))
    va = ((small_val - mean) / std, torch.from_numpy(val.labels))
    chunk = 16 if device.type == "cuda" else 1
    group = cells[:chunk]
    old.train_cells(group[:2], tr, va, schedule, seed=0, device=device)  # warm-up
    _, seconds = timed(lambda: old.train_cells(group, tr, va, schedule, seed=0, device=device), device)
    results["speed"]["old_proxy"] = {"cells": len(group), "seconds_per_record": seconds / len(group),
                                     "records_per_minute": 60 * len(group) / seconds, "schedule": schedule.to_dict()}
    log("old proxy:", results["speed"]["old_proxy"])


def new_speed(cells, train, val, device, results, sizes, epochs, save) -> None:
    schedule = LabelSchedule(epochs=epochs)
    entries = results["speed"]["labels"]
    # (ensemble, cuda_graph); the eager ensemble first: the others are checked against it
    variants = [(True, False), (True, True), (False, True)] if device.type == "cuda" else [(True, False), (False, False)]
    for k in sizes:
        group = cells[:k]
        for ensemble, graph in variants:
            try:
                labels, seconds = timed(lambda: label_cells(group, train, val, schedule, 0, device, cuda_graph=graph,
                                                            ensemble=ensemble), device)
            except Exception as err:  # a variant that fails is reported, not fatal
                entries.append({"cells": k, "ensemble": ensemble, "cuda_graph": graph, "error": repr(err)})
                save()
                log(f"labels, {k} cells, ensemble={ensemble}, graph={graph}: failed: {err!r}")
                continue
            flops = training_flops(group, 10, len(train) * epochs, schedule)
            entry = {"cells": k, "ensemble": ensemble, "cuda_graph": graph, "epochs": epochs, "seconds": seconds,
                     "seconds_per_record": seconds / k, "records_per_minute_at_20_epochs": 60 * k / seconds * epochs / 20,
                     "training_tflops": flops / seconds / 1e12, "curves": [lab.curve for lab in labels]}
            entries.append(entry)
            save()
            log("labels:", {key: v for key, v in entry.items() if key != "curves"})
    eager = {e["cells"]: e for e in entries if e["ensemble"] and not e["cuda_graph"] and "curves" in e}
    for e in entries:
        if "curves" in e and e["cells"] in eager and e is not eager[e["cells"]]:
            diff = np.abs(np.array(e["curves"]) - np.array(eager[e["cells"]]["curves"]))
            e["max_abs_diff_vs_eager"] = float(diff.max())
            save()
            log(f"ensemble={e['ensemble']}, graph={e['cuda_graph']} vs the eager ensemble, {e['cells']} cells: "
                f"largest accuracy difference {diff.max():.2f} points")


def run(pack: Path, device: torch.device, results: dict, sizes, epochs: int, save, smoke: bool = False,
        old_proxy: bool = True) -> None:
    train, val, cells, _ = load_calibration(pack)
    if smoke:
        train = LabeledImages(train.images[:60], train.labels[:60])
        val = LabeledImages(val.images[:20], val.labels[:20])
    try:
        if old_proxy:
            old_proxy_speed(pack, cells, train, val, device, results)
    except Exception as err:
        results["speed"]["old_proxy_error"] = repr(err)
        log("old proxy failed:", repr(err))
    save()
    new_speed(cells, train, val, device, results, sizes, epochs, save)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=Path(".gpu"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cells", type=int, nargs="+", default=[10, 32])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "speed": {"labels": []}}
    path = args.out / f"bench_labels_{device.type}.json"

    def save():
        path.write_text(json.dumps(results, indent=1) + "\n")

    run(args.pack, device, results, args.cells, args.epochs, save)


if __name__ == "__main__":
    sys.exit(main())
