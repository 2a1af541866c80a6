import pytest
import torch

from metad2a_cli.meta.models import CellGenerator, MetaPredictor, ModelSizes
from metad2a_cli.nb201.cells import Cell, all_cells
from metad2a_cli.nb201.graph import cells_from_node_types, one_hot_graphs

SIZES = ModelSizes(feature_dim=20, hidden=16, latent=12, heads=2)


def _data(b=2, k=4, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, m, SIZES.feature_dim, generator=g), torch.ones(b, k, m, dtype=torch.bool)


def test_set_encoder_is_permutation_invariant():
    torch.manual_seed(0)
    pred = MetaPredictor(SIZES).eval()
    x, mask = _data()
    with torch.no_grad():
        ref = pred.set_encoder(x, mask)
        shuffled = x[:, torch.randperm(4)][:, :, torch.randperm(6)]
        assert torch.allclose(pred.set_encoder(shuffled, mask), ref, atol=1e-5)
        # Swapping images between classes is a different dataset and must change the result.
        mixed = x.clone()
        mixed[:, 0, 0], mixed[:, 1, 0] = x[:, 1, 0], x[:, 0, 0]
        assert not torch.allclose(pred.set_encoder(mixed, mask), ref, atol=1e-4)


def test_batching_equals_one_by_one():
    torch.manual_seed(0)
    gen, pred = CellGenerator(SIZES).eval(), MetaPredictor(SIZES).eval()
    x, mask = _data(b=3)
    cells = all_cells()[:3]
    graphs = one_hot_graphs(cells)
    with torch.no_grad():
        batch_scores = pred(x, mask, graphs)
        batch_mu, _ = gen.encode(x, mask)
        for i in range(3):
            one = pred(x[i : i + 1], mask[i : i + 1], graphs[i : i + 1])
            torch.testing.assert_close(one[0], batch_scores[i], atol=1e-5, rtol=1e-5)
            mu, _ = gen.encode(x[i : i + 1], mask[i : i + 1])
            torch.testing.assert_close(mu[0], batch_mu[i], atol=1e-5, rtol=1e-5)
        embeddings = pred.graph_encoder(one_hot_graphs(all_cells()[:50]))
        for i in (0, 17, 49):
            single = pred.graph_encoder(one_hot_graphs([all_cells()[i]]))
            torch.testing.assert_close(single[0], embeddings[i], atol=1e-5, rtol=1e-5)


def test_samples_are_valid_cells_and_depend_on_z():
    torch.manual_seed(0)
    gen = CellGenerator(SIZES).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, SIZES.latent, generator=g)
    ops = gen.sample(z, torch.rand(2000, 6, generator=g))
    assert ops.shape == (2000, 6) and ops.min() >= 0 and ops.max() <= 4
    types = torch.cat([torch.zeros(2000, 1, dtype=torch.long), ops + 2, torch.ones(2000, 1, dtype=torch.long)], 1)
    assert all(c is not None for c in cells_from_node_types(types))
    assert len({tuple(r) for r in ops.tolist()}) > 500  # an untrained decoder is diverse


def test_generator_learns_a_target_cell():
    torch.manual_seed(0)
    gen = CellGenerator(SIZES)
    x, mask = _data(b=2)
    target = torch.tensor([Cell.parse("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|").ops,
                           Cell.from_index(5).ops])
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, recon, kl = gen.loss(x, mask, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = recon.item() if first is None else first
    assert recon.item() < 0.2 * first
    gen.eval()
    with torch.no_grad():
        mu, _ = gen.encode(x, mask)
        # Greedy-ish decode: uniforms near 0 pick the most probable op when it dominates.
        ops = gen.sample(mu, torch.full((2, 6), 0.5))
    assert torch.equal(ops, target)


def test_predictor_fits_scores():
    torch.manual_seed(0)
    pred = MetaPredictor(SIZES)
    x, mask = _data(b=1)
    cells = all_cells()[:64]
    graphs = one_hot_graphs(cells)
    # A target that depends on the cell: the number of 3x3 convolutions.
    y = torch.tensor([sum(op == 3 for op in c.ops) for c in cells], dtype=torch.float32)
    xb, mb = x.expand(64, -1, -1, -1), mask.expand(64, -1, -1)
    opt = torch.optim.Adam(pred.parameters(), lr=3e-3)
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(pred(xb, mb, graphs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * y.var().item()


def test_predictor_weights_without_table_z_load_and_keep_the_buffer():
    pred = MetaPredictor(SIZES, ("table",))
    pred.set_table(torch.tensor([3, 7]), torch.tensor([1.5, -0.5]))
    old = {k: v for k, v in MetaPredictor(SIZES, ("table",)).state_dict().items() if k != "table_z"}
    assert not pred.load_state_dict(old).missing_keys
    assert pred.table_z[3] == 1.5 and pred.table_z[7] == -0.5 and torch.isnan(pred.table_z[0])
    # Anything else missing is still an error.
    del old["prior.0.weight"]
    with pytest.raises(RuntimeError, match=r"prior\.0\.weight"):
        pred.load_state_dict(old)
