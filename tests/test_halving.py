import json
import math
from pathlib import Path

import pytest
import torch
from test_fit import StopAfter, make_folder

from metad2a_cli import cli
from metad2a_cli.errors import UserError
from metad2a_cli.meta.runs import save_run
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.fit import LAST, load_tensors
from metad2a_cli.training.halving import (
    HALVING_JSON,
    Candidate,
    Rung,
    budget_epochs,
    distinct_epochs,
    fitted_run_dir,
    plan_rungs,
    resume_halving,
    start_halving,
    stopped_after,
)
from metad2a_cli.training.trainer import FitSettings

NOTHING = str(Cell((0,) * 6))  # every edge 'none': the cells pass nothing on, so chance accuracy
CONV = str(Cell.from_any("1462"))
SETTINGS = FitSettings(cell="", channels=8, cells_per_stage=1, input_size=16, epochs=4, lr=0.05)
# The search ranks the useless cell first: the halving must find out.
CANDIDATES = [Candidate(1, NOTHING, {"arch": NOTHING}), Candidate(2, CONV, {"arch": CONV})]


def test_rungs_halve_the_cells_from_a_first_cut_a_third_of_the_way():
    assert [(r.epoch, r.cells) for r in plan_rungs(30, 5)] == [(10, 5), (14, 3), (21, 2), (30, 1)]
    assert budget_epochs(plan_rungs(30, 5)) == 5 * 10 + 3 * 4 + 2 * 7 + 9
    assert plan_rungs(30, 4) == [Rung(10, 4), Rung(17, 2), Rung(30, 1)]
    assert plan_rungs(4, 2) == [Rung(2, 2), Rung(4, 1)]  # one cut: half way
    assert plan_rungs(30, 2) == [Rung(15, 2), Rung(30, 1)]
    for k in range(2, 20):
        rungs = plan_rungs(60, k)
        assert rungs[0].cells == k and rungs[-1] == Rung(60, 1)
        assert all(b.cells == math.ceil(a.cells / 2) for a, b in zip(rungs, rungs[1:]))
        assert rungs[0].epoch == (30 if k == 2 else 20) and distinct_epochs(rungs)


def test_each_cut_keeps_the_best_so_far_ties_to_the_better_rank_and_waits_for_a_rung():
    rungs = [Rung(2, 4), Rung(4, 2), Rung(8, 1)]
    # ranks 1 and 2 tie at 50 after the first rung: rank 1 goes on, rank 2 stops (its 65 later is never seen)
    done = [[50.0, 60.0, 70.0], [50.0, 65.0, 71.0], [40.0, None, None], [55.0, 58.0, None]]
    assert stopped_after(rungs, done) == [None, 0, 0, 1]
    # rank 4 has not reached the second rung: nothing is cut after it yet
    training = [[50.0, 60.0, None], [50.0, None, None], [40.0, None, None], [55.0, None, None]]
    assert stopped_after(rungs, training) == [None, 0, 0, None]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"), per_class=16)


@pytest.fixture(scope="module")
def halved(images, tmp_path_factory):
    run = tmp_path_factory.mktemp("halving") / "run"
    return run, start_halving(images, SETTINGS, CANDIDATES, run, batch_size=8, device="cpu")


def test_halving_keeps_the_truly_better_cell(halved):
    run, outcome = halved
    assert outcome.completed and outcome.winner.candidate.cell == CONV
    nothing, conv = outcome.standings
    assert nothing.out_after == 0 and len(nothing.history) == 2  # stopped at the first rung
    assert conv.completed and len(conv.history) == 4
    assert conv.rung_acc[0] > nothing.rung_acc[0] and nothing.rung_acc[1] is None
    assert (run / nothing.candidate.folder / "curves.png").is_file()
    assert fitted_run_dir(run) == run / conv.candidate.folder
    summary = outcome.summary()
    assert summary["budget_epochs"] == 6 and summary["epochs_all_in_full"] == 8
    assert [c["val_acc_per_rung"] for c in summary["cells"]] == [nothing.rung_acc, conv.rung_acc]
    assert json.loads((run / HALVING_JSON).read_text())["standings"] == summary["cells"]


def test_a_halving_stopped_twice_resumes_to_the_same_end(halved, images, tmp_path):
    run, straight = halved
    # 39 training images at batch 8: 5 steps an epoch, 10 to the first rung (epoch 2).
    # 13 steps end inside the second cell's first rung.
    stopped = start_halving(images, SETTINGS, CANDIDATES, tmp_path / "run", batch_size=8, device="cpu",
                            reporter=StopAfter(steps=13))
    assert not stopped.completed and [len(s.history) for s in stopped.standings] == [2, 0]
    with pytest.raises(UserError, match="--epochs 5 differs"):
        resume_halving(tmp_path / "run", given={"epochs": 5}, device="cpu")
    with pytest.raises(UserError, match="--top-k 3 differs"):
        resume_halving(tmp_path / "run", given={"top_k": 3}, device="cpu")
    # 7 steps finish the first rung, 3 more stop the winner inside the second.
    again = resume_halving(tmp_path / "run", device="cpu", reporter=StopAfter(steps=10))
    assert not again.completed and again.winner is None
    nothing, conv = again.standings
    assert nothing.out_after == 0 and len(conv.history) == 2 and not conv.completed
    with pytest.raises(UserError, match="has not finished"):
        fitted_run_dir(tmp_path / "run")
    resumed = resume_halving(tmp_path / "run", device="cpu")
    assert resumed.completed
    assert [s.rung_acc for s in resumed.standings] == [s.rung_acc for s in straight.standings]
    folder = straight.winner.candidate.folder
    a, _ = load_tensors(run / folder / LAST)
    b, _ = load_tensors(tmp_path / "run" / folder / LAST)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_top_k_from_the_cli_and_export_of_the_winner(images, tmp_path, capsys):
    save_run({"dataset": {"num_classes": 3, "classes": ["blue", "green", "red"]},
              "ranking": [{"rank": r + 1, "cell": c} for r, c in enumerate([NOTHING, CONV, NOTHING])]})
    args = ["--channels", "8", "--cells", "1", "--input-size", "16", "--lr", "0.05", "--batch-size", "8"]
    out = tmp_path / "top2"
    assert cli.run(["fit", str(images), "--run", "last", "--top-k", "2", "--epochs", "2", "--augment", "crop", *args,
                    "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    plan = "successive halving of the search's top 2 cells: 2 to epoch 1, 1 to epoch 2; 3 epochs of training in all"
    assert captured.err.index(plan) < captured.err.index("training |")  # the budget comes before any training
    assert summary["completed"] and summary["winner"]["cell"] == CONV and summary["budget_epochs"] == 3
    assert summary["cells"][1]["val_acc_per_rung"][1] is not None and summary["cells"][0]["out_after_rung"] == 1
    winner = Path(summary["winner"]["run_dir"])
    assert json.loads((winner / "fit.json").read_text())["settings"]["augment"] == "crop"
    assert json.loads((out / HALVING_JSON).read_text())["settings"]["augment"] == "crop"
    model = tmp_path / "m.pt2"  # torch's format: much quicker to write than ONNX, and the same metadata
    assert cli.run(["export", "--from-fit", str(out), "-f", "torch", "-o", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_acc_exported"] == pytest.approx(summary["winner"]["best_val_acc"])
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["fit"]["augment"] == "crop" and meta["classes"] == ["blue", "green", "red"]
    assert cli.run(["fit", "--resume", "-o", str(out)]) == 0  # finished: nothing to train, the table again
    table = capsys.readouterr().out
    assert "epoch 1" in table and "epoch 2" in table and "winner" in table and "stopped after rung 1" in table
    assert cli.run(["fit", "--resume", "--run", "last", "-o", str(out)]) == 0  # the run it started from
    capsys.readouterr()
    save_run({"dataset": {"num_classes": 3, "classes": ["blue", "green", "red"]},
              "ranking": [{"rank": r + 1, "cell": c} for r, c in enumerate([CONV, NOTHING, NOTHING])]})
    assert cli.run(["fit", "--resume", "--run", "last", "-o", str(out)]) == 2  # a newer search: not its candidates
    assert "is not the one this fit started from" in capsys.readouterr().err
    for bad, message in [
        (["--top-k", "1"], "--top-k must be at least 2"),
        (["--top-k", "4"], "ranks 3 cells; --top-k 4"),
        (["--top-k", "2", "--arch", "1462"], "leave out --arch"),
        (["--top-k", "2", "--rank", "2"], "leave out --rank"),
        (["--top-k", "2", "--augment", "flip"], "--augment 'flip' is not a policy"),
        (["--top-k", "3", "--epochs", "2"], "--epochs 2 is too few to halve 3 cells; give --epochs 3 or more"),
    ]:
        assert cli.run(["fit", str(images), *bad, "-o", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert cli.run(["fit", str(images), "--top-k", "2", "-o", str(out)]) == 2
    assert "already holds a top-k fit" in capsys.readouterr().err
