"""The NumPy engine must compute exactly what the PyTorch modules compute."""

import numpy as np
import pytest
import torch

from metad2a_cli.meta import engine
from metad2a_cli.meta.models import CellGenerator, MetaPredictor, ModelSizes
from metad2a_cli.nb201.cells import all_cells
from metad2a_cli.nb201.graph import node_type_array, one_hot_graphs

SIZES = ModelSizes(feature_dim=24, hidden=16, latent=12, heads=4)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    gen, pred = CellGenerator(SIZES).eval(), MetaPredictor(SIZES).eval()
    with torch.no_grad():  # the edge term starts at zero, which would match anything
        for p in pred.dataset_term.parameters():
            p.normal_()
    weights = {f"generator.{k}": v.numpy() for k, v in gen.state_dict().items()}
    weights |= {f"predictor.{k}": v.numpy() for k, v in pred.state_dict().items()}
    return gen, pred, weights


def _ragged_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 7, SIZES.feature_dim, generator=g)
    mask = torch.ones(3, 5, 7, dtype=torch.bool)
    mask[0, 4:] = False  # 4 classes
    mask[1, :, 3:] = False  # 3 images per class
    mask[2, 1, 2:] = False  # one small class
    return x, mask


def test_set_encoder_matches(models):
    gen, pred, w = models
    x, mask = _ragged_batch()
    with torch.no_grad():
        ref = pred.set_encoder(x, mask).numpy()
        mu, logvar = gen.encode(x, mask)
    got = engine.set_encode(w, "predictor.set_encoder", x.numpy(), mask.numpy(), SIZES.heads)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    got_mu, got_logvar = engine.generator_posterior(w, x.numpy(), mask.numpy(), SIZES.heads)
    np.testing.assert_allclose(got_mu, mu.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_logvar, logvar.numpy(), atol=1e-5)


def test_padding_does_not_change_the_embedding(models):
    _, pred, _ = models
    x, mask = _ragged_batch()
    with torch.no_grad():
        full = pred.set_encoder(x, mask)
        trimmed = pred.set_encoder(x[:1, :4], mask[:1, :4])
        garbage = x.clone()
        garbage[~mask] = 1e3  # padded slots must not matter
        noisy = pred.set_encoder(garbage, mask)
    torch.testing.assert_close(trimmed[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noisy, full, atol=1e-5, rtol=1e-5)


def test_graph_encoder_and_scores_match(models):
    _, pred, w = models
    cells = all_cells()[:300]
    with torch.no_grad():
        ref = pred.graph_encoder(one_hot_graphs(cells)).numpy()
    got = engine.graph_encode(w, node_type_array(cells))
    np.testing.assert_allclose(got, ref, atol=1e-5)

    dataset = np.random.default_rng(0).standard_normal(SIZES.latent).astype(np.float32)
    codes = torch.tensor([c.code for c in cells])
    for terms in [("table",), ("dataset",), ("table", "dataset")]:
        pred.terms = terms
        with torch.no_grad():
            ref_scores = pred.score(torch.from_numpy(dataset).expand(len(cells), -1), torch.from_numpy(ref), codes).numpy()
        np.testing.assert_allclose(engine.score(w, dataset, got, terms, codes.numpy()), ref_scores, atol=1e-5)
    pred.terms = ("table", "dataset")


def test_table_lookup_matches_and_falls_back_to_the_prior(models):
    _, pred, w = models
    cells = all_cells()[:300]
    codes = torch.tensor([c.code for c in cells])
    listed = codes[::2]  # half the cells are in the table
    pred = MetaPredictor(SIZES, ("table", "dataset")).eval()
    pred.load_state_dict({k[len("predictor."):]: torch.from_numpy(v) for k, v in w.items() if k.startswith("predictor.")},
                         strict=False)
    pred.set_table(listed, torch.linspace(-2, 2, len(listed)))
    wt = dict(w, **{"predictor.table_z": pred.table_z.numpy()})
    graphs = engine.graph_encode(wt, node_type_array(cells))
    dataset = np.random.default_rng(0).standard_normal(SIZES.latent).astype(np.float32)
    got = engine.score(wt, dataset, graphs, ("table",), codes.numpy())
    with torch.no_grad():
        ref = pred.score(torch.from_numpy(dataset).expand(len(cells), -1), torch.from_numpy(graphs), codes).numpy()
        prior = pred.prior_score(torch.from_numpy(graphs)).numpy()
    pred.terms = ("table",)
    with torch.no_grad():
        ref_table = pred.score(torch.zeros(len(cells), SIZES.latent), torch.from_numpy(graphs), codes).numpy()
    np.testing.assert_allclose(got, ref_table, atol=1e-5)
    np.testing.assert_allclose(got[::2], np.linspace(-2, 2, len(listed)), atol=1e-6)  # listed: the table itself
    np.testing.assert_allclose(got[1::2], prior[1::2], atol=1e-5)  # unlisted: the prior
    np.testing.assert_allclose(engine.score(wt, dataset, graphs, ("table", "dataset"), codes.numpy()), ref, atol=1e-5)
    # weights saved before the table was kept (no table_z): the prior scores every cell
    before_table = {k: v for k, v in wt.items() if k != "predictor.table_z"}
    np.testing.assert_allclose(engine.score(before_table, dataset, graphs, ("table",), codes.numpy()), prior, atol=1e-5)


def test_generator_decode_matches(models):
    gen, _, w = models
    rng = np.random.default_rng(1)
    z = rng.standard_normal((400, SIZES.latent)).astype(np.float32)
    u = rng.random((400, 6)).astype(np.float32)
    ref = gen.sample(torch.from_numpy(z), torch.from_numpy(u)).numpy()
    got = engine.generate(w, z, u)
    assert (got == ref).mean() > 0.999  # float ties at a CDF boundary may differ, nothing more
    assert got.min() >= 0 and got.max() <= 4
