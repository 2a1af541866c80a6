"""One training run of a cell's network: NAS-Bench-201's recipe on in-memory images.

The recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4, learning rate 0.1 annealed
to zero on a cosine, random crop (zero padding S/8) and horizontal flip. The whole training
set sits on the device as uint8 and is augmented there, so a GPU never waits for a data
loader. Tensors are channels-last; on a GPU the forward pass runs in bfloat16.

Randomness is a function of (seed, epoch, position in the epoch), never of a generator's
running state, so a run stopped anywhere and resumed (even with another batch size)
continues exactly; with the same batch size on the CPU it ends bit-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nb201.cells import Cell
from ..nb201.network import Network, NetworkConfig, count_parameters
from .fitdata import LabeledImages

MAX_DEFAULT_BATCH = 256
MIN_DEFAULT_BATCH = 16


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
    """NAS-Bench-201's 256, made smaller on small sets so an epoch has about fifty steps.

    With 2,400 training images (fashion_mnist, 15 epochs, the ResNet cell) batch 48 reached
    85.7% validation accuracy against 80.3% at batch 240 (ten steps an epoch): docs/fit.md.
    """
    return max(MIN_DEFAULT_BATCH, min(MAX_DEFAULT_BATCH, num_train // 50))


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


# Channels-last everywhere: cuDNN picks its tensor-core kernels for it on a GPU, and on the
# 2-core development CPU a training step of the default network ran 1.29x faster (oneDNN).
CHANNELS_LAST = torch.channels_last


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
        self.model.to(device, memory_format=CHANNELS_LAST)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=True,
            weight_decay=settings.weight_decay,
        )
        try:
            self.train_x = torch.from_numpy(train.images).to(device)
            self.train_y = torch.from_numpy(train.labels).to(device)
            self.val_x = torch.from_numpy(val.images).to(device)
            self.val_y = torch.from_numpy(val.labels).to(device)
        except torch.cuda.OutOfMemoryError as err:
            size = (train.images.nbytes + val.images.nbytes) / 1e9
            raise UserError(
                f"the images ({size:.1f} GB at {settings.input_size}x{settings.input_size}) do not fit in GPU "
                "memory; use a smaller --input-size or --device cpu"
            ) from err

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    # -- checkpoints

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in model_state(self.model).items()}
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
                buf = v.to(self.device).to(memory_format=CHANNELS_LAST if v.dim() == 4 else torch.contiguous_format)
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
        images = to_unit(images).contiguous(memory_format=CHANNELS_LAST)
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
                x = to_unit(self.val_x[start:stop]).contiguous(memory_format=CHANNELS_LAST)
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


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Plain contiguous tensors: channels-last weights would be saved in NCHW order anyway.
    return {k: v.contiguous() for k, v in model.state_dict().items()}
