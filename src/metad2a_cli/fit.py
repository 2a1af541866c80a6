"""Train a cell's full network on the user's images (``metad2a fit``).

The recipe follows NAS-Bench-201's: SGD with Nesterov momentum 0.9, weight decay 5e-4,
learning rate 0.1 annealed to zero on a cosine, random crop (zero padding S/8) and
horizontal flip. The whole training set sits on the device as uint8 and is augmented
there, so a GPU never waits for a data loader; on a GPU the forward pass runs in bfloat16
with channels-last tensors.

A run folder holds everything a run needs to go on or be exported:

    fit.json                settings, the split, history and result (for people and tools)
    last.safetensors        weights, momentum and progress, written every epoch and on Ctrl-C
    best.safetensors        weights of the epoch with the best validation accuracy
    validation.safetensors  the validation images (uint8), so export can check accuracy
    confusion.png, curves.png

Randomness is a function of (seed, epoch, position in the epoch), never of a generator's
running state, so a run stopped anywhere and resumed (even with another batch size)
continues exactly; with the same batch size on the CPU it ends bit-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .atomic import atomic_paths
from .errors import UserError
from .fitdata import LabeledImages, Split, decode_split_side, split_and_decode
from .images import Skipped, read_image_folder
from .network import Network, NetworkConfig, count_parameters
from .space import Cell

FORMAT_VERSION = 1
FIT_JSON = "fit.json"
LAST = "last.safetensors"
BEST = "best.safetensors"
VALIDATION = "validation.safetensors"
CONFUSION_PNG = "confusion.png"
CURVES_PNG = "curves.png"
RUN_FILES = (FIT_JSON, LAST, BEST, VALIDATION, CONFUSION_PNG, CURVES_PNG)
MAX_DEFAULT_BATCH = 256


@dataclass(frozen=True)
class FitSettings:
    """What fixes a run; a resumed run must keep all of it (the batch size is not here)."""

    cell: str
    channels: int = 16
    cells_per_stage: int = 5
    input_size: int = 32
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_fraction: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        Cell.parse(self.cell)
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must not be negative, got {self.weight_decay}")
        self.network_config(2).validate()

    def network_config(self, num_classes: int) -> NetworkConfig:
        return NetworkConfig(
            num_classes=num_classes,
            channels=self.channels,
            cells_per_stage=self.cells_per_stage,
            in_channels=3,
            input_size=(self.input_size, self.input_size),
        )


def default_batch_size(num_train: int) -> int:
    """NAS-Bench-201's 256, made smaller on small sets so an epoch has about ten steps."""
    return max(2, min(MAX_DEFAULT_BATCH, num_train // 10))


class TrainedNetwork(nn.Module):
    """A ``Network`` that takes RGB in [0, 1] and applies the training set's normalisation."""

    def __init__(self, cell: Cell, config: NetworkConfig, mean: list[float], std: list[float]):
        super().__init__()
        self.net = Network(cell, config)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def cell(self) -> Cell:
        return self.net.cell

    @property
    def config(self) -> NetworkConfig:
        return self.net.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, S, S) in [0, 1] -> logits (B, classes)
        return self.net((x - self.mean) / self.std)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [0, 1]: what a trained network takes."""
    return images.float().mul_(1.0 / 255.0)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"metad2a-fit/{seed}/{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class EpochPlan:
    """An epoch's randomness, drawn up front: image order, crop offsets, flips."""

    order: torch.Tensor  # (N,) int64
    offsets: torch.Tensor  # (N, 2) int64, in [0, 2 * pad]
    flips: torch.Tensor  # (N,) bool

    @classmethod
    def draw(cls, seed: int, epoch: int, n: int, pad: int, device: torch.device | str = "cpu") -> EpochPlan:
        # Drawn on the CPU (the same on every device), then copied once: a copy from pageable
        # host memory every step would wait for the GPU and leave it idle between steps.
        g = _epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        return cls(order.to(device), offsets.to(device), flips.to(device))


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image random crop of the zero-padded image, then an optional mirror, in one gather.

    images: (B, C, S, S) any dtype; offsets: (B, 2) row/column start in the padded image.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def cosine_lr(base: float, progress: float) -> float:
    """progress: the fraction of all training images seen, 0..1."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EpochStats:
    """Running sums of the epoch in progress (kept in checkpoints, so a resume loses none)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0


@dataclass
class FitState:
    """Everything about a run that changes as it trains."""

    batch_size: int
    epoch: int = 0  # completed epochs
    seen: int = 0  # training images consumed in the epoch in progress
    running: EpochStats = field(default_factory=EpochStats)
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"epoch", "val_acc", "val_loss"}
    completed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FitState:
        data = dict(data)
        data["running"] = EpochStats(**data["running"])
        return cls(**data)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float  # percent
    confusion: np.ndarray  # (K, K): rows true class, columns predicted


class Reporter:
    """What a fit tells its caller; the CLI draws progress, tests can stop a run."""

    def start(self, info: dict) -> None: ...

    def step(self, epoch: int, seen: int, num_train: int, loss: float | None) -> None: ...

    def epoch(self, entry: dict) -> None: ...

    def note(self, message: str) -> None: ...

    def should_stop(self) -> bool:
        return False


# -- devices ---------------------------------------------------------------------------------


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_format(device: torch.device) -> torch.memory_format:
    # Channels-last lets cuDNN pick its tensor-core kernels for bfloat16 convolutions.
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the run folder --------------------------------------------------------------------------


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return (self / FIT_JSON).is_file()

    def prepare_new(self) -> None:
        """Make the folder; refuse one that holds a fit or anything that is not ours."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} is a file; give a folder for the run")
        if self.exists():
            raise UserError(f"{self.path} already holds a fit; add --resume to go on with it, or choose another folder")
        if self.path.is_dir():
            foreign = sorted(p.name for p in self.path.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
            if foreign:
                raise UserError(f"{self.path} is not empty ({foreign[0]}, ...); give a new or empty folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {self.path}: {err.strerror}") from err

    def read_record(self) -> dict:
        if not self.exists():
            raise UserError(f"{self.path} holds no fit (no {FIT_JSON}); run `metad2a fit ROOT -o {self.path}` first")
        try:
            record = json.loads((self / FIT_JSON).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{self / FIT_JSON} is unreadable ({err})") from err
        if record.get("format") != FORMAT_VERSION:
            raise UserError(f"{self / FIT_JSON} has format {record.get('format')!r}; this metad2a reads {FORMAT_VERSION}")
        return record

    def write_record(self, record: dict) -> None:
        with atomic_paths(self / FIT_JSON) as (tmp,):
            tmp.write_text(json.dumps(record, indent=2) + "\n")

    def check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise UserError(
                f"not enough free disk for the run in {self.path}: it needs about "
                f"{needed / 1e6:.0f} MB, {free / 1e6:.0f} MB are free"
            )


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_paths(path) as (tmp,):
        save_file(flat, str(tmp), metadata={"json": json.dumps(metadata)})


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as err:  # safetensors raises several types for a damaged file
        raise UserError(f"{path} is damaged or not a metad2a checkpoint ({err})") from err


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Plain contiguous tensors: channels-last weights would be saved in NCHW order anyway.
    return {k: v.contiguous() for k, v in model.state_dict().items()}


# -- training --------------------------------------------------------------------------------


class Trainer:
    """One run: a model, its optimiser and its data on one device."""

    def __init__(
        self,
        settings: FitSettings,
        classes: list[str],
        mean: list[float],
        std: list[float],
        train: LabeledImages,
        val: LabeledImages,
        state: FitState,
        device: torch.device,
        reporter: Reporter,
    ):
        self.settings, self.classes, self.state, self.device = settings, classes, state, device
        self.reporter = reporter
        self.pad = max(1, settings.input_size // 8)
        config = settings.network_config(len(classes))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.model = TrainedNetwork(Cell.parse(settings.cell), config, mean, std)
        self.model.to(device, memory_format=_memory_format(device))
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=True,
            weight_decay=settings.weight_decay,
        )
        self.train_x = torch.from_numpy(train.images).to(device)
        self.train_y = torch.from_numpy(train.labels).to(device)
        self.val_x = torch.from_numpy(val.images).to(device)
        self.val_y = torch.from_numpy(val.labels).to(device)

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    # -- checkpoints

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in _model_state(self.model).items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, st in self.optimizer.state.items():
            if "momentum_buffer" in st and st["momentum_buffer"] is not None:
                tensors[f"momentum.{names[id(p)]}"] = st["momentum_buffer"].contiguous()
        return tensors

    def load_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model)
        params = dict(self.model.named_parameters())
        for k, v in tensors.items():
            if k.startswith("momentum."):
                p = params[k[9:]]
                buf = v.to(self.device).to(memory_format=_memory_format(self.device) if v.dim() == 4 else torch.contiguous_format)
                self.optimizer.state[p]["momentum_buffer"] = buf

    def checkpoint_bytes(self) -> int:
        return 4 * 2 * count_parameters(self.model)

    # -- steps

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step; returns (summed loss, correct count) as device tensors (no sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _autocast(self.device):
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach() * len(labels), (logits.argmax(1) == labels).sum()

    def _batch(self, plan: EpochPlan, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = plan.order[start:stop]
        images = crop_and_flip(self.train_x[idx], plan.offsets[start:stop], plan.flips[start:stop], self.pad)
        images = to_unit(images).contiguous(memory_format=_memory_format(self.device))
        return images, self.train_y[idx]

    def _halve_batch(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        _free_device_memory(self.device)
        old = self.state.batch_size
        if old < 4:
            raise UserError(f"out of GPU memory even at batch size {old} while {what}; free the GPU or use --device cpu")
        self.state.batch_size = old // 2
        self.reporter.note(f"out of GPU memory at batch size {old} while {what}; going on with {self.state.batch_size}")

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> Evaluation:
        """Validation loss, accuracy and confusion matrix, in float32 (autocast off)."""
        model = self.model if model is None else model
        model.eval()
        k = len(self.classes)
        loss_sum = torch.zeros((), device=self.device)
        pairs = torch.zeros(k * k, dtype=torch.int64, device=self.device)
        start = 0
        while start < len(self.val_y):
            stop = start + 2 * self.state.batch_size
            try:
                x = to_unit(self.val_x[start:stop]).contiguous(memory_format=_memory_format(self.device))
                logits = model(x).float()
            except torch.cuda.OutOfMemoryError:
                self._halve_batch("validating")
                continue
            y = self.val_y[start:stop]
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            pairs += torch.bincount(y * k + logits.argmax(1), minlength=k * k)
            start = stop
        model.train()
        confusion = pairs.view(k, k).cpu().numpy()
        n = max(1, len(self.val_y))
        return Evaluation(float(loss_sum) / n, 100.0 * float(np.trace(confusion)) / n, confusion)

    def run_epoch(self) -> bool:
        """Train from the saved position to the end of the epoch; False when asked to stop."""
        st, n = self.state, self.num_train
        plan = EpochPlan.draw(self.settings.seed, st.epoch, n, self.pad, self.device)
        self.model.train()
        t0 = time.perf_counter()
        loss_acc = torch.zeros((), device=self.device)
        correct_acc = torch.zeros((), dtype=torch.int64, device=self.device)
        last_report = 0.0

        def flush() -> None:
            nonlocal loss_acc, correct_acc, t0
            st.running.loss_sum += float(loss_acc)
            st.running.correct += int(correct_acc)
            st.running.seconds += time.perf_counter() - t0
            loss_acc.zero_()
            correct_acc.zero_()
            t0 = time.perf_counter()

        while st.seen < n:
            if self.reporter.should_stop():
                flush()
                return False
            stop = min(n, st.seen + st.batch_size)
            if stop - st.seen < 2 and st.seen > 0:
                st.seen = n  # batch norm needs two images; a lone last one sits this epoch out
                break
            lr = cosine_lr(self.settings.lr, (st.epoch + st.seen / n) / self.settings.epochs)
            try:
                images, labels = self._batch(plan, st.seen, stop)
                loss, correct = self.train_step(images, labels, lr)
            except torch.cuda.OutOfMemoryError:
                self._halve_batch("training")
                continue
            loss_acc += loss
            correct_acc += correct
            st.running.count += stop - st.seen
            st.seen = stop
            now = time.perf_counter()
            if now - last_report > 0.25 or st.seen == n:
                last_report = now
                # The only host sync of a step, and only a few times a second.
                shown = (st.running.loss_sum + float(loss_acc)) / max(1, st.running.count)
                self.reporter.step(st.epoch, st.seen, n, shown)
        flush()
        return True

    def finish_epoch(self) -> tuple[dict, Evaluation]:
        st = self.state
        ev = self.evaluate()
        r = st.running
        entry = {
            "epoch": st.epoch + 1,
            "train_loss": r.loss_sum / max(1, r.count),
            "train_acc": 100.0 * r.correct / max(1, r.count),
            "val_loss": ev.loss,
            "val_acc": ev.accuracy,
            "lr": cosine_lr(self.settings.lr, (st.epoch + 1) / self.settings.epochs),
            "seconds": r.seconds,
            "images_per_s": r.count / r.seconds if r.seconds > 0 else None,
            "batch_size": st.batch_size,
        }
        st.history.append(entry)
        st.epoch += 1
        st.seen = 0
        st.running = EpochStats()
        st.completed = st.epoch >= self.settings.epochs
        return entry, ev


# -- the run ---------------------------------------------------------------------------------


@dataclass
class FitOutcome:
    run_dir: Path
    completed: bool
    state: FitState
    record: dict
    skipped: list[Skipped]

    def summary(self) -> dict:
        best = self.state.best or {}
        last = self.state.history[-1] if self.state.history else {}
        return {
            "run_dir": str(self.run_dir),
            "completed": self.completed,
            "epochs_done": self.state.epoch,
            "epochs": self.record["settings"]["epochs"],
            "best_epoch": best.get("epoch"),
            "best_val_acc": best.get("val_acc"),
            "last_val_acc": last.get("val_acc"),
            "cell": self.record["settings"]["cell"],
            "classes": self.record["dataset"]["classes"],
            "num_train": self.record["dataset"]["num_train"],
            "num_val": self.record["dataset"]["num_val"],
            "files": {
                name: str(self.run_dir / name)
                for name in (BEST, LAST, CONFUSION_PNG, CURVES_PNG, FIT_JSON)
                if (self.run_dir / name).exists()
            },
        }


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.astype(np.float64) / 255.0  # (N, 3, S, S)
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
    return [float(v) for v in mean], [float(v) for v in std]


def _save_progress(run: RunFolder, trainer: Trainer, record: dict) -> None:
    """last.safetensors holds the truth (progress in its metadata); fit.json mirrors it."""
    save_tensors(run / LAST, trainer.checkpoint_tensors(), {"state": trainer.state.to_dict()})
    record["state"] = trainer.state.to_dict()
    run.write_record(record)


def _save_best(run: RunFolder, trainer: Trainer, record: dict) -> None:
    meta = {
        "best": trainer.state.best,
        "settings": record["settings"],
        "classes": record["dataset"]["classes"],
    }
    save_tensors(run / BEST, _model_state(trainer.model), meta)


def _finish(run: RunFolder, trainer: Trainer, record: dict) -> None:
    """After the last epoch: evaluate the best weights, draw the plots, record the result."""
    from . import plots

    tensors, _ = load_tensors(run / BEST)
    best = TrainedNetwork(trainer.model.cell, trainer.model.config, [0.0] * 3, [1.0] * 3)
    best.load_state_dict(tensors)
    best.to(trainer.device, memory_format=_memory_format(trainer.device))
    ev = trainer.evaluate(best)
    classes = record["dataset"]["classes"]
    per_class = ev.confusion.diagonal() / np.maximum(1, ev.confusion.sum(1))
    record["result"] = {
        "best_epoch": trainer.state.best["epoch"],
        "val_acc": ev.accuracy,
        "val_loss": ev.loss,
        "per_class_acc": {c: 100.0 * float(a) for c, a in zip(classes, per_class)},
        "confusion": ev.confusion.tolist(),
    }
    plots.confusion(ev.confusion, classes, run / CONFUSION_PNG, title=f"validation, epoch {trainer.state.best['epoch']}: {ev.accuracy:.1f}%")
    plots.curves(trainer.state.history, run / CURVES_PNG)
    run.write_record(record)


def start_fit(
    root: Path,
    settings: FitSettings,
    run_dir: Path,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    source: dict | None = None,
    reporter: Reporter | None = None,
    decode_progress: Callable[[int, int], None] | None = None,
) -> FitOutcome:
    """Train ``settings.cell``'s network on the images under ``root``, in a new run folder.

    Returns when the run completes or when ``reporter.should_stop()`` says so; either way
    the folder holds a checkpoint that ``resume_fit`` goes on from.
    """
    settings.validate()
    if batch_size is not None and batch_size < 2:
        raise UserError(f"--batch-size must be at least 2, got {batch_size}")
    dev = _device(device)
    run = RunFolder(run_dir)
    run.prepare_new()
    folder = read_image_folder(root)
    split, train, val, bad = split_and_decode(folder, settings.val_fraction, settings.input_size, settings.seed, decode_progress)
    skipped = list(folder.skipped) + bad
    classes = list(folder.classes)
    mean, std = _channel_stats(train.images)
    state = FitState(batch_size=batch_size or default_batch_size(len(train)))
    record = {
        "format": FORMAT_VERSION,
        "producer": f"metad2a {__version__}",
        "settings": asdict(settings),
        "source": source or {"arch": settings.cell},
        "dataset": {
            "root": str(folder.root.resolve()),
            "classes": classes,
            "num_train": len(train),
            "num_val": len(val),
            "mean": mean,
            "std": std,
            "skipped": len(skipped),
            "split": split.to_dict(),
        },
        "device": str(dev),
    }
    trainer = Trainer(settings, classes, mean, std, train, val, state, dev, reporter or Reporter())
    # Two checkpoints with their temporary copies, the validation images and the plots.
    run.check_free_space(4 * trainer.checkpoint_bytes() + val.images.nbytes + 8_000_000)
    save_tensors(run / VALIDATION, {"images": torch.from_numpy(val.images), "labels": torch.from_numpy(val.labels)}, {})
    _save_progress(run, trainer, record)
    return _train(run, trainer, record, skipped)


def resume_fit(
    run_dir: Path,
    root: Path | None = None,
    *,
    given: dict | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
    decode_progress: Callable[[int, int], None] | None = None,
) -> FitOutcome:
    """Go on with a stopped run from its last checkpoint, on the same images.

    ``given`` holds settings the user named again; any that differ from the run's are an
    error. ``root`` defaults to the folder the run was started on.
    """
    reporter = reporter or Reporter()
    dev = _device(device)
    run = RunFolder(run_dir)
    record = run.read_record()
    settings = FitSettings(**record["settings"])
    _check_same_settings(given or {}, settings)
    root = Path(record["dataset"]["root"]) if root is None else Path(root)
    folder = read_image_folder(root)
    classes = record["dataset"]["classes"]
    if list(folder.classes) != classes:
        raise UserError(_class_difference(root, list(folder.classes), classes))
    split = Split.from_dict(record["dataset"]["split"])
    train = decode_split_side(folder.root, split.train, settings.input_size, decode_progress)
    val_tensors, _ = load_tensors(run / VALIDATION)
    val = LabeledImages(val_tensors["images"].numpy(), val_tensors["labels"].numpy())
    tensors, meta = load_tensors(run / LAST)
    state = FitState.from_dict(meta["state"])
    if batch_size is not None and batch_size != state.batch_size:
        if batch_size < 2:
            raise UserError(f"--batch-size must be at least 2, got {batch_size}")
        reporter.note(f"batch size {batch_size} from here on (the run used {state.batch_size})")
        state.batch_size = batch_size
    mean, std = record["dataset"]["mean"], record["dataset"]["std"]
    trainer = Trainer(settings, classes, mean, std, train, val, state, dev, reporter)
    trainer.load_checkpoint(tensors)
    record["device"] = str(dev)
    return _train(run, trainer, record, list(folder.skipped))


def _device(device: str) -> torch.device:
    from .encoder import resolve_device
    from .fitdata import workers

    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(workers())
    return dev


def _train(run: RunFolder, trainer: Trainer, record: dict, skipped: list[Skipped]) -> FitOutcome:
    state, settings, reporter = trainer.state, trainer.settings, trainer.reporter
    reporter.start({
        "cell": settings.cell,
        "classes": len(trainer.classes),
        "num_train": trainer.num_train,
        "num_val": len(trainer.val_y),
        "epochs": settings.epochs,
        "epoch": state.epoch,
        "seen": state.seen,
        "batch_size": state.batch_size,
        "device": str(trainer.device),
        "parameters": count_parameters(trainer.model.net),
    })
    while not state.completed:
        if not trainer.run_epoch():
            _save_progress(run, trainer, record)
            return FitOutcome(run.path, False, state, record, skipped)
        entry, ev = trainer.finish_epoch()
        if state.best is None or ev.accuracy > state.best["val_acc"]:
            state.best = {"epoch": entry["epoch"], "val_acc": ev.accuracy, "val_loss": ev.loss}
            _save_best(run, trainer, record)
        entry["best"] = state.best["epoch"] == entry["epoch"]
        _save_progress(run, trainer, record)
        reporter.epoch(entry)
    if "result" not in record or not (run / CURVES_PNG).exists():
        _finish(run, trainer, record)
    return FitOutcome(run.path, True, state, record, skipped)


def _check_same_settings(given: dict, saved: FitSettings) -> None:
    """A resumed run keeps its settings: one the user names with another value is a mistake."""
    for name, value in given.items():
        if value is None or value == getattr(saved, name):
            continue
        if name == "cell":
            raise UserError(f"the run trains {saved.cell}, not {value}; a resumed run keeps its cell")
        flag = "--" + {"cells_per_stage": "cells"}.get(name, name.replace("_", "-"))
        raise UserError(f"{flag} {value} differs from the run's {getattr(saved, name)}; a resumed run keeps its settings")


def _class_difference(root: Path, found: list[str], expected: list[str]) -> str:
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if extra:
        parts.append(f"new {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
    detail = "; ".join(parts) or "same names, other order"
    return f"{root} has other classes than the run ({detail}); resume with the folder the run was started on"


# -- loading a fitted run --------------------------------------------------------------------


@dataclass
class FittedModel:
    network: TrainedNetwork  # the best epoch's weights, eval mode, on the CPU
    classes: list[str]
    val: LabeledImages
    record: dict


def load_fitted(run_dir: Path) -> FittedModel:
    run = RunFolder(run_dir)
    record = run.read_record()
    if not (run / BEST).is_file():
        raise UserError(f"{run.path} has no finished epoch yet (no {BEST}); resume the fit first")
    settings = FitSettings(**record["settings"])
    classes = record["dataset"]["classes"]
    net = TrainedNetwork(Cell.parse(settings.cell), settings.network_config(len(classes)), [0.0] * 3, [1.0] * 3)
    tensors, _ = load_tensors(run / BEST)
    net.load_state_dict(tensors)
    val_tensors, _ = load_tensors(run / VALIDATION)
    val = LabeledImages(val_tensors["images"].numpy(), val_tensors["labels"].numpy())
    return FittedModel(net.eval(), classes, val, record)


def _logits(predict: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch: int = 256) -> torch.Tensor:
    x = torch.from_numpy(images)
    with torch.no_grad():
        return torch.cat([predict(to_unit(x[i : i + batch])).float() for i in range(0, len(x), batch)])


def accuracy_check(fitted: FittedModel, tie_margin: float = 1e-3):
    """A check for ``export_network``: the export must classify the validation set as the
    fitted network does. Only images whose top two logits lie within ``tie_margin`` may
    flip, since float rounding differs between runtimes."""
    from .export import ExportCheckError

    labels = torch.from_numpy(fitted.val.labels)
    reference = _logits(fitted.network, fitted.val.images)
    top2 = reference.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) <= tie_margin

    def validate(predict) -> dict:
        exported = _logits(predict, fitted.val.images)
        flipped = exported.argmax(1) != reference.argmax(1)
        if bool((flipped & ~near_tie).any()):
            raise ExportCheckError(
                f"the exported model classifies {int((flipped & ~near_tie).sum())} validation image(s) "
                "differently from the fitted network; the file was not written"
            )
        n = max(1, len(labels))
        return {
            "val_images": len(labels),
            "val_acc_fitted": 100.0 * float((reference.argmax(1) == labels).sum()) / n,
            "val_acc_exported": 100.0 * float((exported.argmax(1) == labels).sum()) / n,
            "val_flipped_near_ties": int(flipped.sum()),
        }

    return validate


def export_fitted(run_dir: Path, fmt: str, path: Path):
    """Write a fit's best network; it must reproduce the fit's validation predictions."""
    from .export import export_network

    fitted = load_fitted(run_dir)
    settings, dataset = fitted.record["settings"], fitted.record["dataset"]
    best = (fitted.record.get("state") or {}).get("best") or {}
    meta = {
        "classes": fitted.classes,
        "preprocessing": {
            "input": f"RGB resized to {settings['input_size']}x{settings['input_size']} (no crop), values in [0, 1]",
            "normalisation": "inside the model",
            "mean": dataset["mean"],
            "std": dataset["std"],
        },
        "fit": {"epoch": best.get("epoch"), "val_acc": best.get("val_acc"), "num_train": dataset["num_train"]},
    }
    return export_network(fitted.network, fmt, path, meta=meta, validate=accuracy_check(fitted))
