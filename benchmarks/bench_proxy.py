"""Records per minute of the proxy trainer, one cell at a time vs several together.

A synthetic task shaped like a database task (10 classes, 75 training and 25 validation
images per class, 16 px) and the database's proxy schedule; 8 cells trained one at a time
(chunk 1) and together (chunk 8). Medians of --repeats runs.

    python benchmarks/bench_proxy.py --device cpu --out docs/bench_proxy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.proxy import ProxySchedule, train_cells


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(100)
    x = torch.randn(1000, 3, 16, 16, generator=g) + y[:, None, None, None] * 0.05
    is_val = torch.arange(1000) % 4 == 0
    train, val = (x[~is_val], y[~is_val]), (x[is_val], y[is_val])
    schedule = ProxySchedule()
    cells = [Cell.from_index(i) for i in range(args.cells)]
    results = {}
    for chunk in sorted({1, args.cells}):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for i in range(0, len(cells), chunk):
                train_cells(cells[i : i + chunk], train, val, schedule, device=args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        seconds = statistics.median(times)
        results[f"chunk{chunk}"] = {"seconds": seconds, "records_per_min": 60 * len(cells) / seconds}
    results["speedup_together"] = results[f"chunk{args.cells}"]["records_per_min"] / results["chunk1"]["records_per_min"]
    out = {"device": args.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load": os.getloadavg()[0], "schedule": schedule.to_dict(), **results}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
