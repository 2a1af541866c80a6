"""The meta-training database: tasks drawn from image collections, cells trained on them.

A database is a folder:

    manifest.json            format, encoder identity, proxy schedule, sources + hashes, seed
    tasks.json               every task: source, classes, train/validation files
    features/<source>.safetensors   per class (n, 1280) float16 features, ``class.<i>``
    records-<i>of<n>.jsonl   one line per trained (task, cell): accuracy, curve, seconds, device

A record's accuracy is what ``metad2a fit`` would report for the cell on the task with
the manifest's label schedule (``training.labels``). Records are appended and fsynced a line at a time, so killing a builder loses at most the
cells in flight, and running the same command again skips every (task, cell) already
recorded. Builders of different shards (``--shard i/n``) write different files; a second
builder of the same shard is refused by a lock. ``merge`` joins the shard files. The labels
may be trained elsewhere (``meta.distributed`` sends them to a Ray cluster); the builder's
process stays the one writer of its shard file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_paths, check_output_folder, exclusive_lock
from ..errors import UserError
from ..nb201.cells import NUM_CELLS, Cell
from ..training.schedule import LEGACY_FIELDS, LabelSchedule
from .table import TABLE_FILE

# 2: labels are shortened fits of the full network (1: a shrunken proxy network's).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TASKS = "tasks.json"
MERGED = "records.jsonl"

# Cells for the records of a task: half drawn uniformly (the predictor needs a spread), half
# from a prior that favours convolutions (the generator needs good cells to imitate, and
# NAS-Bench-201's best cells are convolution-heavy).
GOOD_PRIOR = np.array([0.05, 0.15, 0.25, 0.40, 0.15])  # none, skip, 1x1, 3x3, pool


@dataclass(frozen=True)
class BuildSettings:
    num_tasks: int = 300
    min_classes: int = 5
    max_classes: int = 20
    images_per_class: int = 100  # train + validation images per class and task (fewer if the class has fewer)
    # Classes are added to a task until it holds this many images (or the source runs out):
    # labels on a few hundred images rank cells by noise (docs/labels.md).
    min_task_images: int = 0
    val_fraction: float = 0.25
    features_per_class: int = 30  # stored features per class (a search samples 20)
    cells_per_task: int = 10
    seed: int = 0
    schedule: LabelSchedule = field(default_factory=LabelSchedule)

    def validate(self) -> None:
        least = (("--tasks", self.num_tasks, 1), ("--min-classes", self.min_classes, 2),
                 # validation takes 2 images a class; training needs at least 1 more
                 ("--images-per-class", self.images_per_class, 3), ("--min-task-images", self.min_task_images, 0),
                 ("--features-per-class", self.features_per_class, 1), ("--seed", self.seed, 0))
        for flag, value, lowest in least:
            if value < lowest:
                raise UserError(f"{flag} must be at least {lowest}, got {value}")
        if self.max_classes < self.min_classes:
            raise UserError(f"--max-classes {self.max_classes} is below --min-classes {self.min_classes}")
        if not 1 <= self.cells_per_task <= NUM_CELLS:  # draw_cells draws distinct cells
            raise UserError(f"--cells-per-task must be in 1..{NUM_CELLS}, got {self.cells_per_task}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        self.schedule.validate()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BuildSettings:
        d = dict(d)
        d["schedule"] = LabelSchedule.from_dict(d["schedule"])
        return cls(**d)


@dataclass(frozen=True)
class Task:
    id: str
    source: str
    classes: list[str]
    train: list[list[str]]  # per class, file paths relative to the source root
    val: list[list[str]]
    cells: list[str]


@dataclass(frozen=True)
class Record:
    task: str
    cell: str
    accuracy: float  # best validation accuracy (%), as fit reports it
    seconds: float  # training time per cell (cells of a chunk train together)
    best_epoch: int | None = None
    curve: list[float] | None = None  # validation accuracy after each epoch
    device: str | None = None  # device_name(): "cpu", "cpu bfloat16" or the GPU's name


# -- sources ---------------------------------------------------------------------------------


def source_hash(folder) -> str:
    """sha256 over every candidate file's relative path and bytes: names what was read."""
    h = hashlib.sha256()
    for cls, files in zip(folder.classes, folder.files):
        for f in files:
            h.update(f"{cls}/{f.relative_to(folder.root)}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# -- tasks -----------------------------------------------------------------------------------


def draw_cells(rng: np.random.Generator, n: int) -> list[Cell]:
    cells: list[Cell] = []
    seen: set[int] = set()
    while len(cells) < n:
        if len(cells) % 2 == 0:
            ops = rng.integers(0, 5, 6)
        else:
            ops = rng.choice(5, 6, p=GOOD_PRIOR)
        cell = Cell(tuple(int(o) for o in ops))
        if cell.code not in seen:
            seen.add(cell.code)
            cells.append(cell)
    return cells


def draw_tasks(folders: dict, settings: BuildSettings) -> list[Task]:
    """Tasks from ``folders`` ({source name: ImageFolder}); the same seed, the same tasks."""
    from ..data.images import sample_order

    names = sorted(folders)
    usable = {n: [i for i, files in enumerate(folders[n].files) if len(files) >= 8] for n in names}
    names = [n for n in names if len(usable[n]) >= settings.min_classes]
    if not names:
        raise UserError(f"no source has {settings.min_classes} classes with at least 8 images")
    tasks = []
    for t in range(settings.num_tasks):
        rng = np.random.default_rng([settings.seed, t])
        name = names[int(rng.integers(len(names)))]
        folder = folders[name]
        upper = min(settings.max_classes, len(usable[name]))
        k = int(rng.integers(settings.min_classes, upper + 1))
        chosen = rng.choice(usable[name], size=k, replace=False).tolist()

        def taken(i: int) -> int:  # images a task takes from class i
            return min(len(folder.files[i]), settings.images_per_class)

        held = sum(taken(i) for i in chosen)
        # Only a task that falls short draws again from rng: every other task, and every
        # database built with min_task_images 0, keeps the draw it always had.
        if held < settings.min_task_images:
            for i in rng.permutation(sorted(set(usable[name]) - set(chosen))).tolist():
                if held >= settings.min_task_images:
                    break
                chosen.append(i)
                held += taken(i)
        chosen = sorted(chosen)
        train, val = [], []
        for i in chosen:
            order = sample_order(folder.files[i], settings.seed * 1_000_003 + t, folder.classes[i])
            files = [str(p.relative_to(folder.root)) for p in order[: settings.images_per_class]]
            n_val = max(2, round(len(files) * settings.val_fraction))
            val.append(files[:n_val])
            train.append(files[n_val:])
        cells = [str(c) for c in draw_cells(rng, settings.cells_per_task)]
        tasks.append(Task(f"t{t:05d}", name, [folder.classes[i] for i in chosen], train, val, cells))
    return tasks


# -- the folder ------------------------------------------------------------------------------


def _write_json(path: Path, data) -> None:
    with atomic_paths(path) as (tmp,):
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like 0/4, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


class Database:
    def __init__(self, path: Path):
        self.path = Path(path)

    # -- reading -------------------------------------------------------------------------------

    @property
    def schedule(self) -> LabelSchedule:
        """How the records were labelled, as this version reads it (a manifest from before a
        field was recorded reads as what every label then used)."""
        return LabelSchedule.from_dict(self.manifest["settings"]["schedule"])

    @property
    def manifest(self) -> dict:
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist")
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a metad2a database (a file)")
        try:
            data = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a metad2a database (no {MANIFEST})") from None
        except ValueError as err:
            raise UserError(f"{self.path / MANIFEST} is damaged: {err}") from None
        # Format 1 databases (proxy labels) still read, for meta-training and `db info`.
        if data.get("format_version") not in (1, FORMAT_VERSION):
            raise UserError(f"{self.path}: database format {data.get('format_version')} is not supported")
        return data

    def identity(self) -> str:
        """Names the database's tasks (manifest and task list; records may still grow)."""
        h = hashlib.sha256()
        for name in (MANIFEST, TASKS):
            h.update((self.path / name).read_bytes())
        return h.hexdigest()

    def tasks(self) -> list[Task]:
        return [Task(**t) for t in json.loads((self.path / TASKS).read_text())]

    def record_files(self) -> list[Path]:
        return sorted(self.path.glob("records*.jsonl"))

    def records(self) -> list[Record]:
        """Every record, each (task, cell) once; torn lines from a killed builder are skipped."""
        seen: dict[tuple[str, str], Record] = {}
        for f in self.record_files():
            for line in f.read_text().splitlines():
                try:
                    r = Record(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                seen.setdefault((r.task, r.cell), r)
        return list(seen.values())

    def features(self, source: str) -> dict[str, np.ndarray]:
        """{class name: (n, F) float32} for one source."""
        from safetensors import safe_open

        path = self.path / "features" / f"{source}.safetensors"
        with safe_open(str(path), framework="np") as fh:
            classes = json.loads(fh.metadata()["classes"])
            return {c: fh.get_tensor(f"class.{i}").astype(np.float32) for i, c in enumerate(classes)}

    # -- building ------------------------------------------------------------------------------

    def check_buildable(self) -> None:
        """A database is built in a new or empty folder, or in one holding a database (which
        may also carry its README and the published table, as databases/nb201 does)."""
        ours = {"features", TASKS, MANIFEST}
        if (self.path / MANIFEST).is_file():
            ours |= {"README.md", TABLE_FILE}
        check_output_folder(self.path, lambda name: name in ours or name.startswith("records"))

    def init(self, manifest: dict, tasks: list[Task]) -> None:
        """Create the folder, or check that it was started with the same settings."""
        self.check_buildable()
        if (self.path / MANIFEST).is_file():
            old = self.manifest
            for key in ("encoder", "settings", "sources"):
                if _as_now(key, old.get(key)) != manifest.get(key):
                    raise UserError(
                        f"{self.path} was built with other {key} than asked now; "
                        "use a new folder or the original settings"
                    )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "features").mkdir(exist_ok=True)
        _write_json(self.path / TASKS, [asdict(t) for t in tasks])
        _write_json(self.path / MANIFEST, manifest)  # last: its presence means "initialised"

    @contextlib.contextmanager
    def shard_writer(self, shard: tuple[int, int]) -> Iterator[Callable[[Record], None]]:
        i, n = shard
        for other in self.path.glob("records-*of*.jsonl"):
            if not other.name.endswith(f"of{n}.jsonl"):
                raise UserError(
                    f"{self.path} already has shards of another split ({other.name}); "
                    f"use --shard i/{other.stem.split('of')[-1]} or merge first"
                )
        busy = f"another builder is writing shard {i}/{n} of {self.path}; wait for it, or give this one a different --shard"
        path = self.path / f"records-{i}of{n}.jsonl"
        with exclusive_lock(self.path / f".lock-{i}of{n}", busy), open(path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a torn line from a kill: close it off
                    fh.write(b"\n")

            def append(record: Record) -> None:
                fh.write((json.dumps(asdict(record)) + "\n").encode())
                fh.flush()
                os.fsync(fh.fileno())

            yield append

    def merge(self) -> int:
        """Join all record files into ``records.jsonl``; returns the number of records."""
        self.manifest  # noqa: B018 -- a folder that holds no database gets no records file
        shard_files = [f for f in self.record_files() if f.name != MERGED]
        for f in shard_files:
            lock_path = self.path / f".lock-{f.stem.split('records-')[-1]}"
            if lock_path.exists():
                with exclusive_lock(lock_path, f"a builder is still writing {f.name}; merge when it is done"):
                    pass
        records = sorted(self.records(), key=lambda r: (r.task, r.cell))
        with atomic_paths(self.path / MERGED) as (tmp,):
            tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
        for f in shard_files:
            f.unlink()
            (self.path / f".lock-{f.stem.split('records-')[-1]}").unlink(missing_ok=True)
        return len(records)

    def info(self) -> dict:
        manifest = self.manifest
        tasks = self.tasks()
        records = self.records()
        acc = np.array([r.accuracy for r in records]) if records else np.zeros(0)
        per_task: dict[str, int] = {}
        for r in records:
            per_task[r.task] = per_task.get(r.task, 0) + 1
        complete = sum(1 for t in tasks if per_task.get(t.id, 0) >= len(t.cells))
        devices: dict[str, int] = {}
        for r in records:  # format-1 records do not say
            devices[r.device or "unknown"] = devices.get(r.device or "unknown", 0) + 1
        sources: dict[str, int] = {}
        for t in tasks:
            if per_task.get(t.id):
                sources[t.source] = sources.get(t.source, 0) + 1
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        drawn = _as_now("settings", manifest["settings"])
        train_images = np.array([sum(map(len, t.train)) for t in tasks]) if tasks else np.zeros(1, int)
        return {
            "path": str(self.path),
            "encoder": manifest["encoder"]["identity"],
            "schedule": self.schedule.to_dict(),
            "draw": {k: v for k, v in drawn.items() if k != "schedule"},
            "train_images_per_task": {
                "min": int(train_images.min()), "median": float(np.median(train_images)), "max": int(train_images.max()),
            },
            "tasks": len(tasks),
            "tasks_complete": complete,
            "tasks_with_records": len(per_task),
            "records": len(records),
            "unique_cells": len({r.cell for r in records}),
            "tasks_per_source": sources,
            "records_per_device": devices,
            "accuracy": {
                "min": float(acc.min()) if acc.size else None,
                "median": float(np.median(acc)) if acc.size else None,
                "max": float(acc.max()) if acc.size else None,
                "histogram": np.histogram(acc, bins=10, range=(0, 100))[0].tolist() if acc.size else [],
            },
            "build_seconds": float(sum(r.seconds for r in records)),
            "size_bytes": size,
        }


def _as_now(key: str, value):
    """A manifest entry as this version records it: a schedule from before the labels'
    augmentation or learning rate was recorded trained with what every label then used, and
    settings from before ``min_task_images`` drew tasks without it."""
    if key == "settings" and isinstance(value, dict) and isinstance(value.get("schedule"), dict):
        # 0, not the field's default: that is how those tasks were drawn, whatever the default becomes
        return {"min_task_images": 0, **value, "schedule": {**LEGACY_FIELDS, **value["schedule"]}}
    return value


# -- the builder -----------------------------------------------------------------------------


def load_task_images(root: Path, files: list[list[str]], size: int):
    """A side of a task's split as fit decodes it: uint8 (N, 3, S, S), unreadable files left out."""
    from ..training.fitdata import LabeledImages, decode

    paths = [root / f for class_files in files for f in class_files]
    labels = [label for label, class_files in enumerate(files) for _ in class_files]
    decoded, _ = decode(paths, size)
    keep = [i for i, a in enumerate(decoded) if a is not None]
    images = np.stack([decoded[i] for i in keep]) if keep else np.zeros((0, 3, size, size), np.uint8)
    return LabeledImages(images, np.asarray([labels[i] for i in keep], dtype=np.int64))


def device_name(device: str) -> str:
    """What a record says made it: the GPU's name, "cpu" (float32) or "cpu bfloat16" (a CPU
    that computes bfloat16 natively trains the forward pass in it, as a GPU does)."""
    import torch

    from ..training.recipe import computes_bfloat16

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{dev.type} bfloat16" if computes_bfloat16(dev) else dev.type


def task_seed(seed: int, task_id: str) -> int:
    """The seed of a task's fits (network initialisation and batches), from the build's."""
    return seed * 1_000_003 + int(task_id[1:])


def default_chunk(device: str) -> int:
    """Cells labeled together when the user did not say: one on the CPU, 32 on a GPU."""
    import torch

    return 32 if torch.device(device).type == "cuda" else 1


@dataclass(frozen=True)
class WorkUnit:
    """A task's cells still to label: what one builder, or one Ray task, trains at a time."""

    task: Task
    root: Path  # the task's source folder, at this path on every machine that trains
    cells: tuple[str, ...]


def label_unit(unit: WorkUnit, settings: BuildSettings, device: str, chunk: int) -> Iterator[list[Record]]:
    """Label a unit's cells, ``chunk`` at a time; yields each chunk's records as they finish.

    The one place a build trains: the local builder and the Ray workers both run this.
    """
    import torch

    from ..training.labels import label_cells

    task = unit.task
    if not Path(unit.root).is_dir():
        raise UserError(
            f"source {unit.root} is not a folder on {platform.node()}; "
            "every machine that labels needs the sources at the same path"
        )
    size = settings.schedule.input_size
    train, val = load_task_images(unit.root, task.train, size), load_task_images(unit.root, task.val, size)
    dev, name = torch.device(device), device_name(device)
    for j in range(0, len(unit.cells), chunk):
        group = unit.cells[j : j + chunk]
        t0 = time.perf_counter()
        labels = label_cells([Cell.parse(c) for c in group], train, val, settings.schedule, task_seed(settings.seed, task.id), dev)
        seconds = (time.perf_counter() - t0) / len(group)
        yield [
            Record(task.id, c, round(label.accuracy, 4), round(seconds, 3), label.best_epoch,
                   [round(a, 4) for a in label.curve], name)
            for c, label in zip(group, labels)
        ]


# Runs work units somewhere and yields their records as they finish, in any order.
Runner = Callable[[Sequence[WorkUnit], BuildSettings], Iterator[list[Record]]]


def local_runner(device: str, chunk: int) -> Runner:
    """Label every unit in this process, one after another."""

    def run(units: Sequence[WorkUnit], settings: BuildSettings) -> Iterator[list[Record]]:
        for unit in units:
            yield from label_unit(unit, settings, device, chunk)

    return run


def build(
    db_path: Path,
    sources: Sequence[Path],
    settings: BuildSettings,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    chunk: int = 1,
    progress: Callable[[int, int, float], None] | None = None,
    max_tasks: int | None = None,
    feature_progress: Callable[[str, int, int], None] | None = None,
    runner: Runner | None = None,
) -> int:
    """Build (or resume) a database; returns the number of records written in this run.

    Features are encoded here on ``device``; the labels are trained by ``runner`` (by default
    in this process on ``device``, ``chunk`` cells at a time; ``meta.distributed`` has a Ray
    one). Whatever runs them, this process is the one writer of the records.
    """
    settings.validate()
    from safetensors.numpy import save_file

    from ..data.encoder import DEFAULT_RESOLUTION, ImageEncoder
    from ..data.features import encode_images
    from ..data.images import read_image_folder

    resolution = DEFAULT_RESOLUTION
    folders = {}
    for src in sources:
        src = Path(src)
        if not src.is_dir():
            raise UserError(f"source {src} is not a folder")
        folders[src.name] = read_image_folder(src)
    db = Database(db_path)
    encoder = ImageEncoder(resolution=resolution, device=device)
    tasks = draw_tasks(folders, settings)
    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": {"identity": encoder.identity, "resolution": resolution, "feature_dim": 1280},
        "settings": settings.to_dict(),
        "sources": {n: {"hash": source_hash(f), "classes": len(f.classes), "files": f.num_files} for n, f in folders.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    db.init(manifest, tasks)
    tasks = db.tasks()

    # Features: all classes of each source a task uses, encoded once per source.
    for name in sorted({t.source for t in tasks}):
        path = db.path / "features" / f"{name}.safetensors"
        if path.is_file():
            continue
        report = (lambda stage, done, total, name=name: feature_progress(f"{stage} {name}", done, total)) if feature_progress else None
        feats = encode_images(folders[name], settings.features_per_class, settings.seed, encoder, cache=True, progress=report)
        tensors = {f"class.{i}": f.astype(np.float16) for i, f in enumerate(feats.features)}
        with atomic_paths(path) as (tmp,):
            save_file(tensors, str(tmp), metadata={"classes": json.dumps(feats.classes), "encoder": feats.encoder})

    done = {(r.task, r.cell) for r in db.records()}
    i, n = shard
    mine = [t for k, t in enumerate(tasks) if k % n == i]
    if max_tasks is not None:
        mine = mine[:max_tasks]
    units = [
        WorkUnit(t, folders[t.source].root, tuple(c for c in t.cells if (t.id, c) not in done))
        for t in mine
    ]
    units = [u for u in units if u.cells]
    todo = sum(len(u.cells) for u in units)
    runner = runner or local_runner(device, chunk)
    written = 0
    t_start = time.perf_counter()
    # closing(): a runner's own clean-up (Ray cancels its tasks) runs as soon as the build
    # stops, on an error or Ctrl-C included, not whenever the generator is collected.
    with db.shard_writer(shard) as append, contextlib.closing(runner(units, settings)) as results:
        for records in results:
            for record in records:
                key = (record.task, record.cell)
                if key not in done:  # what a runner yields twice is written once
                    done.add(key)
                    append(record)
                    written += 1
            if progress:
                progress(written, todo, time.perf_counter() - t_start)
    return written
