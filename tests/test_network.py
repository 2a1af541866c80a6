import copy

import pytest
import torch

from metad2a_cli.errors import UserError
from metad2a_cli.nb201.cells import EDGES, Cell, all_cells
from metad2a_cli.nb201.cost import cell_cost
from metad2a_cli.nb201.network import CellBlock, Network, NetworkConfig, count_parameters

SMALLEST = Cell((0,) * 6)  # every edge 'none'
LARGEST = Cell((3,) * 6)  # every edge 'nor_conv_3x3'


def test_parameter_counts_equal_nas_bench_201():
    # NAS-Bench-201 publishes 0.073306 M and 1.531546 M for CIFAR-10 (10 classes, 32x32).
    assert count_parameters(Network(SMALLEST)) == 73306
    assert count_parameters(Network(LARGEST)) == 1531546
    assert cell_cost(SMALLEST).params == 73306
    assert cell_cost(LARGEST).params == 1531546


def test_flops_equal_nas_bench_201():
    # NAS-Bench-201's CIFAR-10 FLOPs range: 7.78305 M to 220.11969 M.
    assert cell_cost(SMALLEST).mflops == pytest.approx(7.78305, abs=1e-5)
    assert cell_cost(LARGEST).mflops == pytest.approx(220.11969, abs=1e-5)


def _count_flops(net: Network, x: torch.Tensor) -> int:
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += kh * kw * module.in_channels * module.out_channels * output.shape[2] * output.shape[3] // module.groups
        else:
            total += module.in_features * module.out_features + module.out_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize(
    "config",
    [
        NetworkConfig(),
        NetworkConfig(num_classes=43, channels=8, cells_per_stage=2, in_channels=1, input_size=(28, 28)),
        NetworkConfig(num_classes=7, channels=4, cells_per_stage=1, input_size=(17, 23)),
        NetworkConfig(num_classes=3, channels=6, cells_per_stage=3, input_size=(16, 16)),
    ],
)
def test_closed_form_cost_matches_built_network(config):
    cells = all_cells()
    for cell in (SMALLEST, LARGEST, *cells[:5]):
        net = Network(cell, config).eval()
        x = torch.randn(2, config.in_channels, *config.input_size)
        out = net(x)
        assert out.shape == (2, config.num_classes)
        cost = cell_cost(cell, config.num_classes, config.channels, config.cells_per_stage,
                         config.in_channels, config.input_size)
        assert cost.params == count_parameters(net)
        assert cost.flops == _count_flops(net, x[:1])


def test_cell_wiring_follows_the_string():
    # A cell whose only path is input -skip-> node1 -skip-> node3 (others none):
    # every cell in the network is the identity.
    cell = Cell.parse("|skip_connect~0|+|none~0|none~1|+|none~0|skip_connect~1|none~2|")
    net = Network(cell, NetworkConfig(channels=4, cells_per_stage=2)).eval()
    x = torch.randn(3, 4, 8, 8)
    for block in net.blocks[:2]:
        assert torch.equal(block(x), x)
    # Moving the skip to read node 2 (which only gets 'none') kills the signal.
    dead = Cell.parse("|skip_connect~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|")
    block = Network(dead, NetworkConfig(channels=4, cells_per_stage=1)).blocks[0]
    assert torch.count_nonzero(block(x)) == 0


def test_config_validation():
    for bad in (
        NetworkConfig(num_classes=1),
        NetworkConfig(in_channels=2),
        NetworkConfig(input_size=(15, 32)),
        NetworkConfig(channels=0),
    ):
        with pytest.raises(UserError):
            bad.validate()


def _every_edge_forward(block, x):
    """NAS-Bench-201's own sum: every edge, a 'none' edge as x * 0."""
    nodes = [x]
    for target in (1, 2, 3):
        nodes.append(sum(op(nodes[src]) for op, (dst, src) in zip(block.edges, EDGES) if dst == target))
    return nodes[3]


@pytest.mark.parametrize("ops", [
    (0,) * 6,  # nothing reaches the output
    (3, 0, 0, 0, 0, 3),  # node 2 has no inputs, but its conv feeds the output a batch norm's shift
    (3, 3, 3, 3, 3, 0),  # node 2 feeds nothing: its two convs are dead
    (3, 3, 0, 0, 0, 1),  # only the path 0 -> 2 -> 3 is live
    (1, 2, 4, 0, 3, 2),
])
def test_skipping_none_and_dead_edges_changes_no_output_or_gradient(ops, monkeypatch):
    cell = Cell(ops)
    config = NetworkConfig(num_classes=3, channels=4, cells_per_stage=1, input_size=(16, 16))
    torch.manual_seed(0)
    fast = Network(cell, config)
    reference = copy.deepcopy(fast)
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0])
    fast_out = fast(x)
    torch.nn.functional.cross_entropy(fast_out, y).backward()
    with monkeypatch.context() as m:
        m.setattr(CellBlock, "forward", _every_edge_forward)
        out = reference(x)
        torch.nn.functional.cross_entropy(out, y).backward()
    assert torch.equal(fast_out, out)
    for (name, p), (_, q) in zip(fast.named_parameters(), reference.named_parameters()):
        if p.grad is None:  # only a parameter that cannot reach the output is skipped
            assert not q.grad.any(), name
        else:
            assert torch.equal(p.grad, q.grad), name
    if ops == (3, 3, 3, 3, 3, 0):
        assert fast.blocks[0].edges[1][1].weight.grad is None  # the dead conv did not run
