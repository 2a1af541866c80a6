"""Every command, driven with random and hostile option values and paths (hypothesis).

Whatever the arguments, a command must end with exit code 0 or 2 (a user mistake: one
`error:` line, or typer's usage box), raise nothing, touch nothing in the sandbox but its own
output path, and finish within a time limit. Values come from small pools of the kinds of
input that broke commands before: negative, zero and huge numbers, NaN and infinity,
paths with rich-markup brackets, missing paths, files where folders go and folders where
files go, a FIFO, a link to /dev/null. Sizes that would build huge networks (a valid
--channels 100000) are left out: they are slow by request, not by mistake.

By default the examples are derandomized (the same ones every run) so the suite stays
repeatable; METAD2A_HOSTILE_EXAMPLES=N draws N random examples per command instead.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_train import make_db

from metad2a_cli.cli import run
from metad2a_cli.data import encoder
from metad2a_cli.meta.checkpoint import save_models
from metad2a_cli.meta.models import CellGenerator, MetaPredictor
from metad2a_cli.meta.sizes import ModelSizes

# A run this long on a dozen tiny images is a hang. Not less: with other jobs on the 2-core
# machine, one ONNX export of a 2-channel network once took over 60 s.
PER_RUN_SECONDS = 180
# Hypothesis tries the simplest example first: every option left out and the first value of
# every pool, which is a valid one, so each command also runs once end to end. Values mostly
# parse, so most runs reach the commands' own checks; a few do not.
INTS = ["2", "-1", "0", "1", "3", "20000", "99999999999999999999", "abc"]
SMALL = ["2", "-1", "0", "1", "abc"]  # sizes: a valid large one would build a huge network
FLOATS = ["0.05", "nan", "inf", "-inf", "-1", "0", "0.5", "1e30"]
DEVICES = ["cpu", "auto", "cuda", "cuda:99", "tpu", "", "[/x]"]
_fresh = itertools.count()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = tmp_path_factory.mktemp("sandbox")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "[eel]"):
        (box / "images" / c).mkdir(parents=True)
        for i in range(8):  # db build draws classes of 8 images or more
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(box / "images" / c / f"{i}.png")
    rows = [f"images/{c}/{i}.png,{c}" for c in ("cat", "dog") for i in range(8)]
    (box / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    torch.manual_seed(0)
    sizes = ModelSizes(feature_dim=1280, hidden=16, latent=12, heads=4)
    save_models(box / "weights", CellGenerator(sizes), MetaPredictor(sizes), name="tiny",
                encoder={"identity": encoder.identity(64), "resolution": 64, "feature_dim": 1280})
    make_db(box / "db", tasks=4)
    (box / "file.txt").write_text("a file")
    (box / "empty").mkdir()
    os.mkfifo(box / "fifo")
    (box / "null").symlink_to(os.devnull)
    (box / "cwd").mkdir()
    return box


def inputs(box: Path) -> list[str]:
    return [str(box / "images"), str(box / "list.csv"), *hostile_paths(box)]


def hostile_paths(box: Path) -> list[str]:
    return [str(box / "nowhere" / "x"), "[/x]", "data/[my data]", str(box / "file.txt"), str(box / "empty"),
            str(box / "fifo"), str(box / "null"), "", " ", "a" * 300, "données/ü", "-", str(box / "images")]


def fresh(box: Path, suffix: str = "") -> str:
    return str(box / f"out-{next(_fresh)}{suffix}")


def snapshot(box: Path) -> dict[str, tuple]:
    seen = {}
    for folder, dirs, files in os.walk(box):
        for name in dirs + files:
            path = Path(folder) / name
            st_ = path.lstat()
            seen[str(path)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return seen


def options(draw, spec) -> list[str]:
    """Each (flag, pool) in ``spec`` given (one time in three) or not; pool None: a switch."""
    args = []
    for flag, pool in spec:
        if draw(st.integers(0, 2)) == 2:
            args += [flag] if pool is None else [flag, draw(st.sampled_from(pool))]
    return args


def check(argv: list[str], box: Path, outputs: list[str], capsys, time_limit) -> None:
    """Run ``argv`` in the sandbox; only ``outputs`` (and what is below them) may change."""
    capsys.readouterr()
    before = snapshot(box)
    cwd = os.getcwd()
    os.chdir(box / "cwd")
    try:
        with time_limit(PER_RUN_SECONDS):
            code = run(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert "error:" in err or "Usage:" in err, (argv, err)
    after = snapshot(box)
    allowed = [os.path.abspath(os.path.join(box / "cwd", o)) for o in outputs if o]
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    # An output, what is below it, or a folder on the way to it (fit and db build make
    # missing parents, as mkdir -p does); anything else is a stray write.
    stray = [p for p in changed if not any(p == a or p.startswith(a + os.sep) or a.startswith(p + os.sep)
                                           for a in allowed)]
    assert not stray, (argv, stray)


# 12 examples a command keep the default suite quick (about 45 s of CPU); set
# METAD2A_HOSTILE_EXAMPLES=500 (say) for a longer hunt, with fresh examples each run.
EXAMPLES = int(os.environ.get("METAD2A_HOSTILE_EXAMPLES", "12"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="METAD2A_HOSTILE_EXAMPLES" not in os.environ,
                    database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # default weights: the packaged copy, no network


@SETTINGS
@given(data=st.data())
def test_search(data, sandbox, capsys, time_limit):
    box = sandbox
    root = data.draw(st.sampled_from(inputs(box)))
    weights = data.draw(st.sampled_from([str(box / "weights"), str(box / "db"), "hf://", None]))
    argv = ["search", root, *(["--weights", weights] if weights else [])]
    argv += options(data.draw, [("--top-k", INTS), ("--num-candidates", INTS), ("--num-samples", INTS),
                                ("--seed", INTS), ("--device", DEVICES), ("--exhaustive", None), ("--json", None)])
    check(argv, box, [], capsys, time_limit)


@SETTINGS
@given(data=st.data())
def test_cell(data, sandbox, capsys, time_limit):
    arch = data.draw(st.sampled_from(["1462", "-1", "15625", "[/x]", "|none~0|+", "", "11472",
                                      "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"]))
    argv = ["cell", arch, *options(data.draw, [("--num-classes", INTS), ("--channels", INTS), ("--cells", INTS),
                                               ("--in-channels", INTS), ("--json", None)])]
    if data.draw(st.booleans()):
        argv += ["--input-size", data.draw(st.sampled_from(INTS)), data.draw(st.sampled_from(INTS))]
    check(argv, sandbox, [], capsys, time_limit)


@SETTINGS
@given(data=st.data())
def test_export(data, sandbox, capsys, time_limit):
    box = sandbox
    out = data.draw(st.sampled_from([fresh(box, ".pt2"), fresh(box, ".onnx"), fresh(box, ".json"), *hostile_paths(box)]))
    source = data.draw(st.sampled_from([["--arch", "1462"], ["--arch", "[/x]"], ["--arch", "99999"], ["--run", "last"],
                                        ["--run", "[/x]"], ["--from-fit", str(box / "empty")],
                                        ["--from-fit", str(box / "file.txt")], ["--arch", "1", "--run", "last"], []]))
    argv = ["export", "-o", out, *source]
    argv += options(data.draw, [("-f", ["onnx", "torch", "tflite", ""]), ("--rank", INTS), ("--num-classes", SMALL),
                                ("--channels", SMALL), ("--cells", SMALL), ("--in-channels", SMALL),
                                ("--seed", INTS), ("--force", None), ("--json", None)])
    if "--channels" not in argv or "--cells" not in argv:
        argv += ["--channels", "2", "--cells", "1"]  # keep a valid export small
    stem = os.path.splitext(out)[0]
    check(argv, box, [out, stem + ".safetensors", stem + ".json"], capsys, time_limit)


@SETTINGS
@given(data=st.data())
def test_encode(data, sandbox, capsys, time_limit):
    box = sandbox
    root = data.draw(st.sampled_from(inputs(box)))
    out = data.draw(st.sampled_from([fresh(box, ".safetensors"), *hostile_paths(box)]))
    argv = ["encode", root, "-o", out, *options(data.draw, [("-n", INTS), ("--seed", INTS), ("--device", DEVICES),
                                                            ("--no-cache", None), ("--force", None), ("--json", None),
                                                            ("-v", None)])]
    check(argv, box, [out], capsys, time_limit)


@SETTINGS
@given(data=st.data())
def test_fit(data, sandbox, capsys, time_limit):
    box = sandbox
    root = data.draw(st.sampled_from(inputs(box)))
    out = data.draw(st.sampled_from([fresh(box), *hostile_paths(box)]))
    argv = ["fit", root, "-o", out, "--arch", data.draw(st.sampled_from(["1462", "[/x]", "-1"]))]
    argv += options(data.draw, [("--epochs", ["1", "-1", "0"]), ("--batch-size", SMALL), ("--lr", FLOATS),
                                ("--weight-decay", FLOATS), ("--input-size", ["16", "-1", "0", "8", "abc"]),
                                ("--val-fraction", FLOATS), ("--seed", INTS), ("--device", DEVICES),
                                ("--resume", None), ("--json", None)])
    argv += ["--channels", data.draw(st.sampled_from(SMALL)), "--cells", "1"]
    if "--epochs" not in argv:
        argv += ["--epochs", "1"]
    check(argv, box, [out], capsys, time_limit)


@SETTINGS
@given(data=st.data())
def test_db_build(data, sandbox, capsys, time_limit):
    box = sandbox
    db = data.draw(st.sampled_from([fresh(box), *hostile_paths(box)]))
    source = data.draw(st.sampled_from([str(box / "images"), *hostile_paths(box)]))
    argv = ["db", "build", db, "-s", source, "--min-classes", "2", "--max-classes", "3", "--images-per-class", "4",
            "--features-per-class", "2", "--epochs", "1"]
    argv += options(data.draw, [("--tasks", ["1", "-1", "0"]), ("--cells-per-task", ["1", "-1", "0", "20000"]),
                                ("--min-classes", INTS), ("--max-classes", INTS), ("--images-per-class", SMALL),
                                ("--min-task-images", INTS),
                                ("--features-per-class", SMALL), ("--epochs", ["1", "-1", "0", "abc"]), ("--seed", INTS),
                                ("--shard", ["0/1", "1/1", "x", "-1/2", "0/0"]), ("--device", DEVICES),
                                ("--chunk", SMALL)])
    if "--tasks" not in argv:
        argv += ["--tasks", "1", "--cells-per-task", "1"]
    check(argv, box, [db], capsys, time_limit)


@SETTINGS
@given(data=st.data())
def test_db_info_and_merge(data, sandbox, capsys, time_limit):
    box = sandbox
    command = data.draw(st.sampled_from(["info", "merge"]))
    db = data.draw(st.sampled_from([str(box / "db"), *hostile_paths(box)]))
    argv = ["db", command, db, *(["--json"] if command == "info" and data.draw(st.booleans()) else [])]
    # merge joins the shard files of a database: its folder is its output
    check(argv, box, [db] if command == "merge" else [], capsys, time_limit)


@SETTINGS
@given(data=st.data())
def test_train(data, sandbox, capsys, time_limit):
    box = sandbox
    db = data.draw(st.sampled_from([str(box / "db"), "xyz", *hostile_paths(box)]))
    out = data.draw(st.sampled_from([fresh(box), *hostile_paths(box), None]))
    argv = ["train", "--db", db, *(["--out", out] if out is not None else [])]
    argv += options(data.draw, [("--tasks-per-step", SMALL), ("--lr", FLOATS), ("--seed", INTS),
                                ("--predictor", ["table", "database", "both", "", "[/x]"]),
                                ("--table", [str(box / "db" / "imagenet16_120.csv"), *hostile_paths(box)]),
                                ("--resume", None), ("--json", None)])
    argv += ["--epochs", data.draw(st.sampled_from(["1", "-1", "0"]))]
    check(argv, box, [out if out is not None else "metad2a-weights"], capsys, time_limit)


def _writes_beside(argv):
    Path("stray.txt").write_text("written outside the output path")  # in the sandbox's cwd
    return 0


def _crashes_quietly(argv):
    return 1


def _prints_a_traceback(argv):
    print("Traceback (most recent call last):", file=sys.stderr)
    return 2


@pytest.mark.parametrize("misdeed, message", [(_writes_beside, "stray.txt"), (_crashes_quietly, "1"),
                                              (_prints_a_traceback, "Traceback")])
def test_the_check_can_fail(sandbox, capsys, time_limit, monkeypatch, misdeed, message):
    monkeypatch.setitem(globals(), "run", misdeed)
    try:
        with pytest.raises(AssertionError, match=message):
            check(["cell", "1"], sandbox, [], capsys, time_limit)
    finally:
        (sandbox / "cwd" / "stray.txt").unlink(missing_ok=True)
