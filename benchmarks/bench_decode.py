"""Does torchvision.io decoding pay for `fit`'s images on the CPU?

Decodes the same files to 32x32 RGB uint8 two ways, one thread, and reports images per
second (median of --repeats passes, after one warm-up pass):

- ours: `fit`'s per-image path (training.fitdata._decode_one: PIL with JPEG draft
  decoding, EXIF orientation, every colour mode to RGB, bilinear resize);
- torchvision: `torchvision.io.decode_image` (mode RGB) then `transforms.v2.functional.resize`
  (bilinear, antialiased), i.e. what replacing our decoder would look like at its simplest.

Both run in the same process on the same files, so the ratio is what counts.

    python benchmarks/bench_decode.py --per-set 300 --out docs/bench_decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / ".." / "shared" / "data" / "images"
SETS = ("gtsrb", "fashion_mnist", "caltech101", "flowers102")


def files_of(name: str, n: int) -> list[Path]:
    root = IMAGES / name
    every = sorted(p for p in root.rglob("*") if p.is_file())
    step = max(1, len(every) // n)
    return every[::step][:n]


def ours(paths: list[Path], size: int) -> None:
    from metad2a_cli.training.fitdata import _decode_one

    for p in paths:
        _decode_one(p, size)


def with_torchvision(paths: list[Path], size: int) -> None:
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    for p in paths:
        image = decode_image(str(p), mode=ImageReadMode.RGB)  # (3, H, W) uint8
        F.resize(image, [size, size], antialias=True)


def timed(fn, paths, size, repeats: int) -> float:
    fn(paths, size)  # warm-up: file cache, lazy imports
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(paths, size)
        rates.append(len(paths) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-set", type=int, default=300)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in SETS:
        paths = files_of(name, args.per_set)
        a = timed(ours, paths, args.size, args.repeats)
        b = timed(with_torchvision, paths, args.size, args.repeats)
        row = {"set": name, "images": len(paths), "suffixes": sorted({p.suffix for p in paths}),
               "ours_img_per_s": round(a, 1), "torchvision_img_per_s": round(b, 1), "torchvision_vs_ours": round(b / a, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        out = {"machine": platform.processor() or platform.machine(), "threads": 1, "size": args.size,
               "repeats": args.repeats, "rows": rows}
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
