"""Saved search runs: ``<cache>/runs/<id>.json`` plus a ``last`` pointer file.

A run records what a search ranked, so later commands (``export --run``) can use a cell
without repeating the search. ``search`` writes them; this module reads them.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_paths
from ..errors import UserError
from ..nb201.cells import Cell
from ..paths import runs_dir

LAST = "last"


@dataclass(frozen=True)
class SavedRank:
    rank: int
    cell: Cell


@dataclass(frozen=True)
class SavedRun:
    id: str
    path: Path
    num_classes: int
    ranking: tuple[SavedRank, ...]
    classes: tuple[str, ...] = ()  # the searched folder's class names

    def at_rank(self, rank: int) -> Cell:
        for entry in self.ranking:
            if entry.rank == rank:
                return entry.cell
        raise UserError(f"run {self.id} has ranks 1..{len(self.ranking)}; no rank {rank}")


def resolve_run_path(run: str, root: Path | None = None) -> Path:
    """A run id, ``last``, or the path of a run file."""
    root = runs_dir() if root is None else root
    candidate = Path(run)
    if candidate.suffix == ".json" and candidate.is_file():
        return candidate
    if run == LAST:
        pointer = root / LAST
        if not pointer.is_file():
            raise UserError(f"no saved search run in {root}; run `metad2a search ROOT` first")
        run = pointer.read_text().strip()
    path = root / f"{run}.json"
    if not path.is_file():
        raise UserError(f"no saved search run {run!r} in {root}")
    return path


def load_run(run: str, root: Path | None = None) -> SavedRun:
    path = resolve_run_path(run, root)
    try:
        data = json.loads(path.read_text())
        ranking = tuple(
            SavedRank(rank=int(e["rank"]), cell=Cell.parse(e["cell"])) for e in data["ranking"]
        )
        dataset = data["dataset"]
        return SavedRun(
            id=str(data["id"]),
            path=path,
            num_classes=int(dataset["num_classes"]),
            ranking=ranking,
            classes=tuple(str(c) for c in dataset.get("classes", ())),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"saved run {path} is damaged ({err}); run the search again") from err


def save_run(document: dict, root: Path | None = None) -> tuple[str, Path]:
    """Write a search run as ``<id>.json`` and point ``last`` at it; returns (id, path).

    ``document`` must hold ``dataset.num_classes`` and ``ranking`` (rank, cell, ...), which
    is what ``load_run`` reads back.
    """
    root = runs_dir() if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
    path = root / f"{run_id}.json"
    with atomic_paths(path, root / LAST) as (tmp, tmp_last):
        tmp.write_text(json.dumps({"id": run_id, **document}, indent=2) + "\n")
        tmp_last.write_text(run_id + "\n")
    return run_id, path
