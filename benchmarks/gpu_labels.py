"""Database labels on a GPU, in one timed run: speed, schedule calibration, then records.

Reads the folder `benchmarks/gpu_pack.py` wrote (carried to the device machine) and, until
`--deadline` seconds have passed since start:

1. speed: on the 1,000-image CIFAR-10 calibration task (10 classes, 750 train / 250
   validation), seconds per record of the old proxy (format-1 labels, the same run and
   machine) and of `training.labels` at a few numbers of cells together: as an ensemble
   (eager, and with the step in a CUDA graph) and apart on streams; every variant's labels
   are compared with the eager ensemble's, and the fastest that agrees labels the rest;
2. calibration: labels of the calibration cells at several epoch budgets, and their
   Spearman rank correlation with the published 200-epoch CIFAR-10 accuracies (used only
   to choose the budget, never in training);
3. records: the packed database tasks in order, labelled with the database's schedule
   (`gpu_pack.py` packs it) at the chosen budget, appended
   to `OUT/records.jsonl` a task at a time (fsynced), so a run cut short keeps every
   finished task.

    PYTHONPATH=src python benchmarks/gpu_labels.py --pack .gpu --out $OUT --deadline 420
    PYTHONPATH=src python benchmarks/gpu_labels.py --smoke --device cpu   # a tiny run to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import bench_labels
import numpy as np
import torch
from bench_labels import elapsed, load_calibration, log, sync

from metad2a_cli.meta.db import task_seed
from metad2a_cli.meta.train import spearman
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.fitdata import LabeledImages
from metad2a_cli.training.labels import label_cells
from metad2a_cli.training.schedule import LabelSchedule


def calibrate(cells, cifar, train, val, device, results, base, budgets, chunk, how, count, deadline) -> None:
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(cells), size=min(count, len(cells)), replace=False))
    for epochs in budgets:
        schedule = replace(base, epochs=epochs)
        accs, t0 = [], time.perf_counter()
        for i in range(0, len(pick), chunk):
            if elapsed() > deadline:
                break
            group = [cells[j] for j in pick[i : i + chunk]]
            accs += [lab.accuracy for lab in label_cells(group, train, val, schedule, 0, device, **how)]
        n = len(accs)
        if n < 10:
            log(f"calibration at {epochs} epochs: out of time after {n} cells")
            break
        entry = {"epochs": epochs, "cells": n, "spearman_vs_cifar10": spearman(accs, cifar[pick[:n]]),
                 "seconds_per_record": (time.perf_counter() - t0) / n, "labels": accs,
                 "nb201_indices": [cells[j].index for j in pick[:n]]}
        results["calibration"].append(entry)
        log(f"calibration at {epochs} epochs: {n} cells, Spearman {entry['spearman_vs_cifar10']:.3f}, "
            f"{entry['seconds_per_record']:.2f} s/record")


def choose_epochs(results, default: int) -> int:
    done = [e for e in results["calibration"] if e["cells"] >= 50]
    if not done:
        return default
    best = max(e["spearman_vs_cifar10"] for e in done)
    # the cheapest budget within 0.03 of the best ranking
    return min(e["epochs"] for e in done if e["spearman_vs_cifar10"] >= best - 0.03)


def build(pack: Path, out: Path, schedule: LabelSchedule, device, how: dict, deadline: float, results, seed: int,
          smoke: bool = False) -> None:
    tasks = json.loads((pack / "tasks.json").read_text())
    if smoke:  # one task, two cells
        tasks = [{**tasks[0], "cells": tasks[0]["cells"][:2]}]
    sources = {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = out / "records.jsonl"
    done = set()
    if path.is_file():
        done = {(r["task"], r["cell"]) for r in map(json.loads, path.read_text().splitlines())}
    written, t_start = 0, time.perf_counter()
    per_task = []
    with open(path, "a") as fh:
        for task in tasks:
            cells = [c for c in task["cells"] if (task["id"], c) not in done]
            if not cells:
                continue
            # Stop when the typical task would no longer finish in time.
            if elapsed() + (max(per_task) if per_task else 0) > deadline:
                break
            if task["source"] not in sources:
                data = np.load(pack / f"source-{task['source']}.npz")
                sources[task["source"]] = (data["images"], {n: i for i, n in enumerate(data["names"].tolist())})
            images, index = sources[task["source"]]

            def side(files):
                rows = [(index[f], label) for label, cls in enumerate(files) for f in cls if f in index]
                return LabeledImages(images[[r for r, _ in rows]], np.array([y for _, y in rows], dtype=np.int64))

            train, val = side(task["train"]), side(task["val"])
            t0 = time.perf_counter()
            labels = label_cells([Cell.parse(c) for c in cells], train, val, schedule,
                                 task_seed(seed, task["id"]), device, **how)
            sync(device)
            seconds = time.perf_counter() - t0
            per_task.append(seconds)
            for c, lab in zip(cells, labels):
                fh.write(json.dumps({"task": task["id"], "cell": c, "accuracy": round(lab.accuracy, 4),
                                     "seconds": round(seconds / len(cells), 3), "best_epoch": lab.best_epoch,
                                     "curve": [round(a, 4) for a in lab.curve], "device": name}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            written += len(cells)
            log(f"{task['id']} ({task['source']}, {len(train)} train images): {len(cells)} records in {seconds:.1f} s")
    minutes = (time.perf_counter() - t_start) / 60
    results["build"] = {"epochs": schedule.epochs, "records": written, "tasks": len(per_task), "minutes": minutes,
                        "records_per_minute": written / max(minutes, 1e-9), "device": name}
    log("build:", results["build"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=Path(".gpu"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds from start; the run stops before")
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--calibration-cells", type=int, default=100)
    ap.add_argument("--calibration-share", type=float, default=0.45, help="of the deadline, at most")
    ap.add_argument("--epochs", type=int, default=None, help="skip calibration and build with this budget")
    ap.add_argument("--seed", type=int, default=0, help="the database's seed (task seeds derive from it)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    ap.add_argument("--speed-only", action="store_true", help="(internal) the speed phase alone")
    ap.add_argument("--speed-cells", type=int, nargs="+", default=[10, 32], help="cells trained together, timed")
    ap.add_argument("--speed-epochs", type=int, default=2)
    ap.add_argument("--no-old-proxy", action="store_true", help="skip timing the format-1 proxy")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "speed": {"labels": []}, "calibration": []}

    def save():
        (args.out / "gpu_labels.json").write_text(json.dumps(results, indent=1) + "\n")

    train, val, cells, cifar = load_calibration(args.pack)
    # The database's schedule (augmentation, rate, network); only the epochs may differ.
    base = LabelSchedule.from_dict(json.loads((args.pack / "schedule.json").read_text()))
    log(f"{results['device']}, torch {torch.__version__}; calibration task {len(train)}/{len(val)}")
    if args.smoke:
        train = LabeledImages(train.images[:60], train.labels[:60])
        val = LabeledImages(val.images[:20], val.labels[:20])
    # The speed phase runs in a child process: a CUDA graph that fails to capture can leave
    # the CUDA context unusable, and the records must not pay for it.
    if args.speed_only:
        bench_labels.run(args.pack, device, results, [2] if args.smoke else args.speed_cells, 1 if args.smoke else args.speed_epochs,
                         save, args.smoke, old_proxy=not args.no_old_proxy)
        return
    try:
        child_ok = subprocess.run(
            [sys.executable, __file__, "--speed-only", "--pack", str(args.pack), "--out", str(args.out),
             "--device", args.device, "--speed-epochs", str(args.speed_epochs), "--speed-cells",
             *map(str, args.speed_cells), *(["--smoke"] if args.smoke else []), *(["--no-old-proxy"] if args.no_old_proxy else [])],
            timeout=max(60.0, 0.25 * args.deadline),
        ).returncode == 0
    except subprocess.TimeoutExpired:
        log("speed phase ran out of time")
        child_ok = False
    try:
        results.update({k: v for k, v in json.loads((args.out / "gpu_labels.json").read_text()).items() if k == "speed"})
    except (OSError, ValueError):
        pass
    # The fastest variant that ran and gave the eager ensemble's labels; the eager ensemble if
    # none did. Kernels that round differently drift apart over a fit by a few points at most;
    # a broken variant is off by far more.
    def agrees(e) -> bool:
        reference = e["ensemble"] and not e["cuda_graph"]
        return reference or e.get("max_abs_diff_vs_eager", float("inf")) <= 5.0

    timed_ok = [e for e in results["speed"]["labels"] if "seconds_per_record" in e and agrees(e)] if child_ok else []
    best = min(timed_ok, key=lambda e: e["seconds_per_record"], default={"cells": 10, "ensemble": True, "cuda_graph": False})
    how = {"ensemble": best["ensemble"], "cuda_graph": best["cuda_graph"]}
    results["labelling"] = {**how, "cells": best["cells"]}
    save()
    if args.epochs is None:
        budgets = [1, 2] if args.smoke else args.budgets
        chunk = best["cells"]  # labels do not depend on how many cells train together
        try:
            calibrate(cells, cifar, train, val, device, results, base, budgets, chunk, how,
                      12 if args.smoke else args.calibration_cells, args.calibration_share * args.deadline)
        except Exception as err:
            results["calibration_error"] = repr(err)
            log("calibration failed:", repr(err))
        epochs = choose_epochs(results, default=20) if not args.smoke else 1
    else:
        epochs = args.epochs
    results["chosen_epochs"] = epochs
    schedule = replace(base, epochs=epochs)
    results["schedule"] = schedule.to_dict()  # gpu_import holds it to the database's
    log(f"building records with {results['schedule']}")
    save()
    build(args.pack, args.out, schedule, device, how, args.deadline, results, args.seed, args.smoke)
    save()


if __name__ == "__main__":
    sys.exit(main())
