from __future__ import annotations

import signal
import time
from pathlib import Path

import typer

from ..errors import UserError
from ..training.policies import AUGMENT_POLICIES, DEFAULT_AUGMENT, DEFAULT_LR
from .common import INTERRUPTED, console, err_console, lazy_progress, print_json


def fit(
    root: Path = typer.Argument(None, help="ROOT/<class>/<images> (or a .csv/.json list); with --resume, default: the run's folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: checkpoints, plots and fit.json go here."),
    run: str = typer.Option(None, "--run", help="Saved search run whose cell to train: its id, 'last' (the default), or a run file."),
    rank: int = typer.Option(None, "--rank", help="With --run: which ranked cell (default 1, the best)."),
    top_k: int = typer.Option(
        None, "--top-k",
        help="Train the search run's K best cells by successive halving and keep the winner: all K for the "
        "first third of the epochs, then the better half on, until one finishes; each cell's run is kept under --output.",
    ),
    arch: str = typer.Option(None, "--arch", help="Train this cell instead: a cell string or NB201 index."),
    epochs: int = typer.Option(None, "--epochs", help="Epochs of the cosine schedule (default 30)."),
    channels: int = typer.Option(None, "--channels", help="Width C of the first stage (default 16)."),
    cells: int = typer.Option(None, "--cells", help="Cells per stage N (default 5)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per step (default 256, fewer on sets under 12,800 images)."),
    lr: float = typer.Option(None, "--lr", help=f"Peak learning rate of SGD (default {DEFAULT_LR:g})."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="L2 penalty of SGD (default 5e-4)."),
    input_size: int = typer.Option(None, "--input-size", help="Images are resized to SxS (default 32)."),
    val_fraction: float = typer.Option(None, "--val-fraction", help="Share of each class held out for validation (default 0.2)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    augment: str = typer.Option(
        None, "--augment",
        help="What each training image goes through: "
        + "; ".join(f"{name}: {what}" for name, what in AUGMENT_POLICIES.items())
        + f" (default {DEFAULT_AUGMENT}).",
    ),
    seed: int = typer.Option(None, "--seed", help="Seeds the split, initial weights and augmentation (default 0)."),
    resume: bool = typer.Option(False, "--resume", help="Go on with the stopped run in --output."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Train the chosen cell's network on your images, keeping the best epoch.

    Holds out part of each class for validation, checkpoints every epoch, and leaves a
    resumable run on Ctrl-C. At the end the run folder has the best weights, a confusion
    matrix and training curves; `metad2a export --from-fit RUN_DIR` writes the trained model.

    Examples:
      metad2a search ./my_images && metad2a fit ./my_images -o runs/mine
      metad2a fit ./my_images --arch 11472 --epochs 50 --augment crop-flip -o runs/resnet
      metad2a fit --resume -o runs/mine
      metad2a fit ./my_images --run last --top-k 4 -o runs/top4 && metad2a export --from-fit runs/top4 -o best.onnx
    """
    from ..data.images import summarize
    from ..training.fit import resume_fit, start_fit
    from ..training.halving import HALVING_JSON
    from ..training.trainer import FitSettings

    settings_given = {
        "epochs": epochs, "channels": channels, "cells_per_stage": cells, "lr": lr,
        "weight_decay": weight_decay, "input_size": input_size, "val_fraction": val_fraction, "seed": seed,
        "augment": augment,
    }
    settings_given = {k: v for k, v in settings_given.items() if v is not None}
    if top_k is not None or (resume and (output / HALVING_JSON).is_file()):
        _fit_top_k(root, output, run, rank, arch, top_k, settings_given, batch_size, device, resume, as_json)
        return
    reporter = ProgressReporter()
    with reporter.bar, _ctrl_c_stops(reporter):
        if resume:
            if arch is not None or run is not None or rank is not None:  # named again: they must agree
                settings_given["cell"], _ = _chosen_cell(arch, run, rank)
            outcome = resume_fit(output, root, given=settings_given, batch_size=batch_size, device=device,
                                 reporter=reporter, decode_progress=reporter.decoding)
        else:
            if root is None:
                raise UserError("give the image folder to train on: metad2a fit ROOT -o RUN_DIR")
            cell, source = _chosen_cell(arch, run, rank)
            settings = FitSettings(cell=cell, **settings_given)
            outcome = start_fit(root, settings, output, batch_size=batch_size, device=device, source=source,
                                reporter=reporter, decode_progress=reporter.decoding)
    skipped = summarize(outcome.skipped)
    if skipped:
        err_console.print(skipped, highlight=False)
    summary = outcome.summary()
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary, outcome.record)
    if not outcome.completed:
        err_console.print(
            f"stopped after {outcome.state.epoch} of {summary['epochs']} epochs; "
            f"go on with: metad2a fit --resume -o {output}",
            highlight=False,
        )
        raise typer.Exit(INTERRUPTED)


def _fit_top_k(root, output, run, rank, arch, top_k, settings_given, batch_size, device, resume, as_json) -> None:
    from ..training.halving import resume_halving, start_halving
    from ..training.trainer import FitSettings

    if arch is not None or rank is not None:
        raise UserError(f"--top-k trains the search run's best cells; leave out {'--arch' if arch else '--rank'}")
    reporter = ProgressReporter()
    with reporter.bar, _ctrl_c_stops(reporter):
        if resume:
            if run is not None:  # named again: it must be the run the fit started from
                from ..meta.runs import load_run

                settings_given = {**settings_given, "search_run": load_run(run).id}
            outcome = resume_halving(output, root, given={**settings_given, "top_k": top_k}, batch_size=batch_size,
                                     device=device, reporter=reporter, decode_progress=reporter.decoding)
        else:
            if root is None:
                raise UserError("give the image folder to train on: metad2a fit ROOT --top-k K -o RUN_DIR")
            candidates = _top_cells(run, top_k)
            settings = FitSettings(cell=candidates[0].cell, **settings_given)
            outcome = start_halving(root, settings, candidates, output, batch_size=batch_size, device=device,
                                    reporter=reporter, decode_progress=reporter.decoding)
    summary = outcome.summary()
    if as_json:
        print_json(summary)
    else:
        _print_standings(summary)
    if not outcome.completed:
        err_console.print(f"stopped; go on with: metad2a fit --resume -o {output}", highlight=False)
        raise typer.Exit(INTERRUPTED)


def _top_cells(run: str | None, k: int):
    from ..meta.runs import load_run
    from ..training.halving import Candidate

    if k < 2:
        raise UserError(f"--top-k must be at least 2, got {k}; for one cell use --rank")
    saved = load_run(run or "last")
    if k > len(saved.ranking):
        n = len(saved.ranking)
        raise UserError(f"run {saved.id} ranks {n} cell{'s' if n != 1 else ''}; --top-k {k} asks for more")
    source = {"search_run": saved.id, "classes": list(saved.classes)}
    return [Candidate(r, str(saved.at_rank(r)), {**source, "rank": r}) for r in range(1, k + 1)]


def _print_standings(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="validation accuracy (best so far) at each rung", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("cell (NB201 #)", justify="right")
    for rung in summary["rungs"]:
        table.add_column(f"epoch {rung['epoch']}", justify="right")
    table.add_column("")
    for c in summary["cells"]:
        accs = [f"{a:.1f}%" if a is not None else "" for a in c["val_acc_per_rung"]]
        if summary["winner"] and c["rank"] == summary["winner"]["rank"]:
            status = "winner"
        elif c["out_after_rung"] is not None:
            status = f"stopped after rung {c['out_after_rung']}"
        else:
            status = "training"
        table.add_row(str(c["rank"]), str(c["nb201_index"]), *accs, status)
    console.print(table)
    console.print(
        f"{summary['budget_epochs']} epochs trained in {summary['train_seconds'] / 60:.1f} min; "
        f"each cell's run is under {summary['run_dir']}",
        highlight=False,
    )
    if summary["winner"]:
        console.print(f"export the winner with: metad2a export --from-fit {summary['run_dir']} --format onnx -o model.onnx",
                      highlight=False)


def _chosen_cell(arch: str | None, run: str | None, rank: int | None) -> tuple[str, dict]:
    """The cell to train and where it came from (a search run's classes, for start_fit's check)."""
    from ..meta.runs import load_run
    from ..nb201.cells import Cell

    if arch is not None and (run is not None or rank is not None):
        raise UserError(f"give --arch or {'--run' if run is not None else '--rank'}, not both")
    if arch is not None:
        return str(Cell.from_any(arch)), {"arch": arch}
    rank = 1 if rank is None else rank
    saved = load_run(run or "last")
    cell = saved.at_rank(rank)
    return str(cell), {"search_run": saved.id, "rank": rank, "classes": list(saved.classes)}


class ProgressReporter:
    """Draws a fit's progress on stderr; a ``trainer.Reporter`` whose stop flag Ctrl-C sets
    (duck-typed: importing the trainer here would load torch for every ``--help``)."""

    wants_steps = True

    def __init__(self):
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

        self.bar = lazy_progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=err_console, transient=False,
        )
        self.decode_task = None
        self.train_task = None
        self.training = False
        self.stop_requested = False
        self.best: float | None = None

    def decoding(self, done: int, total: int) -> None:
        if self.decode_task is None:
            self.decode_task = self.bar.add_task("reading images", total=total, info="")
        self.bar.update(self.decode_task, completed=done, total=total, info=f"{done:,}/{total:,}")

    # trainer.Reporter's methods

    def start(self, info: dict) -> None:
        self.info = info
        self.training = True
        self.best = None  # a top-k fit starts one run after another
        self.t0 = time.perf_counter()
        n, epochs = info["num_train"], info["epochs"]
        self.done_before = info["epoch"] * n + info["seen"]
        err_console.print(
            f"training {info['cell']} ({info['parameters'] / 1e6:.2f} M parameters) on {n:,} images "
            f"of {info['classes']} classes, validating on {info['num_val']:,} · batch {info['batch_size']} · {info['device']}",
            highlight=False,
        )
        self.train_task = self.bar.add_task(
            f"epoch {info['epoch'] + 1}/{epochs}", total=epochs * n, completed=self.done_before, info=""
        )

    def step(self, epoch: int, seen: int, num_train: int, loss: float | None) -> None:
        done = epoch * num_train + seen
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.done_before) / elapsed if elapsed > 0 else 0.0
        best = f" · best val {self.best:.1f}%" if self.best is not None else ""
        self.bar.update(
            self.train_task, completed=done, description=f"epoch {epoch + 1}/{self.info['epochs']}",
            info=f"loss {loss:.3f}{best} · {rate:,.0f} img/s",
        )

    def epoch(self, entry: dict) -> None:
        self.best = entry["val_acc"] if self.best is None else max(self.best, entry["val_acc"])
        rate = entry["images_per_s"] or 0.0
        self.bar.console.print(
            f"epoch {entry['epoch']:>3}: train loss {entry['train_loss']:.3f} acc {entry['train_acc']:5.1f}% · "
            f"val loss {entry['val_loss']:.3f} acc {entry['val_acc']:5.1f}%"
            f"{' (best)' if entry['best'] else ''} · {rate:,.0f} img/s",
            highlight=False,
        )

    def note(self, message: str) -> None:
        self.bar.console.print(f"note: {message}", highlight=False)

    def should_stop(self) -> bool:
        return self.stop_requested


class _ctrl_c_stops:
    """While training, the first Ctrl-C asks for a checkpoint and a stop; a second one quits."""

    def __init__(self, reporter: ProgressReporter):
        self.reporter = reporter

    def _handler(self, signum, frame) -> None:
        if not self.reporter.training or self.reporter.stop_requested:
            raise KeyboardInterrupt
        self.reporter.stop_requested = True
        self.reporter.bar.console.print("stopping: saving a checkpoint (Ctrl-C again quits at once)", highlight=False)

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _print_summary(summary: dict, record: dict) -> None:
    if summary["best_epoch"] is None:
        return
    console.print(
        f"best validation accuracy {summary['best_val_acc']:.1f}% at epoch {summary['best_epoch']} "
        f"(last epoch {summary['last_val_acc']:.1f}%), {summary['num_val']:,} validation images",
        highlight=False,
    )
    result = record.get("result")
    if result:
        worst = sorted((kv for kv in result["per_class_acc"].items() if kv[1] < 100.0), key=lambda kv: kv[1])[:5]
        if worst:
            console.print("weakest classes: " + ", ".join(f"{c} {a:.0f}%" for c, a in worst), highlight=False)
    for name, path in summary["files"].items():
        console.print(f"  {path}", highlight=False)
    if summary["completed"]:
        console.print(f"export it with: metad2a export --from-fit {summary['run_dir']} --format onnx -o model.onnx",
                      highlight=False)
