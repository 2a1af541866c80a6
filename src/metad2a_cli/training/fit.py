"""Train a cell's full network on the user's images (``metad2a fit``), and export it.

A run folder holds everything a run needs to go on or be exported:

    fit.json                settings, the split, history and result (for people and tools)
    last.safetensors        weights, momentum and progress, written every epoch and on a stop
    best.safetensors        weights of the epoch with the best validation accuracy
    validation.safetensors  the validation images (uint8), so export can check accuracy
    confusion.png, curves.png

The training itself is ``trainer.Trainer``; this module handles the folder, starting,
resuming and finishing a run.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..atomic import atomic_paths, check_output_folder, exclusive_lock
from ..data.images import Skipped, read_image_folder
from ..errors import UserError
from ..nb201.cells import Cell
from ..nb201.network import count_parameters
from .fitdata import (
    LabeledImages,
    Split,
    channel_stats,
    decode_split_side,
    split_and_decode,
)
from .recipe import CHANNELS_LAST, default_batch_size, to_unit
from .trainer import (
    FitSettings,
    FitState,
    Reporter,
    TrainedNetwork,
    Trainer,
    model_state,
    new_network,
)

FORMAT_VERSION = 1
FIT_JSON = "fit.json"
LAST = "last.safetensors"
BEST = "best.safetensors"
VALIDATION = "validation.safetensors"
CONFUSION_PNG = "confusion.png"
CURVES_PNG = "curves.png"
RUN_FILES = (FIT_JSON, LAST, BEST, VALIDATION, CONFUSION_PNG, CURVES_PNG)
LOCK = ".lock"  # held by the fit writing the folder


# -- the run folder --------------------------------------------------------------------------


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return (self / FIT_JSON).is_file()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a fit writes the folder: a second fit into it is refused, not lost."""
        busy = f"another fit is running in {self.path}; wait for it to end or choose another folder"
        with exclusive_lock(self / LOCK, busy):
            yield

    @contextlib.contextmanager
    def claim_new(self) -> Iterator[None]:
        """Make the folder and hold its lock; refuse one that holds a fit or anything not ours.
        A fit that fails before its first save (a user mistake, most often) takes away the
        folder it made, so that the same command, corrected, can run into it."""
        check_output_folder(self.path, lambda name: name in RUN_FILES)
        made = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {self.path}: {err.strerror}") from err
        try:
            with self.locked():
                if self.exists():  # asked under the lock: a fit started just before has written it
                    raise UserError(f"{self.path} already holds a fit; add --resume to go on with it, or choose another folder")
                yield
        except BaseException:
            if made and not self.exists():
                shutil.rmtree(self.path, ignore_errors=True)
            raise

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


def _load_validation(run: RunFolder) -> LabeledImages:
    tensors, _ = load_tensors(run / VALIDATION)
    return LabeledImages(tensors["images"].numpy(), tensors["labels"].numpy())


def _load_best(run: RunFolder, settings: FitSettings, num_classes: int) -> TrainedNetwork:
    """The best epoch's network (its normalisation comes with the weights), on the CPU."""
    net = TrainedNetwork(Cell.parse(settings.cell), settings.network_config(num_classes), [0.0] * 3, [1.0] * 3)
    tensors, _ = load_tensors(run / BEST)
    net.load_state_dict(tensors)
    return net


def _is_finished(run: RunFolder, record: dict) -> bool:
    """The result and plots are written: nothing left to do for this run."""
    return "result" in record and (run / CURVES_PNG).exists()


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 2:
        raise UserError(f"--batch-size must be at least 2, got {batch_size}")


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
                for name in (BEST, LAST, VALIDATION, CONFUSION_PNG, CURVES_PNG, FIT_JSON)
                if (self.run_dir / name).exists()
            },
        }


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
    save_tensors(run / BEST, model_state(trainer.model), meta)


def _finish(run: RunFolder, trainer: Trainer, record: dict) -> None:
    """After the last epoch: evaluate the best weights, draw the plots, record the result."""
    from . import plots

    classes = record["dataset"]["classes"]
    best = _load_best(run, trainer.settings, len(classes)).to(trainer.device, memory_format=CHANNELS_LAST)
    ev = trainer.evaluate(best)
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
    the folder holds a checkpoint that ``resume_fit`` goes on from. ``source`` (recorded in
    fit.json) says where the cell came from; a search run's ``classes`` there that differ
    from the folder's get a note.
    """
    settings.validate()
    _check_batch_size(batch_size)
    reporter = reporter or Reporter()
    dev = _device(device)
    run = RunFolder(run_dir)
    with run.claim_new():
        folder = read_image_folder(root)
        searched = (source or {}).get("classes")
        if searched and list(searched) != list(folder.classes):
            reporter.note(
                f"search run {source['search_run']} was made on other classes than {root}'s; "
                "its cell was picked for that dataset"
            )
        split, train, val, bad = split_and_decode(folder, settings.val_fraction, settings.input_size, settings.seed, decode_progress)
        skipped = list(folder.skipped) + bad
        classes = list(folder.classes)
        mean, std = channel_stats(train.images)
        state = FitState(batch_size=batch_size or default_batch_size(len(train)))
        record = {
            "format": FORMAT_VERSION,
            "producer": f"metad2a {__version__}",
            "settings": asdict(settings),
            "source": source or {"arch": settings.cell},
            "dataset": {
                "root": str(Path(root).resolve()),  # as given: a folder, or a .csv/.json list
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
        trainer = Trainer(settings, _network(settings, classes, mean, std), classes, train, val, state, dev, reporter)
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
    run.read_record()  # a folder with no fit: say so, and leave no lock file in it
    with run.locked():
        record = run.read_record()  # again under the lock: as the last fit left it
        settings = FitSettings.from_record(record["settings"])
        record["settings"] = asdict(settings)  # an old record gains the policy it trained with
        check_same_settings(given or {}, settings)
        tensors, meta = load_tensors(run / LAST)
        state = FitState.from_dict(meta["state"])
        if state.completed and _is_finished(run, record):
            return FitOutcome(run.path, True, state, record, [])  # finished: nothing to read or train
        root = Path(record["dataset"]["root"]) if root is None else Path(root)
        folder = read_image_folder(root)
        classes = record["dataset"]["classes"]
        if list(folder.classes) != classes:
            raise UserError(_class_difference(root, list(folder.classes), classes))
        split = Split.from_dict(record["dataset"]["split"])
        train = decode_split_side(folder.root, split.train, settings.input_size, decode_progress)
        val = _load_validation(run)
        _check_batch_size(batch_size)
        if batch_size is not None and batch_size != state.batch_size:
            reporter.note(f"batch size {batch_size} from here on (the run used {state.batch_size})")
            state.batch_size = batch_size
        mean, std = record["dataset"]["mean"], record["dataset"]["std"]
        trainer = Trainer(settings, _network(settings, classes, mean, std), classes, train, val, state, dev, reporter)
        trainer.load_checkpoint(tensors)
        record["device"] = str(dev)
        return _train(run, trainer, record, list(folder.skipped))


def _network(settings: FitSettings, classes: list[str], mean: list[float], std: list[float]) -> TrainedNetwork:
    return new_network(Cell.parse(settings.cell), settings.network_config(len(classes)), mean, std, settings.seed)


def _device(device: str) -> torch.device:
    from ..data.encoder import resolve_device, use_all_cores

    dev = resolve_device(device)
    if dev.type == "cpu":
        use_all_cores()
    return dev


def _train(run: RunFolder, trainer: Trainer, record: dict, skipped: list[Skipped]) -> FitOutcome:
    state, settings, reporter = trainer.state, trainer.settings, trainer.reporter
    if not state.completed:
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
            _check_finite(run, state.epoch + 1, state.running.loss_sum)
            _save_progress(run, trainer, record)
            return FitOutcome(run.path, False, state, record, skipped)
        entry, ev = trainer.finish_epoch()
        _check_finite(run, entry["epoch"], entry["train_loss"], ev.loss)
        if state.best is None or ev.accuracy > state.best["val_acc"]:
            state.best = {"epoch": entry["epoch"], "val_acc": ev.accuracy, "val_loss": ev.loss}
            _save_best(run, trainer, record)
        entry["best"] = state.best["epoch"] == entry["epoch"]
        _save_progress(run, trainer, record)
        reporter.epoch(entry)
    if not _is_finished(run, record):
        _finish(run, trainer, record)
    return FitOutcome(run.path, True, state, record, skipped)


def _check_finite(run: RunFolder, epoch: int, *losses: float) -> None:
    """A NaN or infinite loss means the weights are lost: stop before they overwrite the
    last checkpoint, which then still holds the last good epoch."""
    bad = next((x for x in losses if not math.isfinite(x)), None)
    if bad is not None:
        raise UserError(
            f"training diverged in epoch {epoch} (loss {bad}); lower --lr. {run / LAST} keeps "
            "the last checkpoint before it"
        )


def check_same_settings(given: dict, saved: FitSettings) -> None:
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
    classes = record["dataset"]["classes"]
    net = _load_best(run, FitSettings.from_record(record["settings"]), len(classes))
    return FittedModel(net.eval(), classes, _load_validation(run), record)


def _logits(predict: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch: int = 256) -> torch.Tensor:
    x = torch.from_numpy(images)
    with torch.no_grad():
        return torch.cat([predict(to_unit(x[i : i + batch])).float() for i in range(0, len(x), batch)])


def accuracy_check(fitted: FittedModel, tie_margin: float = 1e-3):
    """A check for ``export_network``: the export must classify the validation set as the
    fitted network does. Only images whose top two logits lie within ``tie_margin`` may
    flip, since float rounding differs between runtimes."""
    from ..nb201.export import ExportCheckError

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


def export_fitted(run_dir: Path, fmt: str, path: Path, overwrite: bool = True):
    """Write a fit's best network; it must reproduce the fit's validation predictions."""
    from ..nb201.export import export_network

    fitted = load_fitted(run_dir)
    settings, dataset = asdict(FitSettings.from_record(fitted.record["settings"])), fitted.record["dataset"]
    best = (fitted.record.get("state") or {}).get("best") or {}
    meta = {
        "classes": fitted.classes,
        "preprocessing": {
            "input": f"RGB resized to {settings['input_size']}x{settings['input_size']} (no crop), values in [0, 1]",
            "normalisation": "inside the model",
            "mean": dataset["mean"],
            "std": dataset["std"],
        },
        "fit": {
            "epoch": best.get("epoch"),
            "val_acc": best.get("val_acc"),
            "num_train": dataset["num_train"],
            "augment": settings["augment"],
        },
    }
    return export_network(fitted.network, fmt, path, meta=meta, validate=accuracy_check(fitted), overwrite=overwrite)
