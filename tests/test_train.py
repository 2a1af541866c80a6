import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from metad2a_cli.cli import run
from metad2a_cli.data import encoder
from metad2a_cli.errors import UserError
from metad2a_cli.meta.db import FORMAT_VERSION, BuildSettings, Record, Task
from metad2a_cli.meta.search import SearchModel
from metad2a_cli.meta.sizes import ModelSizes
from metad2a_cli.meta.train import TrainSettings, meta_train
from metad2a_cli.meta.weights import load_checkpoint_config
from metad2a_cli.nb201.cells import Cell

SIZES = ModelSizes(feature_dim=1280, hidden=16, latent=12, heads=4)
GOOD = Cell.parse("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|")


def conv_rule(cell: Cell) -> float:
    return 30.0 + 10.0 * sum(op == 3 for op in cell.ops)


def write_table(path: Path, rule=conv_rule, n: int = 2000, seed: int = 0) -> Path:
    """A published-accuracy table of ``n`` random cells whose accuracy follows ``rule``."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(15625, n, replace=False)
    rows = ["nb201_index,arch_str,imagenet16_120_test"]
    for code in codes.tolist():
        c = Cell.from_code(code)
        rows.append(f"{c.index},{c},{rule(c) + rng.normal(0, 1):.4f}")
    path.write_text("\n".join(rows) + "\n")
    return path


def make_db(path: Path, identity: str | None = None, tasks: int = 12, seed: int = 0, rule=conv_rule) -> Path:
    """A small database written directly: synthetic features, accuracies that follow a rule
    (more 3x3 convolutions, better), so training has something to learn; with a published
    table that follows the same rule."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "features").mkdir()
    classes = [f"c{i}" for i in range(8)]
    centres = rng.standard_normal((8, 1280)).astype(np.float32)
    save_file({f"class.{i}": (centres[i] + 0.3 * rng.standard_normal((10, 1280))).astype(np.float16) for i in range(8)},
              str(path / "features" / "src.safetensors"), metadata={"classes": json.dumps(classes), "encoder": "x"})
    all_tasks, lines = [], []
    for t in range(tasks):
        chosen = sorted(rng.choice(8, rng.integers(3, 6), replace=False).tolist())
        cells = [GOOD] + [Cell(tuple(int(o) for o in rng.integers(0, 5, 6))) for _ in range(7)]
        all_tasks.append(Task(f"t{t:05d}", "src", [classes[i] for i in chosen], [], [], [str(c) for c in cells]))
        for c in cells:
            acc = rule(c) + rng.normal(0, 2)
            lines.append(json.dumps(asdict(Record(f"t{t:05d}", str(c), float(acc), 1.0))))
    (path / "tasks.json").write_text(json.dumps([asdict(t) for t in all_tasks]))
    (path / "records-0of1.jsonl").write_text("\n".join(lines) + "\n")
    manifest = {"format_version": FORMAT_VERSION,
                "encoder": {"identity": identity or encoder.identity(64), "resolution": 64, "feature_dim": 1280},
                "settings": BuildSettings(num_tasks=tasks).to_dict(), "sources": {"src": {"hash": "0" * 64}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    write_table(path / "imagenet16_120.csv", seed=seed)
    return path


def test_training_learns_writes_and_loads(tmp_path):
    db = make_db(tmp_path / "db")
    settings = TrainSettings(epochs=8, tasks_per_step=4, val_fraction=0.25, num_candidates=100, lr=3e-3,
                             predictor="both")
    ckpt, trainer = meta_train(db, tmp_path / "w", settings, sizes=SIZES)
    h = trainer.history
    assert h[-1]["pred_loss"] < h[0]["pred_loss"]
    assert h[-1]["recon"] < h[0]["recon"]
    card = (tmp_path / "w" / "README.md").read_text()
    assert card.startswith("---\nlicense: mit") and "## Limits" in card and "spearman_within_task" in card
    used = ckpt.config["database"]
    assert f"{used['records']} (task, cell, accuracy) records on {used['tasks']} of its tasks" in card
    assert f"image features of {len(trainer.train_tasks)} of the" in card
    best = ckpt.config["metrics"]["best_val"]
    assert best["spearman_within_task"] > 0.5  # held-out tasks: rank follows the rule
    config = load_checkpoint_config(tmp_path / "w")
    model = SearchModel.load(tmp_path / "w", config)
    feats = [np.random.default_rng(i).standard_normal((6, 1280)).astype(np.float32) for i in range(3)]
    result = model.search(feats, top_k=3, exhaustive=True)
    # the predictor should put convolution-heavy cells on top
    assert sum(op == 3 for op in Cell.parse(result.ranking[0].cell).ops) >= 4


def test_resume_continues_exactly(tmp_path):
    db = make_db(tmp_path / "db")
    s4 = TrainSettings(epochs=2, tasks_per_step=4, val_fraction=0.25, num_candidates=50, predictor="both")
    _, straight = meta_train(db, tmp_path / "a", s4, sizes=SIZES)
    s2 = TrainSettings(epochs=1, tasks_per_step=4, val_fraction=0.25, num_candidates=50, predictor="both")
    meta_train(db, tmp_path / "b", s2, sizes=SIZES)
    # the interrupted run is continued with the full epoch count
    state = json.loads((tmp_path / "b/.train/train_state.json").read_text())
    state["settings"]["epochs"] = 2
    (tmp_path / "b/.train/train_state.json").write_text(json.dumps(state))
    _, resumed = meta_train(db, tmp_path / "b", s4, sizes=SIZES, resume=True)
    a = (tmp_path / "a/model.safetensors").read_bytes()
    b = (tmp_path / "b/model.safetensors").read_bytes()
    assert a == b
    assert [h["pred_loss"] for h in straight.history] == [h["pred_loss"] for h in resumed.history]


def test_resumes_a_run_saved_before_the_table_was_kept(tmp_path):
    from safetensors.torch import load_file, save_file

    db = make_db(tmp_path / "db")
    s2 = TrainSettings(epochs=2, tasks_per_step=4, num_candidates=20, predictor="table")
    meta_train(db, tmp_path / "a", s2, sizes=SIZES)
    s1 = TrainSettings(epochs=1, tasks_per_step=4, num_candidates=20, predictor="table")
    meta_train(db, tmp_path / "b", s1, sizes=SIZES)
    state_file = tmp_path / "b/.train/train_state.safetensors"
    old = {k: v for k, v in load_file(str(state_file)).items() if not k.endswith("table_z")}
    assert len(old) < len(load_file(str(state_file)))
    save_file(old, str(state_file))
    state = json.loads((tmp_path / "b/.train/train_state.json").read_text())
    state["settings"]["epochs"] = 2
    (tmp_path / "b/.train/train_state.json").write_text(json.dumps(state))
    meta_train(db, tmp_path / "b", s2, sizes=SIZES, resume=True)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_same_seed_same_weights(tmp_path):
    db = make_db(tmp_path / "db")
    s = TrainSettings(epochs=1, tasks_per_step=4, num_candidates=20)
    meta_train(db, tmp_path / "a", s, sizes=SIZES)
    meta_train(db, tmp_path / "b", s, sizes=SIZES)
    meta_train(db, tmp_path / "c", replace(s, seed=1), sizes=SIZES)
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in "abc"]
    assert weights[0] == weights[1] and weights[0] != weights[2]  # the seed, and only it, decides


def test_refusals(tmp_path, capsys):
    db = make_db(tmp_path / "db", identity="resnet18-imagenet-64px")
    with pytest.raises(UserError, match="built with encoder resnet18"):
        meta_train(db, tmp_path / "w", TrainSettings(epochs=1), sizes=SIZES)
    good = make_db(tmp_path / "good")
    meta_train(good, tmp_path / "w2", TrainSettings(epochs=1, num_candidates=10), sizes=SIZES)
    with pytest.raises(UserError, match="--resume"):
        meta_train(good, tmp_path / "w2", TrainSettings(epochs=1, num_candidates=10), sizes=SIZES)
    assert run(["train", "--db", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no database" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--epochs", "0", "--epochs must be at least 1, got 0"),  # said "checkpoint folder ... does not exist"
        ("--tasks-per-step", "0", "--tasks-per-step must be at least 1, got 0"),
        ("--lr", "-1", "--lr must be a positive finite number, got -1.0"),
        ("--lr", "nan", "--lr must be a positive finite number, got nan"),
        ("--seed", "-1", "--seed must be at least 0, got -1"),
    ],
)
def test_cli_checks_options_first(tmp_path, capsys, option, value, message):
    db = make_db(tmp_path / "db")
    assert run(["train", "--db", str(db), "--out", str(tmp_path / "w"), option, value]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "w").exists()


def test_cli_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from metad2a_cli.meta import train as train_mod

    db, out = make_db(tmp_path / "db"), tmp_path / "w"
    real = train_mod.MetaTrainer.train_epoch

    def train_epoch(self, report=None):
        if self.epoch == 1:  # epoch 1 is saved; Ctrl-C in the second
            raise KeyboardInterrupt
        return real(self, report)

    monkeypatch.setattr(train_mod.MetaTrainer, "train_epoch", train_epoch)
    args = ["--db", str(db), "--out", str(out), "--epochs", "2", "--tasks-per-step", "4", "--predictor", "database"]
    assert run(["train", *args]) == 130
    hint = f"interrupted in epoch 2; go on with: metad2a train {' '.join(args)} --resume"
    assert capsys.readouterr().err.splitlines()[-1] == hint
    monkeypatch.setattr(train_mod.MetaTrainer, "train_epoch", real)
    assert run(["train", *args, "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2


def test_resume_refuses_another_database(tmp_path, capsys):
    first, other = make_db(tmp_path / "first"), make_db(tmp_path / "other", seed=1)
    settings = TrainSettings(epochs=1, num_candidates=10)
    meta_train(first, tmp_path / "w", settings, sizes=SIZES)
    assert json.loads((tmp_path / "w" / "config.json").read_text())["database"]["path"] == "../first"
    before = (tmp_path / "w" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=f"{tmp_path / 'w'} was trained on {first}, not {other}; resume with --db {first}"):
        meta_train(other, tmp_path / "w", settings, sizes=SIZES, resume=True)
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == before
    meta_train(first, tmp_path / "w", settings, sizes=SIZES, resume=True)  # the same database: fine


def test_out_must_be_new_empty_or_its_own_run(tmp_path):
    db = make_db(tmp_path / "db")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("another checkpoint")
    settings = TrainSettings(epochs=1, num_candidates=10)
    with pytest.raises(UserError, match=r"theirs is not empty \(config.json, \.\.\.\); give a new or empty folder"):
        meta_train(db, theirs, settings, sizes=SIZES)
    assert [p.name for p in theirs.iterdir()] == ["config.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file is a file; give a folder"):
        meta_train(db, tmp_path / "file", settings, sizes=SIZES)


def test_database_found_by_name_from_a_clone(tmp_path, monkeypatch):
    from metad2a_cli.meta.train import resolve_database

    make_db(tmp_path / "databases" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_database("tiny") == tmp_path / "databases" / "tiny"
    with pytest.raises(UserError, match="no database 'other'"):
        resolve_database("other")


def _ranking(folder: Path, features) -> list[str]:
    model = SearchModel.load(folder, load_checkpoint_config(folder))
    return [r.cell for r in model.search(features, top_k=20, exhaustive=True).ranking]


def _datasets():
    rng = np.random.default_rng(5)
    return [[rng.standard_normal((6, 1280)).astype(np.float32) + 3 * rng.standard_normal(1280).astype(np.float32)
             for _ in range(4)] for _ in range(2)]


def test_table_term_alone_follows_the_table_whatever_the_records_say(tmp_path):
    def pools_win(cell):  # the database says the opposite of the table
        return 30.0 + 10.0 * sum(op == 4 for op in cell.ops)

    db = make_db(tmp_path / "db", rule=pools_win)
    settings = TrainSettings(epochs=4, tasks_per_step=4, num_candidates=20, lr=3e-3, predictor="table")
    ckpt, trainer = meta_train(db, tmp_path / "w", settings, sizes=SIZES)
    assert ckpt.config["predictor"]["terms"] == ["table"]
    assert trainer.history[-1]["spearman_table"] > 0.6  # held-out table cells; chance is 0
    first, second = (_ranking(tmp_path / "w", f) for f in _datasets())
    assert first == second  # no dataset term: every dataset gets the same ranking
    assert sum(op == 3 for op in Cell.parse(first[0]).ops) >= 4


def test_the_dataset_term_learns_what_the_records_add_to_the_table(tmp_path):
    def pools_win(cell):  # the records reward pooling, which the table does not
        return 30.0 + 10.0 * sum(op == 4 for op in cell.ops)

    db = make_db(tmp_path / "db", rule=pools_win)
    settings = TrainSettings(epochs=4, tasks_per_step=4, num_candidates=20, lr=3e-2, predictor="both")
    meta_train(db, tmp_path / "w", settings, sizes=SIZES)
    model = SearchModel.load(tmp_path / "w", load_checkpoint_config(tmp_path / "w"))
    edges = model.weights["predictor.dataset_term.shared"].reshape(6, 5)  # (edge, op)
    assert (edges.argmax(1) == 4).sum() >= 5  # pooling's weight is the highest on (nearly) every edge
    assert model.weights["predictor.dataset_term.by_dataset.weight"].any()


def test_listed_cells_are_scored_by_the_table_itself(tmp_path):
    from metad2a_cli.meta.table import load_table

    db = make_db(tmp_path / "db")
    table = load_table(db / "imagenet16_120.csv")  # 2,000 of the 15,625 cells
    meta_train(db, tmp_path / "w", TrainSettings(epochs=1, num_candidates=20, predictor="table"), sizes=SIZES)
    model = SearchModel.load(tmp_path / "w", load_checkpoint_config(tmp_path / "w"))
    predicted = model.predict_all(*model.dataset_batch(_datasets()[0]))
    np.testing.assert_allclose(predicted[table.codes], table.accuracy, atol=1e-3)
    unlisted = np.setdiff1d(np.arange(15625), table.codes)
    assert np.isfinite(predicted[unlisted]).all() and predicted[unlisted].std() > 0  # the prior's guesses
    # the table's best cell is first unless the prior guesses some unlisted cell higher
    best_listed = int(table.codes[table.accuracy.argmax()])
    first = int(np.argmax(predicted))
    assert first == best_listed or first in set(unlisted.tolist())
    assert int(np.argmax(np.where(np.isin(np.arange(15625), table.codes), predicted, -np.inf))) == best_listed


def test_both_terms_condition_on_the_dataset_and_database_needs_no_table(tmp_path):
    db = make_db(tmp_path / "db")
    meta_train(db, tmp_path / "both", TrainSettings(epochs=2, tasks_per_step=4, num_candidates=20, predictor="both"),
               sizes=SIZES)
    model = SearchModel.load(tmp_path / "both", load_checkpoint_config(tmp_path / "both"))
    first, second = (model.predict_all(*model.dataset_batch(f)) for f in _datasets())
    # Each dataset moves the edge weights its own way (tiny after two epochs from zero).
    assert np.abs(first - second).max() > 1e-4
    (db / "imagenet16_120.csv").unlink()
    with pytest.raises(UserError, match="no table of published accuracies"):
        meta_train(db, tmp_path / "x", TrainSettings(epochs=1), sizes=SIZES)
    ckpt, _ = meta_train(db, tmp_path / "db-only", TrainSettings(epochs=1, num_candidates=20, predictor="database"),
                         sizes=SIZES)
    assert ckpt.config["predictor"]["terms"] == ["dataset"]
