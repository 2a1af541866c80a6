"""A run of a cell's network, or of several cells' networks in lockstep, on in-memory images.

The recipe (optimiser, schedule, augmentation, precision) is ``recipe``'s; this module
runs it: a ``Trainer`` owns the model, its optimiser and the images on one device, steps
through epochs from any saved position, and evaluates. ``fit`` trains one network with it;
the database's labels (``labels``) train many cells at once with it, so a label is what
``fit`` would report for that cell.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..nb201.cells import Cell
from ..nb201.network import Network, NetworkConfig, count_parameters
from .augment import make_policy
from .fitdata import LabeledImages
from .recipe import (
    CHANNELS_LAST,
    EpochPlan,
    NesterovSGD,
    autocast,
    cosine_lr,
    members_loss,
    to_unit,
)
from .policies import DEFAULT_AUGMENT, DEFAULT_LR, LEGACY_AUGMENT, check_policy


@dataclass(frozen=True)
class FitSettings:
    """What fixes a run; a resumed run must keep all of it (the batch size is not here)."""

    cell: str
    channels: int = 16
    cells_per_stage: int = 5
    input_size: int = 32
    epochs: int = 30
    lr: float = DEFAULT_LR
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_fraction: float = 0.2
    seed: int = 0
    augment: str = DEFAULT_AUGMENT

    @classmethod
    def from_record(cls, settings: dict) -> FitSettings:
        """The settings a fit.json records; one from before ``augment`` was recorded trained
        with the policy every fit then used."""
        return cls(**{"augment": LEGACY_AUGMENT, **settings})

    def validate(self) -> None:
        Cell.parse(self.cell)
        check_policy(self.augment)
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise UserError(f"--weight-decay must be a finite number, at least 0, got {self.weight_decay}")
        self.network_config(2).validate()

    def network_config(self, num_classes: int) -> NetworkConfig:
        return NetworkConfig(
            num_classes=num_classes,
            channels=self.channels,
            cells_per_stage=self.cells_per_stage,
            in_channels=3,
            input_size=(self.input_size, self.input_size),
        )


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

    # Reading the running loss for ``step`` is a host sync; a caller that shows nothing says so.
    wants_steps = True

    def step(self, epoch: int, seen: int, num_train: int, loss: float | None) -> None: ...

    def epoch(self, entry: dict) -> None: ...

    def note(self, message: str) -> None: ...

    def should_stop(self) -> bool:
        return False


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def new_network(cell: Cell, config: NetworkConfig, mean: list[float], std: list[float], seed: int) -> TrainedNetwork:
    """A cell's network as a run with this seed starts it (the same weights every time)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TrainedNetwork(cell, config, mean, std)


class Trainer:
    """One run on one device: a model, its optimiser and its images.

    The model maps images in [0, 1] to logits (B, classes), or (K, B, classes) for K
    networks trained in lockstep on the same batches; each network's loss is its own mean
    cross-entropy, so each learns as it would alone. With ``cuda_graph`` the training step
    (batch gather, augmentation, forward, backward, update) is captured once per batch size
    and replayed: small networks at small batches otherwise leave a GPU waiting on Python.
    """

    def __init__(
        self,
        settings: FitSettings,
        model: nn.Module,
        classes: list[str],
        train: LabeledImages,
        val: LabeledImages,
        state: FitState,
        device: torch.device,
        reporter: Reporter,
        cuda_graph: bool = False,
    ):
        self.settings, self.classes, self.state, self.device = settings, classes, state, device
        self.reporter = reporter
        self.policy = make_policy(settings.augment, settings.input_size)
        self.model = model.to(device, memory_format=CHANNELS_LAST)
        self.optimizer = NesterovSGD(list(self.model.parameters()), settings.momentum, settings.weight_decay)
        self.use_graph = cuda_graph and device.type == "cuda"
        self._graphs: dict[int, tuple] = {}  # batch size -> (graph, static inputs, static outputs)
        self._eager_steps = 0
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
        for (name, _), buf in zip(self.model.named_parameters(), self.optimizer.buffers):
            tensors[f"momentum.{name}"] = buf.contiguous()
        return tensors

    def load_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model)
        for (name, _), buf in zip(self.model.named_parameters(), self.optimizer.buffers):
            if f"momentum.{name}" in tensors:
                buf.copy_(tensors[f"momentum.{name}"])

    def checkpoint_bytes(self) -> int:
        return 4 * 2 * count_parameters(self.model)

    # -- steps

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step at the optimiser's current rate; returns (summed loss, correct count)
        as device tensors, summed over the networks (no host sync)."""
        with autocast(self.device):
            logits = self.model(images)
        loss = members_loss(logits, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        correct = (logits.reshape(-1, *logits.shape[-2:]).argmax(-1) == labels).sum()
        return loss.detach() * len(labels), correct

    def _batch(self, order: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.policy.apply(self.train_x[order], *params)
        return to_unit(images).contiguous(memory_format=CHANNELS_LAST), self.train_y[order]

    def _step(self, plan: EpochPlan, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = plan.batch(start, stop)
        size = stop - start
        if self.use_graph and size == self.state.batch_size:
            if size in self._graphs:
                graph, static, outputs = self._graphs[size]
                for buf, value in zip(static, inputs):
                    buf.copy_(value)
                graph.replay()
                return outputs
            if self._eager_steps >= 2:  # kernels chosen and memory settled by two eager steps
                return self._capture(inputs)
            self._eager_steps += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.train_step(*self._batch(*inputs))
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self.train_step(*self._batch(*inputs))

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        static = tuple(x.clone() for x in inputs)
        self.optimizer.zero_grad()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.train_step(*self._batch(*static))
        self._graphs[len(static[0])] = (graph, static, outputs)
        graph.replay()  # capturing ran nothing: this is the step itself
        return outputs

    def _halve_batch(self, what: str) -> None:
        self.optimizer.zero_grad()
        self._graphs.clear()
        _free_device_memory(self.device)
        old = self.state.batch_size
        if old < 4:
            raise UserError(f"out of GPU memory even at batch size {old} while {what}; free the GPU or use --device cpu")
        self.state.batch_size = old // 2
        self.reporter.note(f"out of GPU memory at batch size {old} while {what}; going on with {self.state.batch_size}")

    @torch.no_grad()
    def evaluate_members(self, model: nn.Module | None = None) -> list[Evaluation]:
        """Each network's validation loss, accuracy and confusion matrix, in float32."""
        model = self.model if model is None else model
        model.eval()
        n = len(self.classes)
        loss_sum = pairs = None
        start = 0
        while start < len(self.val_y):
            stop = start + 2 * self.state.batch_size
            try:
                x = to_unit(self.val_x[start:stop]).contiguous(memory_format=CHANNELS_LAST)
                logits = model(x).float()
            except torch.cuda.OutOfMemoryError:
                self._halve_batch("validating")
                continue
            logits = logits.reshape(-1, *logits.shape[-2:])  # (K, B, classes)
            k, y = logits.shape[0], self.val_y[start:stop]
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none")
            cells = (torch.arange(k, device=self.device)[:, None] * n + y) * n + logits.argmax(-1)  # (K, B)
            batch_pairs = torch.bincount(cells.flatten(), minlength=k * n * n)
            loss_sum = losses.view(k, -1).sum(1) if loss_sum is None else loss_sum + losses.view(k, -1).sum(1)
            pairs = batch_pairs if pairs is None else pairs + batch_pairs
            start = stop
        model.train()
        count = max(1, len(self.val_y))
        if pairs is None:  # no validation images
            return [Evaluation(0.0, 0.0, np.zeros((n, n), dtype=np.int64))]
        confusion = pairs.view(-1, n, n).cpu().numpy()
        losses = (loss_sum / count).tolist()
        return [Evaluation(loss, 100.0 * float(np.trace(c)) / count, c) for loss, c in zip(losses, confusion)]

    def evaluate(self, model: nn.Module | None = None) -> Evaluation:
        """The (first) network's validation loss, accuracy and confusion matrix."""
        return self.evaluate_members(model)[0]

    def run_epoch(self) -> bool:
        """Train from the saved position to the end of the epoch; False when asked to stop."""
        steps = self.epoch_steps()
        while True:
            try:
                next(steps)
            except StopIteration as end:
                return end.value

    def epoch_steps(self) -> Iterator[None]:
        """``run_epoch`` a step at a time: yields after each step is queued, and returns its
        result. Several trainers can so take turns, each on its own CUDA stream."""
        st, n = self.state, self.num_train
        plan = EpochPlan.draw(self.settings.seed, st.epoch, n, self.policy, self.device)
        self.model.train()
        t0 = time.perf_counter()
        loss_acc = torch.zeros((), device=self.device)
        correct_acc = torch.zeros((), dtype=torch.int64, device=self.device)
        last_report = 0.0

        def flush() -> None:
            nonlocal t0
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
            self.optimizer.lr.fill_(cosine_lr(self.settings.lr, (st.epoch + st.seen / n) / self.settings.epochs))
            try:
                loss, correct = self._step(plan, st.seen, stop)
            except torch.cuda.OutOfMemoryError:
                self._halve_batch("training")
                continue
            loss_acc += loss
            correct_acc += correct
            st.running.count += stop - st.seen
            st.seen = stop
            yield
            now = time.perf_counter()
            if self.reporter.wants_steps and (now - last_report > 0.25 or st.seen == n):
                last_report = now
                # The only host sync of a step, and only a few times a second.
                shown = (st.running.loss_sum + float(loss_acc)) / max(1, st.running.count)
                self.reporter.step(st.epoch, st.seen, n, shown)
        flush()
        return True

    def close_epoch(self, ev: Evaluation) -> dict:
        """Record a finished epoch (``ev``: its validation) and move the state to the next."""
        st = self.state
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
        return entry

    def finish_epoch(self) -> tuple[dict, Evaluation]:
        ev = self.evaluate()
        return self.close_epoch(ev), ev


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Plain contiguous tensors: channels-last weights would be saved in NCHW order anyway.
    return {k: v.contiguous() for k, v in model.state_dict().items()}
