"""The images a fit trains on: decoded once into memory and split into train and validation.

Images are squashed to SxS (no crop, so nothing at the border is lost) and kept as uint8,
3 bytes a pixel: a 50,000-image folder at 32 px takes 150 MB. The split is stratified and
seeded, and recorded in the run as file lists, so a resumed run trains on the same images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.encoder import usable_cpus
from ..data.images import BadImage, ImageFolder, Skipped, load_rgb, sample_order
from ..errors import UserError

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class Split:
    """File names (as stored in the run) per class, for each side of the split."""

    train: tuple[tuple[str, ...], ...]
    val: tuple[tuple[str, ...], ...]

    def to_dict(self) -> dict:
        return {"train": [list(c) for c in self.train], "val": [list(c) for c in self.val]}

    @classmethod
    def from_dict(cls, data: dict) -> Split:
        return cls(tuple(tuple(c) for c in data["train"]), tuple(tuple(c) for c in data["val"]))


@dataclass
class LabeledImages:
    images: np.ndarray  # (N, 3, S, S) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units: the normalisation a trained network applies."""
    x = images.astype(np.float64) / 255.0  # (N, 3, S, S)
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
    return [float(v) for v in mean], [float(v) for v in std]


def stored_name(path: Path, root: Path) -> str:
    """A file's name relative to the set's root, so a moved folder still resumes."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _decode_one(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    image = load_rgb(path, min_size=size).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # (3, S, S)


def decode(
    paths: Sequence[Path], size: int, progress: Progress | None = None
) -> tuple[list[np.ndarray | None], list[Skipped]]:
    """Decode ``paths`` at SxS in parallel; a bad file gives ``None`` and a ``Skipped``."""
    out: list[np.ndarray | None] = [None] * len(paths)
    skipped: list[Skipped] = []

    def work(i: int) -> None:
        try:
            out[i] = _decode_one(paths[i], size)
        except BadImage as err:
            skipped.append(Skipped(paths[i], err.reason, err.detail))

    # PIL releases the GIL while it decodes, so threads scale with cores.
    with ThreadPoolExecutor(usable_cpus()) as pool:
        for done, _ in enumerate(pool.map(work, range(len(paths))), 1):
            if progress is not None and (done % 64 == 0 or done == len(paths)):
                progress(done, len(paths))
    skipped.sort(key=lambda s: str(s.path))  # threads finish in any order
    return out, skipped


def _stack(arrays: Sequence[np.ndarray], labels: Sequence[int], size: int) -> LabeledImages:
    images = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.uint8)
    return LabeledImages(images, np.asarray(labels, dtype=np.int64))


def split_and_decode(
    folder: ImageFolder, val_fraction: float, size: int, seed: int, progress: Progress | None = None
) -> tuple[Split, LabeledImages, LabeledImages, list[Skipped]]:
    """Decode every listed file, then hold out ``val_fraction`` of each class's readable ones.

    Each class needs at least two readable images: one to train on, one to validate.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    order = [sample_order(files, seed, name) for name, files in zip(folder.classes, folder.files)]
    flat = [p for files in order for p in files]
    decoded, skipped = decode(flat, size, progress)
    train_x, train_y, val_x, val_y = [], [], [], []
    train_names, val_names = [], []
    start = 0
    for label, (name, files) in enumerate(zip(folder.classes, order)):
        good = [(p, a) for p, a in zip(files, decoded[start : start + len(files)]) if a is not None]
        start += len(files)
        if len(good) < 2:
            raise UserError(
                f"class {name!r} has {len(good)} readable image(s); fit needs at least 2 per class "
                "(one to train on, one to validate)"
            )
        n_val = min(len(good) - 1, max(1, round(val_fraction * len(good))))
        val, train = good[:n_val], good[n_val:]
        val_names.append(tuple(stored_name(p, folder.root) for p, _ in val))
        train_names.append(tuple(stored_name(p, folder.root) for p, _ in train))
        val_x += [a for _, a in val]
        val_y += [label] * len(val)
        train_x += [a for _, a in train]
        train_y += [label] * len(train)
    split = Split(tuple(train_names), tuple(val_names))
    return split, _stack(train_x, train_y, size), _stack(val_x, val_y, size), skipped


def decode_split_side(
    root: Path, names: Sequence[Sequence[str]], size: int, progress: Progress | None = None
) -> LabeledImages:
    """Decode one side of a recorded split again (for a resumed run); every file must still read."""
    paths = [root / n for files in names for n in files]
    labels = [label for label, files in enumerate(names) for _ in files]
    decoded, skipped = decode(paths, size, progress)
    if skipped:
        first = skipped[0]
        raise UserError(
            f"{len(skipped)} image(s) of the run's training split no longer read "
            f"(first: {first.path}: {first.reason}); resume needs the same images"
        )
    return _stack(decoded, labels, size)  # type: ignore[arg-type]
