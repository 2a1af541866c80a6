import torch

from metad2a_cli.nb201.cells import Cell
from metad2a_cli.nb201.network import Network, NetworkConfig
from metad2a_cli.training.proxy import CellEnsemble, ProxySchedule, train_cells

CELLS = [
    Cell.parse("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"),
    Cell.parse("|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|"),
    Cell((0,) * 6),
    Cell((3,) * 6),
]


def _load_into_ensemble(ens: CellEnsemble, nets: list[Network], c: int) -> None:
    """Copy K separate networks' weights into the groups of one ensemble."""

    def put(dst: torch.nn.Module, src: torch.nn.Module, k: int) -> None:
        # Group k of dst receives src's parameters and buffers.
        for name, value in src.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            target = dst.state_dict()[name]
            rows = value.shape[0]
            target[k * rows : (k + 1) * rows] = value

    for k, net in enumerate(nets):
        put(ens.stem, net.stem, k)
        for eb, nb in zip(ens.blocks, net.blocks):
            if hasattr(nb, "edges"):
                for e, op in enumerate(nb.edges):
                    name = f"{e}_{net.cell.ops[e]}"
                    if name in eb.convs:
                        # the conv's groups are the networks that use it, in order
                        users = [j for j, other in enumerate(nets) if other.cell.ops[e] == net.cell.ops[e]]
                        put(eb.convs[name], op, users.index(k))
            else:
                put(eb, nb, k)
        put(ens.head_bn, net.head[0], k)
        with torch.no_grad():
            ens.fc_weight[k] = net.classifier.weight.T
            ens.fc_bias[k] = net.classifier.bias


def test_ensemble_equals_separate_networks():
    config = NetworkConfig(num_classes=5, channels=4, cells_per_stage=2, input_size=(16, 16))
    torch.manual_seed(0)
    nets = [Network(cell, config) for cell in CELLS]
    ens = CellEnsemble(CELLS, 5, 3, channels=4, cells_per_stage=2)
    _load_into_ensemble(ens, nets, 4)
    x = torch.randn(6, 3, 16, 16)
    for mode in ("train", "eval"):
        ens.train(mode == "train")
        for net in nets:
            net.train(mode == "train")
        with torch.no_grad():
            out = ens(x)
            for k, net in enumerate(nets):
                torch.testing.assert_close(out[k], net(x), atol=1e-5, rtol=1e-4)


def _easy_task(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[:, 0] += (y == 0).float()[:, None, None] * 1.5  # colour says the class
    x[:, 1] += (y == 1).float()[:, None, None] * 1.5
    return x, y


def test_training_learns_and_is_seeded():
    schedule = ProxySchedule(channels=4, epochs=3, batch_size=32, input_size=16)
    train, val = _easy_task(seed=0), _easy_task(n=90, seed=1)
    cells = CELLS[:2] + [Cell((3,) * 6)]
    a = train_cells(cells, train, val, schedule, seed=0)
    b = train_cells(cells, train, val, schedule, seed=0)
    assert a == b
    assert len(a) == 3
    assert max(a) > 70.0  # chance is 33%
    assert all(0.0 <= v <= 100.0 for v in a)


def test_all_none_cell_cannot_learn_beyond_chance_but_others_can():
    # The all-'none' cell zeroes every stage's signal: only the head's bias is learnt.
    schedule = ProxySchedule(channels=4, epochs=3, batch_size=32, input_size=16)
    train, val = _easy_task(seed=2), _easy_task(n=90, seed=3)
    acc = train_cells([Cell((0,) * 6), Cell((3,) * 6)], train, val, schedule, seed=0)
    assert acc[1] > acc[0] + 20
