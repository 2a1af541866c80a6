"""A labeled image set as per-class features: sample, decode, encode, with a per-image cache.

``encode_folder`` is the entry point later steps use (search, database builds)::

    feats = encode_folder("my_images", num_samples=20, seed=0)
    feats.classes       # ['cat', 'dog', ...]
    feats.features[0]   # (n_0, 1280) float32 array for 'cat'
    feats.encoder       # identity of the encoder, recorded wherever features are used

The cache keeps one small file per (image file, encoder): keyed by the file's absolute
path, size and mtime and by the encoder's identity, so a second run over the same folder
neither decodes nor encodes, and runs that sample overlapping images share the work.
Files that turned out not to be images are cached too, with their reason, so a warm run
reports them without opening them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_paths, check_writable
from ..errors import UserError
from ..paths import cache_dir
from .encoder import DEFAULT_RESOLUTION, FEATURE_DIM, ImageEncoder, check_device
from .images import (
    EMPTY,
    BadImage,
    ImageFolder,
    Skipped,
    load_rgb,
    read_image_folder,
    sample_order,
)

FILE_FORMAT = "metad2a-features/1"

# progress(stage, done, total): stage is "decode" or "encode".
Progress = Callable[[str, int, int], None]


# -- cache -----------------------------------------------------------------------------------


class FeatureCache:
    """One file per image: ``MAGIC | kind | payload | sha256(key, kind, payload)``.

    ``kind`` is F (payload: 1280 little-endian float32) or S (payload: the skip reason).
    The digest covers the key, so a damaged, truncated or misplaced entry is detected,
    counted in ``rebuilt`` and replaced rather than trusted. Entries are written to a
    temporary name and renamed, so readers never see half a file; they are not fsynced,
    because the digest already catches a torn write and an fsync per 5 KB file would
    cost more than encoding the image.
    """

    MAGIC = b"MD2AFC1\n"
    DIGEST = 32

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = (cache_dir() / "features") if root is None else root
        self.enabled = enabled
        self.rebuilt = 0
        self.write_error: str | None = None  # set, and writing stopped, on the first failure

    @staticmethod
    def key(path: Path, st: os.stat_result, encoder_tag: str) -> str:
        ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{encoder_tag}"
        return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.bin"

    def _digest(self, key: str, kind: bytes, payload: bytes) -> bytes:
        return hashlib.sha256(key.encode() + kind + payload).digest()

    def get(self, key: str) -> np.ndarray | str | None:
        """A feature (1280,), a skip reason, or None when absent or not trustworthy."""
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        head = len(self.MAGIC)
        kind, payload, digest = blob[head : head + 1], blob[head + 1 : -self.DIGEST], blob[-self.DIGEST :]
        ok = (
            len(blob) > head + 1 + self.DIGEST
            and blob[:head] == self.MAGIC
            and digest == self._digest(key, kind, payload)
        )
        if ok and kind == b"F" and len(payload) == 4 * FEATURE_DIM:
            feature = np.frombuffer(payload, dtype="<f4")
            if np.isfinite(feature).all():
                return feature
        elif ok and kind == b"S":
            return payload.decode("utf-8", "replace")
        self.rebuilt += 1
        path.unlink(missing_ok=True)
        return None

    def put(self, key: str, value: np.ndarray | str) -> None:
        if not self.enabled or self.write_error is not None:
            return
        if isinstance(value, str):
            kind, payload = b"S", value.encode("utf-8")
        else:
            kind, payload = b"F", np.ascontiguousarray(value, dtype="<f4").tobytes()
        blob = self.MAGIC + kind + payload + self._digest(key, kind, payload)
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(blob)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:
            self.write_error = f"{err.filename or path}: {err.strerror or err}"


# -- result ----------------------------------------------------------------------------------


@dataclass
class EncodeStats:
    cache_hits: int = 0  # images whose feature came from the cache
    decoded: int = 0  # images decoded (and then encoded) this run
    cache_rebuilt: int = 0  # cache entries found damaged and recomputed
    cache_write_error: str | None = None


@dataclass
class DatasetFeatures:
    """Per-class features of a labeled image set.

    ``features[i]`` is a float32 array (n_i, 1280) for ``classes[i]``; n_i is the number
    of samples asked for, or fewer when the class has fewer readable images
    (``short_classes``). ``files[i]`` names the images used, relative to ``root``.
    """

    classes: list[str]
    features: list[np.ndarray]
    encoder: str
    files: list[list[str]]
    num_samples: int
    seed: int
    root: str = ""
    skipped: list[Skipped] = field(default_factory=list)
    dropped_classes: list[str] = field(default_factory=list)  # no readable image at all
    stats: EncodeStats = field(default_factory=EncodeStats)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def counts(self) -> list[int]:
        return [len(f) for f in self.features]

    @property
    def short_classes(self) -> dict[str, int]:
        """Classes that had fewer readable images than asked for, with how many they had."""
        return {c: n for c, n in zip(self.classes, self.counts) if n < self.num_samples}

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write one safetensors file: tensor ``class.<i>`` per class, the rest as metadata."""
        from safetensors.numpy import save_file

        path = Path(path)
        check_writable(path, overwrite)
        tensors = {f"class.{i}": np.ascontiguousarray(f, dtype=np.float32) for i, f in enumerate(self.features)}
        meta = {
            "format": FILE_FORMAT,
            "classes": json.dumps(self.classes),
            "encoder": self.encoder,
            "num_samples": str(self.num_samples),
            "seed": str(self.seed),
            "root": self.root,
            "files": json.dumps(self.files),
        }
        with atomic_paths(path, overwrite=overwrite) as (tmp,):
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DatasetFeatures:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        try:
            with safe_open(str(path), framework="np") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FILE_FORMAT:
                    raise UserError(f"{path} is not a metad2a features file (made by `metad2a encode`)")
                classes = json.loads(meta["classes"])
                features = [fh.get_tensor(f"class.{i}") for i in range(len(classes))]
            return cls(
                classes=classes,
                features=features,
                encoder=meta["encoder"],
                files=json.loads(meta["files"]),
                num_samples=int(meta["num_samples"]),
                seed=int(meta["seed"]),
                root=meta.get("root", ""),
            )
        except UserError:
            raise
        except Exception as err:  # safetensors' own errors, bad JSON, missing keys
            raise UserError(f"{path} is damaged or not a features file ({err})") from err


# -- pipeline --------------------------------------------------------------------------------


def _encoder_tag(encoder: ImageEncoder) -> str:
    import PIL

    # Decoding and resizing are part of what makes a feature, so Pillow's version is too.
    return f"{encoder.identity}|pillow-{PIL.__version__}"


def encode_images(
    folder: ImageFolder,
    num_samples: int = 20,
    seed: int = 0,
    encoder: ImageEncoder | None = None,
    cache: bool = True,
    progress: Progress | None = None,
) -> DatasetFeatures:
    """Features of up to ``num_samples`` readable images per class of ``folder``.

    Each class's files are walked in their seeded order (``sample_order``); a file that is
    not a usable image is recorded in ``skipped`` and the next one taken instead. A class
    with no readable image is dropped (``dropped_classes``); fewer than 2 classes left is
    a ``UserError``.
    """
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    encoder = encoder or ImageEncoder()
    store = FeatureCache(enabled=cache)
    tag = _encoder_tag(encoder)
    stats = EncodeStats()
    skipped = list(folder.skipped)
    report = progress or (lambda stage, done, total: None)

    # chosen[c] holds, per image used, its cached feature or its index into `pending`.
    chosen: list[list[tuple[Path, np.ndarray | int]]] = []
    pending: list[np.ndarray] = []  # prepared images still to encode, (R, R, 3) uint8
    pending_keys: list[str] = []
    planned = sum(min(num_samples, len(f)) for f in folder.files)
    done = 0
    report("decode", 0, planned)
    for name, files in zip(folder.classes, folder.files):
        picks: list[tuple[Path, np.ndarray | int]] = []
        for path in sample_order(files, seed, name):
            if len(picks) == num_samples:
                break
            try:
                st = os.stat(path)
            except OSError:
                st = None  # vanished or unreadable since listing: load_rgb names the reason
            key = store.key(path, st, tag) if st is not None else ""
            hit = store.get(key) if key else None
            if isinstance(hit, str):
                skipped.append(Skipped(path, hit))
                continue
            if hit is not None:
                picks.append((path, hit))
                stats.cache_hits += 1
            else:
                try:
                    image = load_rgb(path, encoder.decode_size)
                except BadImage as bad:
                    skipped.append(Skipped(path, bad.reason, bad.detail))
                    if key and bad.reason != EMPTY:
                        store.put(key, bad.reason)
                    continue
                picks.append((path, len(pending)))
                pending.append(encoder.prepare(image))
                pending_keys.append(key)
                stats.decoded += 1
            done += 1
            report("decode", done, planned)
        chosen.append(picks)
    report("decode", done, done)  # bad files made the plan too long

    encoded = _encode_pending(encoder, pending, report)
    for key, feature in zip(pending_keys, encoded):
        if key:
            store.put(key, feature)

    classes, features, files, dropped = [], [], [], []
    for name, picks in zip(folder.classes, chosen):
        if not picks:
            dropped.append(name)
            continue
        rows = [encoded[ref] if isinstance(ref, int) else ref for _, ref in picks]
        classes.append(name)
        features.append(np.stack(rows).astype(np.float32))  # (n_i, 1280)
        files.append([Path(os.path.relpath(p, folder.root)).as_posix() for p, _ in picks])
    if len(classes) < 2:
        what = "no readable images" if not classes else f"readable images in one class only ({classes[0]!r})"
        raise UserError(f"{what} in {folder.root}; a classification dataset needs at least 2 classes")
    stats.cache_rebuilt = store.rebuilt
    stats.cache_write_error = store.write_error
    return DatasetFeatures(
        classes=classes,
        features=features,
        encoder=encoder.identity,
        files=files,
        num_samples=num_samples,
        seed=seed,
        root=str(folder.root),
        skipped=skipped,
        dropped_classes=dropped,
        stats=stats,
    )


def _encode_pending(encoder: ImageEncoder, pending: Sequence[np.ndarray], report: Progress) -> np.ndarray:
    # Only here is torch needed: a run whose images are all cached never imports it.
    if not pending:
        return np.empty((0, FEATURE_DIM), dtype=np.float32)
    import torch

    batch = torch.from_numpy(np.stack(pending))  # (N, R, R, 3) uint8
    out = []
    report("encode", 0, len(batch))
    for chunk in batch.split(encoder.batch_size):
        out.append(encoder.encode(chunk).numpy())
        report("encode", sum(len(o) for o in out), len(batch))
    return np.concatenate(out)


def encode_folder(
    root: str | Path,
    num_samples: int = 20,
    seed: int = 0,
    device: str = "auto",
    cache: bool = True,
    progress: Progress | None = None,
    resolution: int = DEFAULT_RESOLUTION,
) -> DatasetFeatures:
    """Read ``root`` (a class-per-folder tree, or a .csv/.json list) and encode it.

    See ``encode_images`` for how samples are drawn and bad files handled.
    """
    check_device(device)  # now: with a warm cache the encoder never resolves it
    folder = read_image_folder(root)
    encoder = ImageEncoder(resolution=resolution, device=device)
    return encode_images(folder, num_samples, seed, encoder, cache, progress)
