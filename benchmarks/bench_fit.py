"""Training speed of `metad2a fit` against plain eager PyTorch training of the same network.

Both train the default network (C=16, N=5, 32x32 input, NAS-Bench-201's ResNet-like cell
unless --arch says otherwise) with the same optimiser, augmentation and batch size, on the
same in-memory images; only how the data reaches the model and how the step runs differ:

  eager      float32 images in host memory, a torch DataLoader over a TensorDataset,
             augmentation on the host, float32 NCHW forward and backward: the textbook loop
  fit        metad2a's Trainer: uint8 images resident on the device and augmented there;
             on a GPU bfloat16 autocast and channels-last
  fit+compile the same with the model wrapped in torch.compile (--compile MODE)

Images per second are the median over timed epochs after a warm-up epoch. On a GPU the
script samples nvidia-smi every 100 ms and reports each variant's median utilisation.
Image content does not change speed, so the images are random (the labels learnable).

    python benchmarks/bench_fit.py --out docs/bench_fit.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metad2a_cli.nb201.cells import Cell
from metad2a_cli.nb201.network import Network
from metad2a_cli.training.augment import crop_and_flip
from metad2a_cli.training.fitdata import LabeledImages
from metad2a_cli.training.recipe import cosine_lr
from metad2a_cli.training.trainer import FitSettings, FitState, Reporter, Trainer, new_network

RESNET = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"


def make_images(n: int, classes: int, size: int, seed: int = 0) -> LabeledImages:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    return LabeledImages(images, labels.astype(np.int64))


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 100 ms, with timestamps, in a background thread."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, text=True,
            )
        except OSError:
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                pass

    def median_between(self, t0: float, t1: float) -> float | None:
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.median(vals) if vals else None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def eager_epochs(cell: Cell, data: LabeledImages, classes: int, batch: int, epochs: int, device: torch.device, seed: int, budget_s: float) -> list[float]:
    """The textbook loop; returns seconds per epoch."""
    torch.manual_seed(seed)
    settings = FitSettings(cell=str(cell))
    model = Network(cell, settings.network_config(classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.from_numpy(data.images).float().div_(255.0)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.from_numpy(data.labels)), batch_size=batch, shuffle=True,
        pin_memory=device.type == "cuda",
    )
    pad = 4
    g = torch.Generator().manual_seed(seed)
    times = []
    step, total = 0, epochs * len(loader)
    start = time.perf_counter()
    for _ in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        model.train()
        for xb, yb in loader:
            offsets = torch.randint(0, 2 * pad + 1, (len(xb), 2), generator=g)
            flips = torch.rand(len(xb), generator=g) < 0.5
            xb = crop_and_flip(xb, offsets, flips, pad)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(0.1, step / total)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 2:
            break
    return times


def fit_epochs(cell: Cell, data: LabeledImages, classes: int, batch: int, epochs: int, device: torch.device, seed: int, budget_s: float, compile_mode: str | None = None) -> tuple[list[float], Trainer]:
    """metad2a's Trainer; returns (seconds per epoch, the trainer after them)."""
    mean, std = [0.5] * 3, [0.25] * 3
    settings = FitSettings(cell=str(cell), epochs=epochs, seed=seed, augment="crop-flip")
    network = new_network(cell, settings.network_config(classes), mean, std, seed)
    trainer = Trainer(settings, network, [str(i) for i in range(classes)], data,
                      LabeledImages(data.images[:2], data.labels[:2]), FitState(batch_size=batch), device, Reporter())
    if compile_mode:
        trainer.model = torch.compile(trainer.model, mode=compile_mode)
    times = []
    start = time.perf_counter()
    for epoch in range(epochs):
        trainer.state.epoch, trainer.state.seen = epoch, 0
        sync(device)
        t0 = time.perf_counter()
        trainer.run_epoch()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 2:
            break
    return times, trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=None, help="training images (default: 50,000 on a GPU, 5,000 on a CPU)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[256])
    ap.add_argument("--epochs", type=int, default=4, help="epochs per variant, the first one is warm-up")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds per variant before it stops early")
    ap.add_argument("--arch", default=RESNET)
    ap.add_argument("--compile", default=None, metavar="MODE",
                    help="also time torch.compile(mode=MODE) at the first batch size, e.g. default or reduce-overhead")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    n = args.images or (50_000 if device.type == "cuda" else 5_000)
    data = make_images(n, args.classes, args.size)
    cell = Cell.from_any(args.arch)
    sampler = GpuSampler() if device.type == "cuda" else None
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "images": n, "size": args.size, "classes": args.classes, "cell": str(cell),
        "variants": [],
    }

    def record(name: str, batch: int, times: list[float], t0: float, t1: float, extra: dict | None = None) -> None:
        timed = times[1:] or times
        entry = {
            "variant": name,
            "batch": batch,
            "epochs_timed": len(timed),
            "images_per_s": n / statistics.median(timed),
            "epoch_seconds": times,
            **(extra or {}),
        }
        if sampler is not None:
            entry["gpu_util_median"] = sampler.median_between(t0 + times[0], t1)
            entry["max_memory_mb"] = torch.cuda.max_memory_allocated() / 1e6
            torch.cuda.reset_peak_memory_stats()
        result["variants"].append(entry)
        print(json.dumps(entry), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    for batch in args.batch:
        t0 = time.perf_counter()
        times = eager_epochs(cell, data, args.classes, batch, args.epochs, device, 0, args.budget)
        record("eager", batch, times, t0, time.perf_counter())
        t0 = time.perf_counter()
        times, _ = fit_epochs(cell, data, args.classes, batch, args.epochs, device, 0, args.budget)
        record("fit", batch, times, t0, time.perf_counter())
        if args.compile and batch == args.batch[0]:
            t0 = time.perf_counter()
            try:
                times, _ = fit_epochs(cell, data, args.classes, batch, args.epochs, device, 0, args.budget, args.compile)
                record(f"fit+compile({args.compile})", batch, times, t0, time.perf_counter(), {"first_epoch_seconds": times[0]})
            except Exception as err:  # a compiler failure is a result too
                print(f"fit+compile failed: {type(err).__name__}: {err}", flush=True)
    base = {v["batch"]: v["images_per_s"] for v in result["variants"] if v["variant"] == "eager"}
    for v in result["variants"]:
        v["speedup_vs_eager"] = v["images_per_s"] / base[v["batch"]]
    if sampler is not None:
        sampler.close()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    for v in result["variants"]:
        util = f" · GPU {v['gpu_util_median']:.0f}%" if v.get("gpu_util_median") is not None else ""
        print(f"{v['variant']:>28} batch {v['batch']:>5}: {v['images_per_s']:>9,.0f} img/s ({v['speedup_vs_eager']:.2f}x eager){util}")


if __name__ == "__main__":
    main()
