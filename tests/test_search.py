import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from metad2a_cli.meta.models import CellGenerator, MetaPredictor
from metad2a_cli.meta.search import MODEL_FILE, SearchModel
from metad2a_cli.meta.sizes import ModelSizes
from metad2a_cli.nb201.cells import NUM_CELLS, Cell

SIZES = ModelSizes(feature_dim=32, hidden=16, latent=12, heads=4)


def write_random_checkpoint(folder, seed=0, sizes=SIZES):
    torch.manual_seed(seed)
    state = {f"generator.{k}": v for k, v in CellGenerator(sizes).state_dict().items()}
    predictor = MetaPredictor(sizes)
    with torch.no_grad():  # the edge term starts at zero: every dataset would rank alike
        for p in predictor.dataset_term.parameters():
            p.normal_()
    state |= {f"predictor.{k}": v for k, v in predictor.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / MODEL_FILE))
    config = {"format_version": 1, "model": sizes.to_dict(), "target": {"mean": 70.0, "std": 5.0}}
    (folder / "config.json").write_text(json.dumps(config))
    return config


@pytest.fixture()
def model(tmp_path):
    config = write_random_checkpoint(tmp_path / "ckpt")
    return SearchModel.load(tmp_path / "ckpt", config)


def features(num_classes=6, per_class=10, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((per_class, SIZES.feature_dim)).astype(np.float32) + i for i in range(num_classes)]


def test_generated_candidates_are_unique_valid_and_ranked(model):
    result = model.search(features(), top_k=5, num_candidates=200, seed=1)
    assert result.candidates == 200
    assert result.samples_drawn >= 200
    assert len(result.ranking) == 5
    scores = [r.predicted_accuracy for r in result.ranking]
    assert scores == sorted(scores, reverse=True)
    for r in result.ranking:
        cell = Cell.parse(r.cell)
        assert cell.index == r.nb201_index
        assert r.params > 0 and r.flops > 0
    assert len({r.cell for r in result.ranking}) == 5


def test_sampling_stops_at_its_budget(model, monkeypatch):
    from metad2a_cli.meta import search

    monkeypatch.setattr(search, "MAX_SAMPLES", search.SAMPLE_BATCH)
    result = model.search(features(), top_k=5, num_candidates=NUM_CELLS, seed=1)
    assert result.samples_drawn == search.SAMPLE_BATCH
    assert 5 <= result.candidates < search.SAMPLE_BATCH  # what one batch held, repeats dropped


def test_same_seed_same_ranking_other_seed_other_candidates(model):
    a = model.search(features(), num_candidates=100, seed=3)
    b = model.search(features(), num_candidates=100, seed=3)
    c = model.search(features(), top_k=100, num_candidates=100, seed=4)
    d = model.search(features(), top_k=100, num_candidates=100, seed=3)
    assert [r.cell for r in a.ranking] == [r.cell for r in b.ranking]
    assert {r.cell for r in c.ranking} != {r.cell for r in d.ranking}


def test_exhaustive_scores_every_cell(model):
    feats = features()
    result = model.search(feats, top_k=3, exhaustive=True)
    assert result.candidates == NUM_CELLS and result.mode == "exhaustive"
    x, mask = model.dataset_batch(feats)
    acc = model.predict_all(x, mask)
    assert result.ranking[0].predicted_accuracy == pytest.approx(float(acc.max()), rel=1e-6)
    assert Cell.parse(result.ranking[0].cell).code == int(acc.argmax())
    # generated candidates can never beat the exhaustive optimum
    sampled = model.search(feats, top_k=1, num_candidates=300)
    assert sampled.ranking[0].predicted_accuracy <= result.ranking[0].predicted_accuracy + 1e-6


def test_dataset_matters(model):
    a = model.predict_all(*model.dataset_batch(features(seed=0)))
    b = model.predict_all(*model.dataset_batch(features(num_classes=3, seed=9)))
    assert not np.allclose(a, b)


def test_cell_embeddings_cached_per_weights(model, tmp_path, monkeypatch):
    from metad2a_cli.meta import engine
    from metad2a_cli.paths import cache_dir

    first = model.cell_embeddings()
    files = list((cache_dir() / "cell-embeddings").glob("*.npy"))
    assert len(files) == 1
    encode = engine.graph_encode
    calls = []

    def counted(weights, types):
        calls.extend([1] if len(types) == NUM_CELLS else [])  # loading probes one cell
        return encode(weights, types)

    monkeypatch.setattr(engine, "graph_encode", counted)
    again = SearchModel.load(tmp_path / "ckpt", json.loads((tmp_path / "ckpt/config.json").read_text()))
    np.testing.assert_array_equal(again.cell_embeddings(), first)
    assert not calls  # read from the cache, not recomputed
    files[0].write_bytes(b"garbage")
    rebuilt = SearchModel.load(tmp_path / "ckpt", {"model": SIZES.to_dict()})
    np.testing.assert_allclose(rebuilt.cell_embeddings(), first, atol=1e-6)
    assert len(calls) == 1  # a damaged cache is recomputed once and written again
    assert np.load(files[0]).shape == first.shape


def test_bad_inputs(model):
    from metad2a_cli.errors import UserError

    with pytest.raises(UserError, match="at least 2 classes"):
        model.search(features(num_classes=1))
    with pytest.raises(UserError, match="expected"):
        model.search([np.zeros((3, 7), np.float32)] * 3)
