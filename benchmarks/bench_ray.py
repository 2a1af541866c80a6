"""Records per minute of `db build --ray` on this machine against the one-process build,
and Ray's own cost per work unit.

Two synthetic sources (noise images around a colour per class, written to a temporary
folder) and a small label schedule, so that a run takes seconds; the database's features
are encoded once beforehand, and each timed run labels every task of a copy of that
folder. The time is the labeling phase as `db build` reports it to its progress bar.
Medians of --repeats runs of:

- the one-process build with torch's default threads, and with one thread;
- `--ray` on a local Ray instance of 1 and of 2 CPUs (a worker each, one thread each);
  Ray's start and its workers' first import of torch are left out by a warm-up run and
  reported apart;
- an empty work unit: a Ray task that takes a unit and returns no records, one at a time
  (the round trip a unit pays) and 200 in flight (Ray's throughput of units).

Each run's records are compared with the one-process, one-thread build's, and the most
that differed in a repeat is reported: on the CPU a label depends on torch's thread count,
and a Ray worker of one CPU runs one thread.

    PYTHONPATH=src python benchmarks/bench_ray.py --out docs/bench_ray_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os

# As the metad2a command does: idle OpenMP threads sleep instead of spinning (set before
# torch loads; Ray's local workers inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from metad2a_cli.meta.db import BuildSettings, Database, WorkUnit, build
from metad2a_cli.meta.distributed import ray_runner
from metad2a_cli.training.schedule import LabelSchedule


def make_source(root: Path, name: str, classes: int, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / name / f"class_{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 255, 3)
        for i in range(per_class):
            px = np.clip(colour + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(folder / f"{i}.png")
    return root / name


def labels(db_path: Path) -> dict:
    return {(r.task, r.cell): (r.accuracy, r.curve) for r in Database(db_path).records()}


def unlike(got: dict, reference: dict) -> int:
    """Records whose accuracy or curve differ from the reference's (or that it lacks)."""
    return sum(got.get(key) != value for key, value in reference.items())


def timed_build(template: Path, sources, settings: BuildSettings, runner=None) -> tuple[float, dict]:
    """Seconds of labeling every task of a fresh copy of ``template``, and the records."""
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "db"
        shutil.copytree(template, db_path)
        build(db_path, sources, settings, runner=runner, progress=lambda done, todo, s: seconds.append(s))
        return seconds[-1], labels(db_path)


def empty_unit(unit: WorkUnit, settings: BuildSettings) -> list:
    return []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--cells", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    schedule = LabelSchedule(epochs=args.epochs, channels=8, cells_per_stage=1, input_size=16)
    settings = BuildSettings(num_tasks=args.tasks, min_classes=5, max_classes=8, images_per_class=40,
                             features_per_class=4, cells_per_task=args.cells, seed=0, schedule=schedule)
    records = args.tasks * args.cells
    out: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs",
        "ray": ray.__version__, "torch": torch.__version__,
        "workload": {"tasks": args.tasks, "cells_per_task": args.cells, "records": records,
                     "images_per_class": 40, "schedule": schedule.to_dict()},
        "repeats": args.repeats, "load_before": os.getloadavg()[0],
    }
    runs: dict[str, dict] = {}

    def record(name: str, seconds: list[float], differing: int) -> None:
        s = statistics.median(seconds)
        runs[name] = {"seconds": [round(x, 2) for x in seconds], "median_seconds": round(s, 2),
                      "records_per_min": round(60 * records / s, 1), "records_unlike_one_thread": differing}
        print(name, runs[name], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["METAD2A_CACHE"] = str(root / "cache")
        sources = [make_source(root, "alpha", 8, 40, 1), make_source(root, "beta", 10, 40, 2)]
        template = root / "template"
        build(template, sources, settings, max_tasks=0)  # tasks and features, no labels

        threads = torch.get_num_threads()
        reference = None  # the one-thread build's records, which a Ray worker's must equal
        for name, n in (("one_process_1_thread", 1), (f"one_process_{threads}_threads", threads)):
            torch.set_num_threads(n)
            seconds, differing = [], 0
            for _ in range(args.repeats):
                s, got = timed_build(template, sources, settings)
                reference = reference or got
                seconds.append(s)
                differing = max(differing, unlike(got, reference))
            record(name, seconds, differing)
        torch.set_num_threads(threads)

        for cpus in (1, 2):
            t = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False)
            started = time.perf_counter() - t
            warm, _ = timed_build(template, sources, settings, ray_runner())
            seconds, differing = [], 0
            for _ in range(args.repeats):
                s, got = timed_build(template, sources, settings, ray_runner())
                seconds.append(s)
                differing = max(differing, unlike(got, reference))
            record(f"ray_{cpus}_workers", seconds, differing)
            runs[f"ray_{cpus}_workers"].update(ray_init_seconds=round(started, 2), first_run_seconds=round(warm, 2))
            if cpus == 2:
                unit = WorkUnit(Database(template).tasks()[0], sources[0], tuple(Database(template).tasks()[0].cells))
                task = ray.remote(empty_unit).options(num_cpus=1)
                ray.get(task.remote(unit, settings))
                trips = []
                for _ in range(50):
                    t = time.perf_counter()
                    ray.get(task.remote(unit, settings))
                    trips.append(time.perf_counter() - t)
                t = time.perf_counter()
                ray.get([task.remote(unit, settings) for _ in range(200)])
                out["empty_unit"] = {"round_trip_ms_median": round(1000 * statistics.median(trips), 2),
                                     "in_flight_ms_per_unit": round(1000 * (time.perf_counter() - t) / 200, 2)}
                print("empty unit", out["empty_unit"], flush=True)
            ray.shutdown()

    out["runs"] = runs
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
