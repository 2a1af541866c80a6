"""Published full-training accuracies of every cell: a dataset-independent teacher.

NAS-Bench-201 trained all 15,625 cells' networks for 200 epochs on ImageNet16-120 (and on
CIFAR-10 / CIFAR-100, which this project keeps for evaluation only). Rankings from full
training agree across datasets, so the ImageNet16-120 table teaches the predictor's
dataset-independent term; the database's tasks teach what depends on the dataset.

The file is a CSV with columns ``nb201_index``, ``arch_str`` and an accuracy column; every
row is checked against the cell's own index, so a table in another order is refused.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..nb201.cells import NUM_CELLS, Cell, CellError

TABLE_FILE = "imagenet16_120.csv"


@dataclass(frozen=True)
class PublishedTable:
    codes: np.ndarray  # (N,) Cell.code of each row
    accuracy: np.ndarray  # (N,) percent
    source: str

    def __len__(self) -> int:
        return len(self.codes)


def load_table(path: Path) -> PublishedTable:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise UserError(f"cannot read the accuracy table {path}: {err.strerror or err}") from None
    if not rows:
        raise UserError(f"{path} has no rows")
    columns = [c for c in rows[0] if c not in ("nb201_index", "arch_str")]
    if "arch_str" not in rows[0] or len(columns) != 1:
        raise UserError(f"{path}: expected columns nb201_index, arch_str and one accuracy column")
    codes, accuracy = [], []
    for line, row in enumerate(rows, start=2):
        try:
            cell = Cell.parse(row["arch_str"])
            acc = float(row[columns[0]])
        except (CellError, ValueError, TypeError) as err:
            raise UserError(f"{path}, line {line}: {err}") from None
        if row.get("nb201_index") not in (None, "") and int(row["nb201_index"]) != cell.index:
            raise UserError(f"{path}, line {line}: index {row['nb201_index']} is not {cell}'s ({cell.index})")
        if not np.isfinite(acc):
            raise UserError(f"{path}, line {line}: accuracy {row[columns[0]]!r} is not a number")
        codes.append(cell.code)
        accuracy.append(acc)
    if len(set(codes)) != len(codes):
        raise UserError(f"{path} lists a cell twice")
    if len(codes) > NUM_CELLS:
        raise UserError(f"{path} has more rows than cells")
    return PublishedTable(np.array(codes), np.array(accuracy, dtype=np.float64), f"{path.name}:{columns[0]}")
