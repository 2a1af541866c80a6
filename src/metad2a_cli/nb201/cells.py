"""The NAS-Bench-201 search space: cells, their string form and their benchmark index.

A cell is a DAG over 4 nodes; each of the 6 edges ``j <- i`` (i < j) carries one of 5
operations. Node 0 is the cell input, node 3 its output. The canonical string lists the
edges node by node: ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``.

This module imports no torch, so the CLI can parse and validate cells instantly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from ..errors import UserError

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# (target node, source node) for the 6 edges, in the order of the canonical string.
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
NUM_CELLS = len(OPS) ** len(EDGES)  # 15,625

# NAS-Bench-201 enumerated all cells in lexicographic order of (edge ops, first edge most
# significant), then shuffled that list with Python's random module seeded with 88; the
# benchmark's files are in that shuffled order. Reproducing it lets users look a cell up.
_BENCHMARK_SHUFFLE_SEED = 88


class CellError(UserError):
    """A cell string or index that does not describe a NAS-Bench-201 cell."""


@dataclass(frozen=True, order=True)
class Cell:
    """One NAS-Bench-201 cell: an operation index (into ``OPS``) per edge of ``EDGES``."""

    ops: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.ops) != len(EDGES):
            raise CellError(f"a cell has {len(EDGES)} edges, got {len(self.ops)} operations")
        for op in self.ops:
            if not (isinstance(op, int) and 0 <= op < len(OPS)):
                raise CellError(f"operation index {op!r} is not in 0..{len(OPS) - 1}")

    # -- string form --------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Cell:
        """Parse the canonical string; errors name the part that is wrong."""
        text = text.strip()
        groups = text.split("+")
        if len(groups) != 3:
            raise CellError(
                f"wrong number of nodes in {text!r}: expected 3 groups joined by '+', "
                f"got {len(groups)}"
            )
        ops: list[int] = []
        for node, group in enumerate(groups, start=1):
            if len(group) < 2 or not (group.startswith("|") and group.endswith("|")):
                raise CellError(f"node {node} group {group!r} must be wrapped in '|'")
            tokens = group[1:-1].split("|")
            if len(tokens) != node:
                raise CellError(
                    f"node {node} group {group!r} must have {node} input(s), got {len(tokens)}"
                )
            for expected_input, token in enumerate(tokens):
                name, sep, src = token.partition("~")
                if not sep:
                    raise CellError(f"edge {token!r} in node {node} is not of the form op~input")
                if name not in OPS:
                    raise CellError(
                        f"unknown op {name!r} in {token!r}; expected one of {', '.join(OPS)}"
                    )
                if src != str(expected_input):
                    raise CellError(
                        f"wrong input index in {token!r}: node {node}'s edge number "
                        f"{expected_input + 1} must read from node {expected_input}"
                    )
                ops.append(OPS.index(name))
        return cls(tuple(ops))

    def __str__(self) -> str:
        names = [f"{OPS[op]}~{src}" for op, (_, src) in zip(self.ops, EDGES)]
        return "|" + "|+|".join(("|".join(names[0:1]), "|".join(names[1:3]), "|".join(names[3:6]))) + "|"

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(OPS[op] for op in self.ops)

    # -- indices ------------------------------------------------------------------------

    @property
    def code(self) -> int:
        """Position in lexicographic order: the ops read as a base-5 number."""
        code = 0
        for op in self.ops:
            code = code * len(OPS) + op
        return code

    @classmethod
    def from_code(cls, code: int) -> Cell:
        if not 0 <= code < NUM_CELLS:
            raise CellError(f"cell code {code} is not in 0..{NUM_CELLS - 1}")
        ops = []
        for _ in EDGES:
            code, op = divmod(code, len(OPS))
            ops.append(op)
        return cls(tuple(reversed(ops)))

    @property
    def index(self) -> int:
        """Position in NAS-Bench-201's own enumeration (the benchmark files' order)."""
        return _index_of_code()[self.code]

    @classmethod
    def from_index(cls, index: int) -> Cell:
        if not 0 <= index < NUM_CELLS:
            raise CellError(f"NB201 index {index} is not in 0..{NUM_CELLS - 1}")
        return cls.from_code(_code_at_index()[index])

    @classmethod
    def from_any(cls, text: str) -> Cell:
        """A cell string, or a plain integer read as an NB201 index."""
        text = text.strip()
        if text.isdigit():
            return cls.from_index(int(text))
        return cls.parse(text)


@lru_cache(maxsize=1)
def _code_at_index() -> tuple[int, ...]:
    codes = list(range(NUM_CELLS))
    random.Random(_BENCHMARK_SHUFFLE_SEED).shuffle(codes)
    return tuple(codes)


@lru_cache(maxsize=1)
def _index_of_code() -> tuple[int, ...]:
    index_of = [0] * NUM_CELLS
    for index, code in enumerate(_code_at_index()):
        index_of[code] = index
    return tuple(index_of)


def all_cells() -> list[Cell]:
    """Every cell, in NAS-Bench-201 index order."""
    return [Cell.from_code(code) for code in _code_at_index()]

