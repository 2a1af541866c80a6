"""Measure the image encoder: end-to-end speed, throughput per resolution, and which
resolution separates the classes of the held-out sets best.

    python benchmarks/bench_encode.py speed        # 10 classes x 20 images: cold and warm
    python benchmarks/bench_encode.py throughput   # encoder images/s per input resolution
    python benchmarks/bench_encode.py resolution   # class separability + upsampling mismatch
    python benchmarks/bench_encode.py crop         # squash the image into the square, or crop it
    python benchmarks/bench_encode.py conventions  # which padding and input scaling fit the weights

Data comes from ../shared/data/images (relative to the repository root); nothing is
written into the repository. Timings depend on what else the machine is doing: each run
prints the load average it started under. The numbers in docs/encoder.md come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "images"
HELD_OUT = ("gtsrb", "fashion_mnist")


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} CPUs, load average {load:.2f} at start"


# -- speed: the target, 10 classes x 20 images ----------------------------------------


def make_folder(dest: Path, dataset: str, classes: int, per_class: int) -> Path:
    """Copy (not link) a small labeled folder, so reads hit real files of the usual kind."""
    src = DATA / dataset
    for name in sorted(p.name for p in src.iterdir() if p.is_dir())[:classes]:
        files = sorted((src / name).iterdir())[:per_class]
        (dest / name).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, dest / name / f.name)
    return dest


# CPU seconds are printed beside wall seconds: on a shared machine wall time measures the
# neighbours too, while one thread's CPU time is close to what it needs on an idle core.
_TIMED_RUN = r"""
import json, sys, time
t0 = time.perf_counter()
from metad2a_cli.data.features import encode_folder
t1, c1 = time.perf_counter(), time.process_time()
out = encode_folder(sys.argv[1], num_samples=int(sys.argv[2]), device="cpu")
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import_s": t1 - t0, "encode_folder_s": t2 - t1, "encode_folder_cpu_s": c2 - c1,
                  "images": sum(out.counts), "decoded": out.stats.decoded, "cache_hits": out.stats.cache_hits}))
"""


def timed_process(folder: Path, per_class: int, env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", _TIMED_RUN, str(folder), str(per_class)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def timed_cli(folder: Path, per_class: int, env: dict, out: Path) -> float:
    exe = Path(sys.executable).with_name("metad2a")
    t = time.perf_counter()
    subprocess.run([str(exe), "encode", str(folder), "-o", str(out), "-n", str(per_class), "--device", "cpu"],
                   env=env, capture_output=True, check=True)
    return time.perf_counter() - t


def speed(args) -> None:
    import torch

    from metad2a_cli.data.encoder import ImageEncoder
    from metad2a_cli.data.images import load_rgb, read_image_folder, sample_per_class

    print(f"# speed: {args.classes} classes x {args.per_class} images of {args.dataset}; {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_folder(tmp / "set", args.dataset, args.classes, args.per_class)
        rows = []
        for rep in range(args.repeats):
            env = dict(os.environ, METAD2A_CACHE=str(tmp / f"cache{rep}"))
            cold = timed_process(folder, args.per_class, env)
            warm = timed_process(folder, args.per_class, env)
            cli_warm = timed_cli(folder, args.per_class, env, tmp / "f.safetensors")
            env_cold = dict(env, METAD2A_CACHE=str(tmp / f"cli-cache{rep}"))
            cli_cold = timed_cli(folder, args.per_class, env_cold, tmp / "f.safetensors")
            assert cold["decoded"] == cold["images"] and warm["cache_hits"] == warm["images"]
            rows.append((cold, warm, cli_cold, cli_warm))
            print(f"run {rep}: import {cold['import_s']:.2f} s | encode_folder cold {cold['encode_folder_s']:.2f} s "
                  f"(CPU {cold['encode_folder_cpu_s']:.2f} s), warm {warm['encode_folder_s']:.3f} s "
                  f"(CPU {warm['encode_folder_cpu_s']:.3f} s) | CLI end to end cold {cli_cold:.2f} s, "
                  f"warm {cli_warm:.2f} s")
        n = rows[0][0]["images"]
        cold_s = statistics.median(r[0]["encode_folder_s"] for r in rows)
        warm_s = statistics.median(r[1]["encode_folder_s"] for r in rows)
        print(f"median of {len(rows)}: {n} images, features ready cold {cold_s:.2f} s ({n / cold_s:.0f} img/s), "
              f"warm {warm_s:.3f} s ({n / warm_s:.0f} img/s); import of the library (torch) "
              f"{statistics.median(r[0]['import_s'] for r in rows):.2f} s; CLI cold "
              f"{statistics.median(r[2] for r in rows):.2f} s, warm {statistics.median(r[3] for r in rows):.2f} s")

        # The two stages apart, in this process.
        encoder = ImageEncoder(device="cpu")
        paths = [p for files in sample_per_class(read_image_folder(folder), args.per_class) for p in files]
        decode_s, images = [], []
        for _ in range(3):
            t = time.perf_counter()
            images = [encoder.prepare(load_rgb(p, encoder.decode_size)) for p in paths]
            decode_s.append(time.perf_counter() - t)
        encoder.encode(images[:8])  # build the network and warm the kernels
        encode_s, encode_cpu = [], []
        for _ in range(3):
            t, c = time.perf_counter(), time.process_time()
            encoder.encode(images)
            encode_s.append(time.perf_counter() - t)
            encode_cpu.append(time.process_time() - c)
        d, e = min(decode_s), min(encode_s)
        print(f"stages (best of 3): decode+resize {len(paths) / d:.0f} img/s, "
              f"encode at {encoder.resolution} px {len(paths) / e:.0f} img/s "
              f"(CPU {min(encode_cpu):.2f} s for {len(paths)}; {torch.get_num_threads()} threads)")


# -- throughput per resolution ---------------------------------------------------------------


def throughput(args) -> None:
    import torch

    from metad2a_cli.data.encoder import ImageEncoder

    print(f"# encoder throughput on CPU, batch {args.batch}, {torch.get_num_threads()} threads; {machine()}")
    rng = np.random.default_rng(0)
    for res in args.resolutions:
        encoder = ImageEncoder(resolution=res, device="cpu", batch_size=args.batch)
        batch = torch.from_numpy(rng.integers(0, 255, (args.batch, res, res, 3), dtype=np.uint8))
        encoder.encode(batch)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            encoder.encode(batch)
            times.append(time.perf_counter() - t)
        best = min(times)
        print(f"{res:4d} px: {args.batch / best:7.1f} img/s  ({1000 * best / args.batch:.2f} ms/img, best of {args.repeats})")


# -- resolution: separability and upsampling mismatch -----------------------------------------


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def loo_scores(feats: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Leave-one-out accuracy of 1-nearest-neighbour and of nearest-centroid, cosine."""
    z = _unit(feats)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    knn = float((labels[sim.argmax(1)] == labels).mean())
    classes = np.unique(labels)
    sums = np.stack([z[labels == c].sum(0) for c in classes])
    counts = np.array([(labels == c).sum() for c in classes])
    correct = 0
    for x, y in zip(z, labels):
        cents = sums.copy()
        k = np.searchsorted(classes, y)
        cents[k] = (cents[k] - x) / max(counts[k] - 1, 1)  # the held-out image leaves its centroid
        others = np.arange(len(classes)) != k
        cents[others] /= counts[others, None]
        correct += int(classes[(_unit(cents) @ x).argmax()] == y)
    return knn, correct / len(labels)


def sampled_images(root: Path, per_class: int, seed: int):
    """Decoded images of a seeded per-class sample, with their class indices."""
    from metad2a_cli.data.images import load_rgb, read_image_folder, sample_per_class

    images, labels = [], []
    for label, files in enumerate(sample_per_class(read_image_folder(root), per_class, seed)):
        images += [load_rgb(p) for p in files]
        labels += [label] * len(files)
    return images, np.array(labels)


def _photos():
    from PIL import Image
    from skimage import data

    photos = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
              "rocket": data.rocket(), "motorcycle": data.stereo_motorcycle()[0],
              "hubble": data.hubble_deep_field(), "ihc": data.immunohistochemistry(),
              "camera": np.stack([data.camera()] * 3, -1)}
    return {k: Image.fromarray(v) for k, v in photos.items()}


def _as_in_shared_data(image, long_side: int = 64):
    """Shrink so the longer side is 64 px and store as JPEG q90, as ../shared/data was made."""
    import io

    from PIL import Image

    w, h = image.size
    s = long_side / max(w, h)
    small = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resolution(args) -> None:
    from metad2a_cli.data.encoder import ImageEncoder

    print(f"# resolution: {args.per_class} images/class, seeds {args.seeds}; {machine()}")
    sets = {d: [sampled_images(DATA / d, args.per_class, s) for s in args.seeds] for d in args.datasets}
    photos = _photos()
    small = {k: _as_in_shared_data(v) for k, v in photos.items()}
    header = "".join(f" {d} 1-NN / centroid |" for d in args.datasets)
    print(f"| res |{header} cos(full-res photo, 64 px copy) | same, photo capped at 64 px (default) | cos(different photos) |")
    for res in args.resolutions:
        encoder = ImageEncoder(resolution=res, device="cpu")
        cells = []
        for d in args.datasets:
            knn, cen = [], []
            for images, labels in sets[d]:
                feats = encoder.encode([encoder.prepare(im) for im in images]).numpy()
                a, b = loo_scores(feats, labels)
                knn.append(a)
                cen.append(b)
            cells.append(f"{100 * np.mean(knn):.1f} / {100 * np.mean(cen):.1f}")
        uncapped = ImageEncoder(resolution=res, device="cpu", max_side=None)
        full = _unit(uncapped.encode([uncapped.prepare(im) for im in photos.values()]).numpy())
        low = _unit(uncapped.encode([uncapped.prepare(im) for im in small.values()]).numpy())
        capped = _unit(encoder.encode([encoder.prepare(im) for im in photos.values()]).numpy())  # the default
        same = float((full * low).sum(1).mean())
        same_capped = float((capped * low).sum(1).mean())
        cross = full @ full.T
        between = float(cross[~np.eye(len(full), dtype=bool)].mean())
        print(f"| {res} |{''.join(f' {c} |' for c in cells)} {same:.3f} | {same_capped:.3f} | {between:.3f} |", flush=True)


def crop(args) -> None:
    """Squash the whole image into the square vs resize the short side and crop the centre."""
    from PIL import ImageOps

    from metad2a_cli.data.encoder import ImageEncoder

    print(f"# squash vs centre crop on {args.dataset} ({args.classes} classes); {machine()}")
    src = DATA / args.dataset
    keep = sorted(p.name for p in src.iterdir() if p.is_dir())[: args.classes]
    with tempfile.TemporaryDirectory() as tmp:
        for name in keep:
            os.symlink(src / name, Path(tmp) / name)
        runs = [sampled_images(Path(tmp), args.per_class, s) for s in args.seeds]
        for res in args.resolutions:
            encoder = ImageEncoder(resolution=res, device="cpu")
            for how in ("squash", "crop"):
                knn, cen = [], []
                for images, labels in runs:
                    prepared = [encoder.prepare(im) if how == "squash"
                                else np.asarray(ImageOps.fit(im, (res, res))) for im in images]
                    a, b = loo_scores(encoder.encode(prepared).numpy(), labels)
                    knn.append(a)
                    cen.append(b)
                print(f"{res} px {how:6s}: 1-NN {100 * np.mean(knn):.1f}%, centroid {100 * np.mean(cen):.1f}%")


def conventions(args) -> None:
    """Score the ImageNet head under each padding / input-scaling convention.

    The weights came from TensorFlow, so "SAME" padding and (x - 127) / 128 are expected;
    the right pair should give the photos' true classes the highest probability.
    """
    import random

    import torch
    import torch.nn.functional as F
    from PIL import Image

    targets = {"chelsea": [281, 282, 283, 284, 285], "coffee": [504, 967, 968],
               "rocket": [657, 744, 812], "motorcycle": [665, 670, 671]}
    photos = _photos()
    rng = random.Random(0)
    crops = []
    for name, ids in targets.items():
        img = photos[name]
        w, h = img.size
        for _ in range(args.crops):
            s = rng.uniform(0.6, 1.0)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            size = rng.choice([192, 224, 256])
            crops.append((ids, img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.Resampling.BILINEAR)))
    from metad2a_cli.data import efficientnet

    model = efficientnet.load_pretrained()
    same_forward = efficientnet.ConvAct.forward

    def symmetric_forward(self, x):  # what a PyTorch-style port would do: pad (k-1)//2 each side
        x = F.conv2d(x, self.conv.weight, self.conv.bias, self.stride, (self.kernel - 1) // 2, 1, self.conv.groups)
        return F.relu6(x) if self.act else x

    scalings = {"(x-127)/128": lambda x: (x - 127.0) / 128.0,
                "ImageNet mean/std": lambda x: (x / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
                / torch.tensor([0.229, 0.224, 0.225])[:, None, None]}
    print(f"# conventions: mean log-probability of the true class group over {len(crops)} crops")
    for pad, forward in (("SAME", same_forward), ("symmetric", symmetric_forward)):
        efficientnet.ConvAct.forward = forward
        try:
            for sname, scale in scalings.items():
                logp = []
                for ids, im in crops:
                    x = scale(torch.from_numpy(np.array(im)).permute(2, 0, 1).float())[None]
                    with torch.inference_mode():
                        p = model(x).softmax(-1)[0]
                    logp.append(float(p[ids].sum().log()))
                print(f"padding {pad:9s} scaling {sname:17s}: {np.mean(logp):.3f}")
        finally:
            efficientnet.ConvAct.forward = same_forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--dataset", default="caltech101")
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--per-class", type=int, default=20)
    s.add_argument("--repeats", type=int, default=3)
    t = sub.add_parser("throughput")
    t.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 96, 128, 160, 224])
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--repeats", type=int, default=3)
    r = sub.add_parser("resolution")
    r.add_argument("--datasets", nargs="*", default=list(HELD_OUT), help="none: only the photo mismatch")
    r.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 96, 128, 160, 224])
    r.add_argument("--per-class", type=int, default=20)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c = sub.add_parser("crop")
    c.add_argument("--dataset", default="caltech101")
    c.add_argument("--classes", type=int, default=20)
    c.add_argument("--resolutions", type=int, nargs="+", default=[64])
    c.add_argument("--per-class", type=int, default=20)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    v = sub.add_parser("conventions")
    v.add_argument("--crops", type=int, default=12)
    args = ap.parse_args()
    run = {"speed": speed, "throughput": throughput, "resolution": resolution, "crop": crop, "conventions": conventions}
    run[args.what](args)


if __name__ == "__main__":
    main()
