import json
import os
import signal

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from metad2a_cli import cli
from metad2a_cli.data.images import read_image_folder
from metad2a_cli.errors import UserError
from metad2a_cli.meta.runs import save_run
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.nb201.export import ExportCheckError
from metad2a_cli.training import trainer as trainer_mod
from metad2a_cli.training.fit import (
    BEST,
    CONFUSION_PNG,
    CURVES_PNG,
    FIT_JSON,
    LAST,
    VALIDATION,
    accuracy_check,
    export_fitted,
    load_fitted,
    load_tensors,
    resume_fit,
    start_fit,
)
from metad2a_cli.training.fitdata import split_and_decode
from metad2a_cli.training.augment import crop_and_flip
from metad2a_cli.training.policies import DEFAULT_AUGMENT
from metad2a_cli.training.trainer import FitSettings, Reporter

CELL = str(Cell.from_any("1462"))
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 40), "blue": (40, 40, 200)}


def make_folder(root, per_class=16, colours=COLOURS, size=20, seed=0):
    """An easy task: each class is a colour, under per-pixel noise."""
    rng = np.random.default_rng(seed)
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.array(colour) * rng.uniform(0.6, 1.0) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def small(**changes):
    base = dict(cell=CELL, channels=8, cells_per_stage=1, input_size=16, epochs=3, lr=0.05, seed=0)
    return FitSettings(**{**base, **changes})


class StopAfter(Reporter):
    """Lets ``steps`` training steps run, then asks the run to stop; records notes."""

    def __init__(self, steps=None):
        self.steps, self.asked, self.notes, self.entries = steps, 0, [], []

    def epoch(self, entry):
        self.entries.append(entry)

    def note(self, message):
        self.notes.append(message)

    def should_stop(self):  # asked once before each step
        self.asked += 1
        return self.steps is not None and self.asked > self.steps


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def fitted_run(images, tmp_path_factory):
    run = tmp_path_factory.mktemp("fits") / "run"
    outcome = start_fit(images, small(epochs=6), run, batch_size=8, device="cpu")
    return run, outcome


# -- data ----------------------------------------------------------------------------------


def test_split_is_stratified_seeded_and_disjoint(images):
    folder = read_image_folder(images)
    split, train, val, skipped = split_and_decode(folder, 0.25, 16, seed=1)
    assert not skipped
    assert [len(v) for v in split.val] == [4, 4, 4] and [len(t) for t in split.train] == [12, 12, 12]
    for t, v in zip(split.train, split.val):
        assert not set(t) & set(v)
    assert train.images.shape == (36, 3, 16, 16) and train.images.dtype == np.uint8
    assert np.bincount(val.labels).tolist() == [4, 4, 4]
    again, *_ = split_and_decode(folder, 0.25, 16, seed=1)
    other, *_ = split_and_decode(folder, 0.25, 16, seed=2)
    assert again == split and other != split


def test_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4).view(2, 1, 4, 4)
    centred = torch.tensor([[1, 1], [1, 1]])
    same = crop_and_flip(x, centred, torch.tensor([False, False]), pad=1)
    assert torch.equal(same, x)
    mirrored = crop_and_flip(x, centred, torch.tensor([True, False]), pad=1)
    assert torch.equal(mirrored[0], x[0].flip(2)) and torch.equal(mirrored[1], x[1])
    shifted = crop_and_flip(x, torch.tensor([[0, 0], [2, 2]]), torch.tensor([False, False]), pad=1)
    assert torch.equal(shifted[0, 0, 1:, 1:], x[0, 0, :3, :3]) and shifted[0, 0, 0].sum() == 0
    assert torch.equal(shifted[1, 0, :3, :3], x[1, 0, 1:, 1:]) and shifted[1, 0, 3].sum() == 0


# -- a short fit ---------------------------------------------------------------------------


def test_short_fit_learns_an_easy_task(fitted_run):
    run, outcome = fitted_run
    assert outcome.completed
    history = outcome.state.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert outcome.state.best["val_acc"] >= 75.0  # chance is 33%
    record = json.loads((run / FIT_JSON).read_text())
    assert record["dataset"]["classes"] == ["blue", "green", "red"]
    assert record["settings"]["augment"] == DEFAULT_AUGMENT
    assert record["result"]["val_acc"] == pytest.approx(outcome.state.best["val_acc"])
    # Rows are the true classes (their sums are the validation split's class counts), the
    # diagonal is what the reported accuracies count.
    confusion = np.array(record["result"]["confusion"])
    saved, _ = load_tensors(run / VALIDATION)
    assert confusion.sum(1).tolist() == np.bincount(saved["labels"].numpy(), minlength=3).tolist()
    assert 100 * np.trace(confusion) / confusion.sum() == pytest.approx(record["result"]["val_acc"])
    per_class = [100 * confusion[i, i] / confusion[i].sum() for i in range(3)]
    assert list(record["result"]["per_class_acc"].values()) == pytest.approx(per_class)
    for png in (CONFUSION_PNG, CURVES_PNG):
        with Image.open(run / png) as im:
            assert im.format == "PNG" and im.size[0] > 200


def test_confusion_rows_are_the_true_classes():
    from types import SimpleNamespace

    class AlwaysZero(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([5.0, 0.0, 0.0]).expand(x.shape[0], 3)

    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    fake = SimpleNamespace(classes=["a", "b", "c"], val_y=labels, device=torch.device("cpu"),
                           val_x=torch.zeros(6, 3, 4, 4, dtype=torch.uint8), state=SimpleNamespace(batch_size=2))
    [ev] = trainer_mod.Trainer.evaluate_members(fake, AlwaysZero())
    assert ev.confusion.tolist() == [[1, 0, 0], [2, 0, 0], [3, 0, 0]]
    assert ev.accuracy == pytest.approx(100 / 6)


def test_best_checkpoint_is_the_best_epoch(images, tmp_path, monkeypatch):
    scripted = iter([40.0, 90.0, 60.0, 90.0])  # epoch 2 is best; a later tie does not replace it
    real = trainer_mod.Trainer.evaluate
    weights_after = {}

    def evaluate(self, model=None):
        ev = real(self, model)
        if model is not None:  # the final evaluation of the best weights
            return ev
        weights_after[self.state.epoch + 1] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return trainer_mod.Evaluation(ev.loss, next(scripted), ev.confusion)

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
    outcome = start_fit(images, small(epochs=4), tmp_path / "run", batch_size=8, device="cpu")
    assert outcome.state.best["epoch"] == 2
    assert [e.get("val_acc") for e in outcome.state.history] == [40.0, 90.0, 60.0, 90.0]
    best, meta = load_tensors(tmp_path / "run" / BEST)
    assert meta["best"]["epoch"] == 2
    for k, v in weights_after[2].items():
        assert torch.equal(best[k], v), k
    assert not torch.equal(best["net.classifier.weight"], weights_after[4]["net.classifier.weight"])


def test_stopped_run_resumes_to_the_same_weights(images, tmp_path):
    straight = start_fit(images, small(), tmp_path / "straight", batch_size=8, device="cpu")
    stopper = StopAfter(steps=7)  # 39 training images at batch 8: 5 steps an epoch
    stopped = start_fit(images, small(), tmp_path / "stopped", batch_size=8, device="cpu", reporter=stopper)
    assert not stopped.completed
    assert stopped.state.epoch == 1 and stopped.state.seen == 16
    resumed = resume_fit(tmp_path / "stopped", device="cpu")
    assert resumed.completed
    a, _ = load_tensors(tmp_path / "straight" / LAST)
    b, _ = load_tensors(tmp_path / "stopped" / LAST)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["val_acc"] for h in straight.state.history] == [h["val_acc"] for h in resumed.state.history]


def test_a_run_on_a_csv_list_resumes_from_the_list(images, tmp_path):
    rows = ["path,label"] + [f"{p.relative_to(images)},{p.parent.name}" for p in sorted(images.glob("*/*.png"))]
    listing = images / "list.csv"
    listing.write_text("\n".join(rows) + "\n")
    try:
        stopped = start_fit(listing, small(), tmp_path / "run", batch_size=8, device="cpu", reporter=StopAfter(steps=3))
        assert not stopped.completed
        resumed = resume_fit(tmp_path / "run", device="cpu")  # the run's own source: the list
        assert resumed.completed and resumed.record["dataset"]["root"] == str(listing.resolve())
    finally:
        listing.unlink()


def test_a_cell_searched_on_other_classes_gets_a_note(images, tmp_path):
    notes = StopAfter(steps=0)
    source = {"search_run": "r1", "rank": 1, "classes": ["cats", "dogs"]}
    start_fit(images, small(), tmp_path / "a", batch_size=8, device="cpu", source=source, reporter=notes)
    assert notes.notes == [f"search run r1 was made on other classes than {images}'s; its cell was picked for that dataset"]
    same = StopAfter(steps=0)
    source["classes"] = ["blue", "green", "red"]
    start_fit(images, small(), tmp_path / "b", batch_size=8, device="cpu", source=source, reporter=same)
    assert same.notes == []


def test_resume_may_change_the_batch_size_but_not_the_settings(images, tmp_path):
    start_fit(images, small(), tmp_path / "run", batch_size=8, device="cpu", reporter=StopAfter(steps=2))
    with pytest.raises(UserError, match="--lr 0.2 differs"):
        resume_fit(tmp_path / "run", given={"lr": 0.2}, device="cpu")
    with pytest.raises(UserError, match="--augment crop-flip differs from the run's"):
        resume_fit(tmp_path / "run", given={"augment": "crop-flip"}, device="cpu")
    with pytest.raises(UserError, match="keeps its cell"):
        resume_fit(tmp_path / "run", given={"cell": str(Cell.from_any("0"))}, device="cpu")
    notes = StopAfter()
    outcome = resume_fit(tmp_path / "run", given={"lr": 0.05, "epochs": 3}, batch_size=4, device="cpu", reporter=notes)
    assert outcome.completed
    assert any("batch size 4" in n for n in notes.notes)
    assert outcome.state.history[-1]["batch_size"] == 4


def test_completed_run_resumes_to_nothing_new(fitted_run, tmp_path):
    run, outcome = fitted_run
    before = (run / LAST).stat().st_mtime_ns
    again = resume_fit(run, tmp_path / "images-gone", device="cpu")  # nothing is read, nothing trained
    assert again.completed and again.state.history == outcome.state.history
    assert (run / LAST).stat().st_mtime_ns == before


# -- export of a fitted model --------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_export_reproduces_the_fitted_model(fitted_run, tmp_path, fmt):
    run, outcome = fitted_run
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    result = export_fitted(run, fmt, path)
    checks = result.checks
    assert checks["val_acc_exported"] == pytest.approx(checks["val_acc_fitted"])
    assert checks["val_acc_fitted"] == pytest.approx(outcome.state.best["val_acc"])
    fitted = load_fitted(run)
    x = torch.from_numpy(fitted.val.images).float() / 255.0
    with torch.no_grad():
        ref = fitted.network(x).numpy()
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"images": x.numpy()})
        meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items() if k in ("classes", "fit")}
    else:
        out = torch.export.load(str(path)).module()(x).detach().numpy()
        meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["classes"] == ["blue", "green", "red"] and meta["fit"]["augment"] == DEFAULT_AUGMENT
    assert np.abs(out - ref).max() <= 1e-4


def test_accuracy_check_refuses_an_export_that_classifies_differently(fitted_run):
    run, _ = fitted_run
    fitted = load_fitted(run)
    validate = accuracy_check(fitted)
    assert validate(fitted.network)["val_flipped_near_ties"] == 0
    with pytest.raises(ExportCheckError, match="differently"):
        validate(lambda x: fitted.network(x).roll(1, dims=1))


def test_export_cli_from_fit(fitted_run, tmp_path, capsys):
    run, _ = fitted_run
    out = tmp_path / "m.onnx"
    assert cli.run(["export", "--from-fit", str(run), "--format", "onnx", "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["val_acc_exported"] == pytest.approx(info["val_acc_fitted"]) and out.is_file()
    assert cli.run(["export", "--from-fit", str(run), "--channels", "8", "-o", str(out)]) == 2
    assert "comes from the fit" in capsys.readouterr().err
    assert cli.run(["export", "--from-fit", str(tmp_path), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "holds no fit" in capsys.readouterr().err


# -- bad input -----------------------------------------------------------------------------


def test_resume_refuses_a_folder_with_other_classes(images, tmp_path):
    start_fit(images, small(), tmp_path / "run", batch_size=8, device="cpu", reporter=StopAfter(steps=1))
    other = make_folder(tmp_path / "other", per_class=4, colours={"red": (200, 0, 0), "cyan": (0, 200, 200)})
    with pytest.raises(UserError, match="other classes than the run.*missing blue, green; new cyan"):
        resume_fit(tmp_path / "run", other, device="cpu")


def test_too_few_images_for_the_split(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=3)
    (root / "red" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "red" / "2.png").unlink()
    with pytest.raises(UserError, match="class 'red' has 1 readable image"):
        start_fit(root, small(), tmp_path / "run", device="cpu")


def test_a_diverged_fit_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, capsys):
    # A learning rate this large sends the weights, then the loss, to inf/NaN in epoch 1.
    run = tmp_path / "run"
    with pytest.raises(UserError, match="diverged in epoch 1.*lower --lr"):
        start_fit(images, small(lr=1e30, epochs=2), run, batch_size=8, device="cpu")
    tensors, meta = load_tensors(run / LAST)
    assert meta["state"]["epoch"] == 0 and meta["state"]["history"] == []
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert not (run / BEST).exists()
    assert cli.run(["fit", str(images), "--arch", "1462", "--lr", "inf", "-o", str(tmp_path / "r")]) == 2
    assert "--lr must be a positive finite number, got inf" in capsys.readouterr().err


def test_no_free_disk(images, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="not enough free disk"):
        start_fit(images, small(), tmp_path / "run", device="cpu")


def test_out_of_memory_halves_the_batch_and_goes_on(images, tmp_path, monkeypatch):
    real = trainer_mod.Trainer.train_step

    def train_step(self, images, labels):
        if len(labels) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, images, labels)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", train_step)
    notes = StopAfter()
    outcome = start_fit(images, small(epochs=1), tmp_path / "run", batch_size=32, device="cpu", reporter=notes)
    assert outcome.completed
    assert notes.notes == [
        "out of GPU memory at batch size 32 while training; going on with 16",
        "out of GPU memory at batch size 16 while training; going on with 8",
    ]
    assert outcome.state.batch_size == 8


def test_out_of_memory_at_the_smallest_batch_is_an_error(images, tmp_path, monkeypatch):
    def train_step(self, images, labels):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", train_step)
    with pytest.raises(UserError, match="out of GPU memory even at batch size 2"):
        start_fit(images, small(epochs=1), tmp_path / "run", batch_size=4, device="cpu")


class ResumeWhileTraining(Reporter):
    """As its fit starts training, tries to resume the same run; keeps the error."""

    def __init__(self, run):
        self.run, self.errors = run, []

    def start(self, info):
        with pytest.raises(UserError) as err:
            resume_fit(self.run, device="cpu")
        self.errors.append(str(err.value))


def test_a_second_fit_into_a_running_folder_is_refused(images, tmp_path):
    run, errors = tmp_path / "run", []

    def start_another(done, total):
        # Started together, the second fit is past the folder checks: fit.json is not there yet.
        if not errors:
            with pytest.raises(UserError) as err:
                start_fit(images, small(epochs=1), run, device="cpu")
            errors.append(str(err.value))

    start_fit(images, small(epochs=1), run, batch_size=8, device="cpu", decode_progress=start_another)
    busy = f"another fit is running in {run}; wait for it to end or choose another folder"
    assert errors == [busy]
    other = tmp_path / "other"
    resumer = ResumeWhileTraining(other)
    assert start_fit(images, small(epochs=1), other, batch_size=8, device="cpu", reporter=resumer).completed
    assert resumer.errors == [busy.replace(str(run), str(other))]


def test_run_folder_rules(images, fitted_run, tmp_path):
    run, _ = fitted_run
    with pytest.raises(UserError, match="already holds a fit; add --resume"):
        start_fit(images, small(), run, device="cpu")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        start_fit(images, small(), tmp_path / "busy", device="cpu")
    with pytest.raises(UserError, match="holds no fit"):
        resume_fit(tmp_path / "nothing", device="cpu")


# -- the command ---------------------------------------------------------------------------


ARGS = ["--channels", "8", "--cells", "1", "--input-size", "16", "--lr", "0.05", "--batch-size", "8"]


def test_fit_cli_uses_the_saved_search(images, tmp_path, capsys):
    cells = [str(Cell.from_any(i)) for i in ("1462", "77")]
    save_run({"dataset": {"num_classes": 3, "classes": ["blue", "green", "red"]},
              "ranking": [{"rank": r + 1, "cell": c} for r, c in enumerate(cells)]})
    code = cli.run(["fit", str(images), "--rank", "2", "--epochs", "1", *ARGS, "-o", str(tmp_path / "run"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cell"] == cells[1] and summary["completed"]
    record = json.loads((tmp_path / "run" / FIT_JSON).read_text())
    assert record["source"]["rank"] == 2 and record["source"]["search_run"]
    # Named again on --resume, the rank must agree with the run's cell, with or without --run.
    assert cli.run(["fit", "--resume", "--rank", "1", "-o", str(tmp_path / "run")]) == 2
    assert "keeps its cell" in capsys.readouterr().err
    assert cli.run(["fit", "--resume", "--rank", "2", "-o", str(tmp_path / "run"), "--json"]) == 0


def test_fit_cli_ctrl_c_leaves_a_resumable_run(images, tmp_path, monkeypatch, capsys):
    from metad2a_cli.cli import fit as fit_cli

    real_step = fit_cli.ProgressReporter.step
    sent = []

    def step(self, *a):
        real_step(self, *a)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    monkeypatch.setattr(fit_cli.ProgressReporter, "step", step)
    run = tmp_path / "run"
    code = cli.run(["fit", str(images), "--arch", "1462", "--epochs", "2", *ARGS, "-o", str(run)])
    err = capsys.readouterr().err
    assert code == 130
    assert "saving a checkpoint" in err and f"metad2a fit --resume -o {run}" in err
    assert (run / LAST).is_file() and not (run / BEST).exists()
    monkeypatch.setattr(fit_cli.ProgressReporter, "step", real_step)
    assert cli.run(["fit", "--resume", "-o", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_done"] == 2


def test_fit_cli_user_errors(images, tmp_path, capsys):
    assert cli.run(["fit", "-o", str(tmp_path / "r")]) == 2
    assert "give the image folder" in capsys.readouterr().err
    assert cli.run(["fit", str(images), "--arch", "1462", "--run", "last", "-o", str(tmp_path / "r")]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.run(["fit", str(images), "-o", str(tmp_path / "r")]) == 2  # no saved search
    assert "no saved search run" in capsys.readouterr().err
    assert cli.run(["fit", str(images), "--arch", "1462", "--rank", "3", "-o", str(tmp_path / "r")]) == 2
    assert "give --arch or --rank, not both" in capsys.readouterr().err
    assert cli.run(["fit", str(images), "--arch", "1462", "--epochs", "0", "-o", str(tmp_path / "r")]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    assert cli.run(["fit", str(tmp_path / "missing"), "--arch", "1462", "-o", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'} does not exist\n"
    assert not (tmp_path / "r").exists()  # a failed start takes away the folder it made


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_gpu_and_export(images, tmp_path):
    outcome = start_fit(images, small(epochs=6), tmp_path / "run", batch_size=8, device="cuda")
    assert outcome.completed and outcome.record["device"].startswith("cuda")
    assert outcome.state.best["val_acc"] >= 75.0
    result = export_fitted(tmp_path / "run", "onnx", tmp_path / "m.onnx")
    assert result.checks["val_acc_exported"] == pytest.approx(result.checks["val_acc_fitted"])
