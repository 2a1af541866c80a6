"""Train a search's top K cells and keep the best, by successive halving (``fit --top-k``).

Every candidate is an ordinary fit with the full schedule, in its own run folder under the
halving's folder. All K train to the first rung's epoch; the better half (by the best
validation accuracy so far, the figure fit keeps) goes on to the next rung, and so on until
one finishes the schedule. A candidate that goes on is resumed from its checkpoint, so the
winner's run is the fit it would have been alone; all candidates share the seed, and so the
split and the batches. The first cut comes a third of the way through the schedule (half
way when there is only one cut) and the later rungs lie evenly on a log scale from it to E:
for K=5 and 30 epochs, 5 cells train 10 epochs, 3 go on to 14, 2 to 21 and 1 to 30 (85
epochs in all, against 150 to fit all five). Earlier cuts are cheaper but blind: replayed on
the 30-epoch database's learning curves (``benchmarks/halving_rungs.py``), a first cut at
epoch 4 kept a cell 1.3 points under the best of five on average, one at epoch 10 0.4.

    halving.json        the plan (settings, candidates, rungs) and, after each rung, the standings
    rank01-11472/ ...   each candidate's run folder (``fit``'s), named by search rank and NB201 index

What happened is read back from the candidates' own fit.json files, never from a separate
record, so a run stopped anywhere goes on with ``resume_halving`` to the same end.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .._version import __version__
from ..atomic import atomic_paths
from ..errors import UserError
from ..nb201.cells import Cell
from .fit import CURVES_PNG, FitOutcome, RunFolder, check_same_settings, resume_fit, start_fit
from .trainer import FitSettings, Reporter

FORMAT_VERSION = 1
HALVING_JSON = "halving.json"


@dataclass(frozen=True)
class Rung:
    epoch: int  # the candidates' schedule position at this rung
    cells: int  # how many candidates train to it


def halving_counts(k: int) -> list[int]:
    """Cells at each rung: k, then half of them (rounded up) until one is left."""
    counts = [k]
    while counts[-1] > 1:
        counts.append(math.ceil(counts[-1] / 2))
    return counts


def log_rungs(epochs: int, k: int, first: int) -> list[Rung]:
    """All k cells to epoch ``first``, then ``halving_counts``, the rungs' epochs evenly
    spaced on a log scale from ``first`` to ``epochs``."""
    counts = halving_counts(k)
    cuts = len(counts) - 1
    return [Rung(round(first * (epochs / first) ** (i / cuts)), n) for i, n in enumerate(counts)]


def plan_rungs(epochs: int, k: int) -> list[Rung]:
    """The first cut a third of the way through (half way when it is the only cut)."""
    cuts = len(halving_counts(k)) - 1
    return log_rungs(epochs, k, math.ceil(epochs / min(2**cuts, 3)))


def stopped_after(rungs: list[Rung], rung_acc: list[list[float | None]]) -> list[int | None]:
    """For candidates in search order, each with its best validation accuracy up to every
    rung's epoch (None where it has not got there yet): the rung (0-based) after which each
    stopped, None for those still in. At each cut the best go on, ties to the better rank."""
    out: list[int | None] = [None] * len(rung_acc)
    alive = list(range(len(rung_acc)))
    for i, following in enumerate(rungs[1:]):
        if any(rung_acc[j][i] is None for j in alive):
            break  # this rung is still being trained
        keep = sorted(alive, key=lambda j: (-rung_acc[j][i], j))[: following.cells]
        for j in alive:
            if j not in keep:
                out[j] = i
        alive = keep
    return out


def distinct_epochs(rungs: list[Rung]) -> bool:
    return len({r.epoch for r in rungs}) == len(rungs)


def budget_epochs(rungs: list[Rung]) -> int:
    """Epochs of training over all candidates (one epoch of one candidate counts 1)."""
    done, total = 0, 0
    for rung in rungs:
        total += rung.cells * (rung.epoch - done)
        done = rung.epoch
    return total


@dataclass(frozen=True)
class Candidate:
    rank: int  # in the search
    cell: str
    source: dict  # recorded in the candidate's fit.json

    @property
    def folder(self) -> str:
        return f"rank{self.rank:02d}-{Cell.parse(self.cell).index}"


@dataclass(frozen=True)
class Standing:
    """A candidate as its run folder shows it."""

    candidate: Candidate
    history: list[dict]  # its fit's epochs so far
    completed: bool  # finished its schedule, result written
    rung_acc: list[float | None]  # best validation accuracy up to each rung's epoch, if reached
    out_after: int | None  # the rung (0-based) after which it stopped, if it did

    def to_dict(self, run_dir: Path) -> dict:
        return {
            "rank": self.candidate.rank,
            "cell": self.candidate.cell,
            "nb201_index": Cell.parse(self.candidate.cell).index,
            "run_dir": str(run_dir / self.candidate.folder),
            "epochs_done": len(self.history),
            "val_acc_per_rung": self.rung_acc,
            "best_val_acc": max((e["val_acc"] for e in self.history), default=None),
            "out_after_rung": None if self.out_after is None else self.out_after + 1,
            "completed": self.completed,
            "train_seconds": sum(e["seconds"] for e in self.history),
        }


@dataclass
class Halving:
    """A halving's folder and plan."""

    path: Path
    root: Path
    settings: FitSettings  # the candidates' settings but the cell
    candidates: list[Candidate]
    rungs: list[Rung]
    batch_size: int | None

    @property
    def file(self) -> Path:
        return self.path / HALVING_JSON

    def fit_settings(self, candidate: Candidate) -> FitSettings:
        return replace(self.settings, cell=candidate.cell)

    def to_dict(self) -> dict:
        settings = asdict(self.settings)
        del settings["cell"]
        return {
            "format": FORMAT_VERSION,
            "producer": f"metad2a {__version__}",
            "root": str(self.root),
            "settings": settings,
            "batch_size": self.batch_size,
            "candidates": [asdict(c) for c in self.candidates],
            "rungs": [asdict(r) for r in self.rungs],
        }

    @classmethod
    def read(cls, path: Path) -> Halving:
        file = Path(path) / HALVING_JSON
        if not file.is_file():
            raise UserError(f"{path} holds no top-k fit (no {HALVING_JSON})")
        try:
            data = json.loads(file.read_text())
            if data.get("format") != FORMAT_VERSION:
                raise UserError(f"{file} has format {data.get('format')!r}; this metad2a reads {FORMAT_VERSION}")
            return cls(
                Path(path), Path(data["root"]), FitSettings.from_record({"cell": "", **data["settings"]}),
                [Candidate(**c) for c in data["candidates"]], [Rung(**r) for r in data["rungs"]], data["batch_size"],
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{file} is unreadable ({err})") from err

    def write(self, standings: list[Standing] | None = None) -> None:
        data = self.to_dict()
        if standings is not None:
            data["standings"] = [s.to_dict(self.path) for s in standings]
        with atomic_paths(self.file) as (tmp,):
            tmp.write_text(json.dumps(data, indent=2) + "\n")

    def standings(self) -> list[Standing]:
        """Each candidate's progress, and the rung it stopped at, from its run folder."""
        histories, completed = {}, {}
        for c in self.candidates:
            run = RunFolder(self.path / c.folder)
            record = run.read_record() if run.exists() else {}
            histories[c.rank] = (record.get("state") or {}).get("history", [])
            completed[c.rank] = "result" in record

        def best_until(c: Candidate, epoch: int) -> float | None:
            history = histories[c.rank]
            return max(e["val_acc"] for e in history[:epoch]) if len(history) >= epoch else None

        rung_acc = [[best_until(c, r.epoch) for r in self.rungs] for c in self.candidates]
        out_after = stopped_after(self.rungs, rung_acc)
        return [
            Standing(c, histories[c.rank], completed[c.rank], acc, out)
            for c, acc, out in zip(self.candidates, rung_acc, out_after)
        ]

    def winner(self, standings: list[Standing]) -> Standing | None:
        """The candidate that finished the schedule after the last rung, once it has."""
        left = [s for s in standings if s.out_after is None]
        if len(left) == 1 and left[0].completed:
            return left[0]
        return None


@dataclass
class HalvingOutcome:
    halving: Halving
    standings: list[Standing]
    winner: Standing | None

    @property
    def completed(self) -> bool:
        return self.winner is not None

    def summary(self) -> dict:
        h = self.halving
        return {
            "run_dir": str(h.path),
            "completed": self.completed,
            "rungs": [asdict(r) for r in h.rungs],
            "budget_epochs": budget_epochs(h.rungs),
            "epochs_all_in_full": len(h.candidates) * h.settings.epochs,
            "train_seconds": sum(s.to_dict(h.path)["train_seconds"] for s in self.standings),
            "winner": self.winner.to_dict(h.path) if self.winner else None,
            "cells": [s.to_dict(h.path) for s in self.standings],
        }


class _UntilEpoch(Reporter):
    """Passes a fit's reports on to ``inner``, and stops the fit once ``until`` epochs are done."""

    def __init__(self, inner: Reporter, until: int):
        self.inner, self.until, self.done = inner, until, False

    def start(self, info: dict) -> None:
        self.done = info["epoch"] >= self.until
        self.inner.start(info)

    def step(self, epoch, seen, num_train, loss) -> None:
        self.inner.step(epoch, seen, num_train, loss)

    def epoch(self, entry: dict) -> None:
        self.done = entry["epoch"] >= self.until
        self.inner.epoch(entry)

    def note(self, message: str) -> None:
        self.inner.note(message)

    def should_stop(self) -> bool:
        return self.done or self.inner.should_stop()


def start_halving(
    root: Path,
    settings: FitSettings,
    candidates: list[Candidate],
    run_dir: Path,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
    decode_progress: Callable[[int, int], None] | None = None,
) -> HalvingOutcome:
    """Successive halving over ``candidates`` (in search order) with ``settings`` (its cell
    is ignored), in a new folder ``run_dir``."""
    if len(candidates) < 2:
        raise UserError("--top-k needs at least 2 cells; for one, use --rank")
    settings = replace(settings, cell=candidates[0].cell)
    settings.validate()
    rungs = plan_rungs(settings.epochs, len(candidates))
    if not distinct_epochs(rungs):  # a rung that trains no further would only drop cells unseen
        least = next(e for e in itertools.count(settings.epochs + 1) if distinct_epochs(plan_rungs(e, len(candidates))))
        raise UserError(f"--epochs {settings.epochs} is too few to halve {len(candidates)} cells; "
                        f"give --epochs {least} or more, or a smaller --top-k")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a folder for the run")
    if (path / HALVING_JSON).is_file():
        raise UserError(f"{path} already holds a top-k fit; add --resume to go on with it, or choose another folder")
    if path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir()):
        raise UserError(f"{path} is not empty; give a new or empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {path}: {err.strerror}") from err
    halving = Halving(path, Path(root).resolve(), settings, candidates, rungs, batch_size)
    halving.write()
    return _run(halving, None, device, reporter or Reporter(), decode_progress)


def resume_halving(
    run_dir: Path,
    root: Path | None = None,
    *,
    given: dict | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
    decode_progress: Callable[[int, int], None] | None = None,
) -> HalvingOutcome:
    """Go on with a stopped halving; ``given`` are settings named again (they must agree)."""
    halving = Halving.read(run_dir)
    given = dict(given or {})
    top_k = given.pop("top_k", None)
    if top_k is not None and top_k != len(halving.candidates):
        raise UserError(f"--top-k {top_k} differs from the run's {len(halving.candidates)}; a resumed run keeps its settings")
    search_run, started_from = given.pop("search_run", None), halving.candidates[0].source.get("search_run")
    if search_run is not None and search_run != started_from:
        raise UserError(f"search run {search_run} is not the one this fit started from ({started_from}); "
                        "a resumed run keeps its candidates")
    check_same_settings(given, halving.fit_settings(halving.candidates[0]))
    if root is not None:
        halving.root = Path(root)
    if batch_size is not None:
        halving.batch_size = batch_size
    return _run(halving, batch_size, device, reporter or Reporter(), decode_progress)


def describe_plan(halving: Halving) -> str:
    k, epochs = len(halving.candidates), halving.settings.epochs
    steps = ", ".join(f"{r.cells} to epoch {r.epoch}" for r in halving.rungs)
    return (
        f"successive halving of the search's top {k} cells: {steps}; {budget_epochs(halving.rungs)} epochs of "
        f"training in all (all {k} in full: {k * epochs}; the first alone: {epochs})"
    )


def _run(halving: Halving, new_batch: int | None, device: str, reporter: Reporter, decode_progress) -> HalvingOutcome:
    settings = halving.settings
    reporter.note(describe_plan(halving))
    for i, rung in enumerate(halving.rungs):
        standings = halving.standings()
        alive = [s for s in standings if s.out_after is None or s.out_after >= i]
        # Behind: short of the rung, or at the end of the schedule with the result unwritten.
        behind = [s for s in alive if len(s.history) < rung.epoch or (rung.epoch == settings.epochs and not s.completed)]
        for s in behind:
            c = s.candidate
            first = min(len(s.history) + 1, rung.epoch)
            epochs = f"epoch {first}" if first == rung.epoch else f"epochs {first}-{rung.epoch}"
            reporter.note(
                f"rank {c.rank} (NB201 #{Cell.parse(c.cell).index}): {epochs} of {settings.epochs} "
                f"(rung {i + 1} of {len(halving.rungs)})"
            )
            outcome = _advance(halving, c, rung.epoch, new_batch, device, _UntilEpoch(reporter, rung.epoch), decode_progress)
            if outcome.state.epoch < rung.epoch:  # stopped by the user
                standings = halving.standings()
                halving.write(standings)
                return HalvingOutcome(halving, standings, None)
        standings = halving.standings()
        halving.write(standings)
        out = [s for s in standings if s.out_after == i]
        if out and behind:  # decided just now (a resumed run does not repeat old news)
            _draw_curves(halving, out)
            kept = [s for s in standings if s.out_after is None]
            reporter.note(
                f"after epoch {rung.epoch}: "
                + ", ".join(f"rank {s.candidate.rank} {s.rung_acc[i]:.1f}%" for s in kept)
                + " go on; "
                + ", ".join(f"rank {s.candidate.rank} {s.rung_acc[i]:.1f}%" for s in out)
                + " stop here"
            )
    standings = halving.standings()
    return HalvingOutcome(halving, standings, halving.winner(standings))


def _advance(halving: Halving, c: Candidate, epoch: int, new_batch, device, reporter, decode_progress) -> FitOutcome:
    """Train candidate ``c``'s fit on to ``epoch`` (it stops there unless that is the end)."""
    folder = halving.path / c.folder
    if not RunFolder(folder).exists():
        return start_fit(halving.root, halving.fit_settings(c), folder, batch_size=halving.batch_size, device=device,
                         source=c.source, reporter=reporter, decode_progress=decode_progress)
    return resume_fit(folder, halving.root, batch_size=new_batch, device=device, reporter=reporter,
                      decode_progress=decode_progress)


def _draw_curves(halving: Halving, stopped: list[Standing]) -> None:
    """A candidate that stops early never reaches fit's finish, which draws the curves."""
    from . import plots

    for s in stopped:
        path = halving.path / s.candidate.folder / CURVES_PNG
        if s.history and not path.exists():
            plots.curves(s.history, path)


def fitted_run_dir(path: Path) -> Path:
    """The fit to export from ``path``: itself, or a finished halving's winner."""
    if not (Path(path) / HALVING_JSON).is_file():
        return Path(path)
    halving = Halving.read(path)
    winner = halving.winner(halving.standings())
    if winner is None:
        raise UserError(f"the top-k fit in {path} has not finished; go on with: metad2a fit --resume -o {path}")
    return halving.path / winner.candidate.folder
