from pathlib import Path

import numpy as np
import pytest

from metad2a_cli.errors import UserError
from metad2a_cli.meta.table import TABLE_FILE, load_table
from metad2a_cli.nb201.cells import NUM_CELLS, Cell

REPO = Path(__file__).resolve().parents[1]


def write(path, rows, header="nb201_index,arch_str,imagenet16_120_test"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_reads_cells_and_accuracies(tmp_path):
    a, b = Cell.from_index(0), Cell.from_index(11472)
    table = load_table(write(tmp_path / "t.csv", [f"0,{a},26.5", f"11472,{b},44.2"]))
    assert table.codes.tolist() == [a.code, b.code]
    assert table.accuracy.tolist() == [26.5, 44.2]
    assert table.source == "t.csv:imagenet16_120_test"


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (["1,{c0},20"], None, "index 1 is not"),
        (["0,|bad~0|,20"], None, "line 2"),
        (["0,{c0},n/a"], None, "line 2"),
        (["0,{c0},nan"], None, "not a number"),
        (["0,{c0},20", "0,{c0},21"], None, "twice"),
        (["0,{c0},20,1"], "nb201_index,arch_str,a,b", "one accuracy column"),
        ([], None, "no rows"),
    ],
)
def test_refuses_a_table_it_cannot_trust(tmp_path, rows, header, message):
    c0 = Cell.from_index(0)
    path = write(tmp_path / "t.csv", [r.format(c0=c0) for r in rows], header or "nb201_index,arch_str,imagenet16_120_test")
    with pytest.raises(UserError, match=message):
        load_table(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        load_table(tmp_path / "none.csv")


def test_the_shipped_table_covers_every_cell():
    # load_table refuses a row whose nb201_index is not its cell's: this also checks our
    # index order against all 15,625 of NAS-Bench-201's published (index, cell) pairs.
    table = load_table(REPO / "databases" / "nb201" / TABLE_FILE)
    assert len(table) == NUM_CELLS and sorted(table.codes.tolist()) == list(range(NUM_CELLS))
    assert 0 < table.accuracy.min() < table.accuracy.max() < 100
    # NAS-Bench-201's ResNet cell does well, the all-"none" cell does not
    acc = dict(zip(table.codes.tolist(), table.accuracy.tolist()))
    assert acc[Cell.from_index(11472).code] > np.percentile(table.accuracy, 90) > acc[Cell((0,) * 6).code]
