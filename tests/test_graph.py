import torch

from metad2a_cli.nb201.cells import Cell, all_cells
from metad2a_cli.nb201.graph import (
    ADJACENCY,
    INPUT_TYPE,
    NUM_NODE_TYPES,
    NUM_NODES,
    OUTPUT_TYPE,
    cells_from_node_types,
    node_types,
    one_hot_graphs,
)


def test_node_types_layout():
    cell = Cell.parse("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|")
    types = node_types([cell])
    assert types.shape == (1, NUM_NODES) == (1, 8)
    assert types.dtype == torch.long
    # input, the six ops shifted by 2, output
    assert types[0].tolist() == [INPUT_TYPE, 5, 2, 5, 3, 2, 3, OUTPUT_TYPE]
    assert NUM_NODE_TYPES == 7


def test_node_types_round_trip_all_cells():
    cells = all_cells()
    types = node_types(cells)
    assert types.shape == (15625, 8)
    assert types.min() >= 0 and types.max() < NUM_NODE_TYPES
    assert cells_from_node_types(types) == cells


def test_invalid_type_rows_decode_to_none():
    bad = torch.tensor([[0, 2, 2, 2, 2, 2, 2, 0], [0, 1, 2, 2, 2, 2, 2, 1], [1, 2, 2, 2, 2, 2, 2, 1]])
    assert cells_from_node_types(bad) == [None, None, None]


def test_adjacency_is_the_cell_dag():
    adj = torch.from_numpy(ADJACENCY)
    assert adj.shape == (8, 8)
    assert not torch.tril(adj).any(), "node order must be topological"
    # ops reading the cell input: edges (1<-0), (2<-0), (3<-0) are nodes 1, 2, 4
    assert adj[0].nonzero().flatten().tolist() == [1, 2, 4]
    # node (3<-2) = graph node 6 reads the ops ending in cell node 2: graph nodes 2 and 3
    assert adj[:, 6].nonzero().flatten().tolist() == [2, 3]
    # the output reads the ops ending in cell node 3: graph nodes 4, 5, 6
    assert adj[:, 7].nonzero().flatten().tolist() == [4, 5, 6]
    # every node but the input has a predecessor, every node but the output a successor
    assert adj[:, 1:].any(dim=0).all() and adj[:-1].any(dim=1).all()


def test_one_hot():
    x = one_hot_graphs(all_cells()[:10])
    assert x.shape == (10, 8, 7)
    assert torch.equal(x.sum(-1), torch.ones(10, 8))
