import pytest

from metad2a_cli.nb201.cells import EDGES, NUM_CELLS, OPS, Cell, CellError, all_cells

RESNET = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"


def test_parse_format_round_trip_for_every_cell():
    cells = all_cells()
    assert len(cells) == NUM_CELLS == 15625
    assert len(set(cells)) == NUM_CELLS
    for cell in cells:
        assert Cell.parse(str(cell)) == cell


def test_parse_reads_ops_in_edge_order():
    cell = Cell.parse(RESNET)
    assert cell.op_names == (
        "nor_conv_3x3", "none", "nor_conv_3x3", "skip_connect", "none", "skip_connect"
    )
    assert str(cell) == RESNET
    assert Cell.parse("  " + RESNET + "\n") == cell


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown op 'conv'"),
        ("|none~1|+|none~0|none~1|+|none~0|none~1|none~2|", "wrong input index in 'none~1'"),
        ("|none~0|+|none~0|none~2|+|none~0|none~1|none~2|", "wrong input index in 'none~2'"),
        ("|none~0|+|none~0|none~1|", "wrong number of nodes"),
        ("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|+|none~0|", "wrong number of nodes"),
        ("|none~0|+|none~0|+|none~0|none~1|none~2|", "node 2"),
        ("|none~0|+|none~0|none~1|+|none~0|none~1|none|", "not of the form op~input"),
        ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "wrapped in '|'"),
        ("", "wrong number of nodes"),
    ],
)
def test_malformed_strings_name_the_bad_part(text, fragment):
    with pytest.raises(CellError) as info:
        Cell.parse(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_index_mapping_is_a_bijection_both_ways():
    seen = set()
    for index in range(NUM_CELLS):
        cell = Cell.from_index(index)
        assert cell.index == index
        seen.add(cell)
    assert len(seen) == NUM_CELLS
    for code in range(NUM_CELLS):
        assert Cell.from_index(Cell.from_code(code).index).code == code


def test_index_order_matches_nas_bench_201():
    # Positions NAS-Bench-201's own generation script pins in its assertions.
    assert str(Cell.from_index(0)) == (
        "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|"
    )
    assert str(Cell.from_index(9)) == (
        "|avg_pool_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
    )
    assert str(Cell.from_index(123)) == (
        "|avg_pool_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|"
    )


def test_index_and_code_bounds():
    for bad in (-1, NUM_CELLS):
        with pytest.raises(CellError):
            Cell.from_index(bad)
        with pytest.raises(CellError):
            Cell.from_code(bad)
    with pytest.raises(CellError):
        Cell((0, 0, 0))
    with pytest.raises(CellError):
        Cell((0, 0, 0, 0, 0, 5))


def test_from_any_accepts_index_or_string():
    assert Cell.from_any("11472") == Cell.parse(RESNET)
    assert Cell.from_any(RESNET).index == 11472


def test_code_is_lexicographic_base5():
    assert Cell((0,) * 6).code == 0
    assert Cell((4,) * 6).code == NUM_CELLS - 1
    assert Cell((0, 0, 0, 0, 0, 1)).code == 1
    assert Cell((1, 0, 0, 0, 0, 0)).code == 5**5
    assert len(OPS) == 5 and len(EDGES) == 6
