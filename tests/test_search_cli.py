import json

import numpy as np
import pytest
import torch
from PIL import Image

from metad2a_cli.cli import run
from metad2a_cli.data import encoder
from metad2a_cli.meta.checkpoint import load_models, save_models
from metad2a_cli.meta.models import CellGenerator, MetaPredictor
from metad2a_cli.meta.runs import load_run
from metad2a_cli.meta.sizes import ModelSizes
from metad2a_cli.meta.weights import load_checkpoint_config
from metad2a_cli.nb201.cells import Cell

SIZES = ModelSizes(feature_dim=1280, hidden=16, latent=12, heads=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    save_models(
        folder, CellGenerator(SIZES), MetaPredictor(SIZES),
        encoder={"identity": encoder.identity(64), "resolution": 64, "feature_dim": 1280},
        name="test-random", target={"mean": 60.0, "std": 10.0},
    )
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_checkpoint_round_trip(checkpoint):
    from metad2a_cli.meta.weights import Checkpoint

    config = load_checkpoint_config(checkpoint)
    gen, pred = load_models(Checkpoint(checkpoint, config, "local"))
    torch.manual_seed(0)  # the fixture's models, made again in the same order
    for loaded, ref in ((gen, CellGenerator(SIZES)), (pred, MetaPredictor(SIZES))):
        got, want = loaded.state_dict(), ref.state_dict()
        assert got.keys() == want.keys()
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # table_z is NaN: no table


def test_packaged_table_weights_load_into_the_torch_models():
    from metad2a_cli.meta.weights import Checkpoint, packaged_weights_dir

    folder = packaged_weights_dir()
    # Trained before the edge term, they still carry the old MLP head's tensors.
    _, pred = load_models(Checkpoint(folder, load_checkpoint_config(folder), "packaged"))
    assert pred.terms == ("table",) and not hasattr(pred, "dataset_term")
    assert not torch.isnan(pred.table_z).any()


def test_search_table_saves_run(checkpoint, images, capsys):
    assert run(["search", str(images), "--weights", str(checkpoint), "--num-candidates", "50", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 50 candidates" in out and "encode" in out and "saved run" in out
    saved = load_run("last")
    assert saved.num_classes == 3 and len(saved.ranking) == 5
    assert saved.id in out  # "last" is this run
    # The saved ranking is the one printed, in order (columns rank, cell, NB201, ...; a
    # narrow terminal folds the cell over lines, whose rank column is empty).
    columns = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    printed = [int(c[2]) for c in columns if c and c[0].isdigit()]
    assert printed == [entry.cell.index for entry in saved.ranking]


def test_search_json_is_repeatable(checkpoint, images, capsys):
    args = ["search", str(images), "--weights", str(checkpoint), "--num-candidates", "40", "--json",
            "--top-k", "7", "--seed", "3", "--device", "cpu"]
    assert run(args) == 0
    a = json.loads(capsys.readouterr().out)
    assert run(args) == 0
    b = json.loads(capsys.readouterr().out)
    assert [r["cell"] for r in a["ranking"]] == [r["cell"] for r in b["ranking"]]
    assert a["id"] != b["id"] and len(a["ranking"]) == 7 and a["candidates"] == 40
    assert set(a["timings"]) == {"encode", "generate", "rank"}
    first = a["ranking"][0]
    assert Cell.parse(first["cell"]).index == first["nb201_index"]
    assert a["weights"]["name"] == "test-random"


def test_search_refuses_another_encoder(tmp_path, images, capsys):
    torch.manual_seed(0)
    save_models(tmp_path / "w", CellGenerator(SIZES), MetaPredictor(SIZES),
                encoder={"identity": "some-other-encoder-64px", "resolution": 64, "feature_dim": 1280}, name="x")
    assert run(["search", str(images), "--weights", str(tmp_path / "w"), "--device", "cpu"]) == 2
    assert "these weights expect encoder some-other-encoder" in capsys.readouterr().err


def test_search_without_weights_says_how_to_get_them(images, capsys, monkeypatch, tmp_path):
    from metad2a_cli.meta import weights

    monkeypatch.setattr(weights, "packaged_weights_dir", lambda: tmp_path / "none")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert run(["search", str(images), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err


def test_warm_search_does_not_import_torch(checkpoint, images, tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from metad2a_cli.cli import run\n"
        f"code = run(['search', {str(images)!r}, '--weights', {str(checkpoint)!r}, '--json', '--num-candidates', '30'])\n"
        "print('RESULT', code, 'torch' in sys.modules)\n"
    )
    env = dict(os.environ, METAD2A_CACHE=str(tmp_path / "cache"))
    cold = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    warm = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "RESULT 0 True" in cold.stdout, cold.stderr  # the first run encodes images
    assert "RESULT 0 False" in warm.stdout, warm.stderr


def _with_model(folder, checkpoint, change):
    """A copy of ``checkpoint`` whose model file is changed but whose sha256 matches."""
    import hashlib
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(checkpoint, folder)
    model = folder / "model.safetensors"
    if change == "unreadable":
        model.write_bytes(b"not a safetensors file at all")
    else:
        arrays = load_file(str(model))
        key = "predictor.dataset_term.by_dataset.weight"
        if change == "renamed":
            arrays[key + "s"] = arrays.pop(key)
        elif change == "older head":  # as trained before the edge term: an MLP over (dataset, cell)
            for k in [k for k in arrays if k.startswith("predictor.dataset_term.")]:
                del arrays[k]
            arrays["predictor.head.0.weight"] = np.zeros((16, 24), dtype=np.float32)
        else:
            arrays[key] = arrays[key][:, :-1].copy()
        save_file(arrays, str(model))
    config = json.loads((folder / "config.json").read_text())
    config["files"]["model.safetensors"] = hashlib.sha256(model.read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("change", ["unreadable", "renamed", "reshaped"])
def test_weights_that_pass_the_hash_but_not_the_model(checkpoint, images, tmp_path, capsys, change):
    weights = _with_model(tmp_path / "w", checkpoint, change)
    assert run(["search", str(images), "--weights", str(weights), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights / 'model.safetensors'} ") and err.count("\n") == 1
    assert "config.json" in err or "safetensors" in err


def test_weights_with_the_older_dataset_head_say_so(checkpoint, images, tmp_path, capsys):
    from metad2a_cli.errors import UserError
    from metad2a_cli.meta.weights import Checkpoint

    weights = _with_model(tmp_path / "w", checkpoint, "older head")
    assert run(["search", str(images), "--weights", str(weights), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights / 'model.safetensors'} ") and err.count("\n") == 1
    assert "older metad2a's dataset term" in err and "metad2a train" in err
    with pytest.raises(UserError, match="older metad2a's dataset term"):
        load_models(Checkpoint(weights, load_checkpoint_config(weights), "local"))


def test_search_options_are_checked_before_encoding(checkpoint, images, capsys, monkeypatch):
    from metad2a_cli.data import features
    from metad2a_cli.meta import weights

    def no_encoding(*args, **kwargs):
        raise AssertionError("options must be checked first")

    monkeypatch.setattr(features, "encode_folder", no_encoding)
    base = ["search", str(images), "--weights", str(checkpoint)]
    for args, message in ((["--seed", "-1"], "--seed must be at least 0, got -1"),
                          (["--top-k", "0"], "--top-k must be at least 1, got 0"),
                          (["--num-candidates", "0"], "--num-candidates must be at least 1, got 0"),
                          (["--device", "tpu"], "unknown device 'tpu'; choose auto, cpu or cuda"),
                          (["--exhaustive", "--num-candidates", "10"], "--exhaustive ranks all 15,625 cells; leave out --num-candidates")):
        assert run([*base, *args]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"

    def no_weights(*args, **kwargs):
        raise AssertionError("a missing folder must be named before the weights are looked for")

    monkeypatch.setattr(weights, "resolve_weights", no_weights)
    assert run(["search", str(images / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {images / 'missing'} does not exist\n"


def test_search_names_a_class_left_out(checkpoint, images, tmp_path, capsys):
    import shutil

    root = shutil.copytree(images, tmp_path / "set")
    (root / "broken").mkdir()
    (root / "broken" / "a.png").write_text("not an image")
    assert run(["search", str(root), "--weights", str(checkpoint), "--num-candidates", "20", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "left out 1 class(es) with no readable image: 'broken'" in err
    assert run(["search", str(root), "--weights", str(checkpoint), "--num-candidates", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"]["dropped_classes"] == ["broken"]
