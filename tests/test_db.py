import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metad2a_cli import cli
from metad2a_cli.cli import run
from metad2a_cli.data.images import read_image_folder
from metad2a_cli.errors import UserError
from metad2a_cli.meta.db import BuildSettings, Database, build, draw_tasks, parse_shard
from metad2a_cli.training.policies import DEFAULT_AUGMENT
from metad2a_cli.training.schedule import LabelSchedule

TINY = LabelSchedule(epochs=1, channels=2, cells_per_stage=1, input_size=16)


def make_source(root: Path, name: str, classes: int = 5, per_class: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    src = root / name
    for c in range(classes):
        d = src / f"class_{c}"
        d.mkdir(parents=True)
        colour = rng.integers(0, 255, 3)
        for i in range(per_class):
            px = np.clip(colour + rng.normal(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{i}.png")
    return src


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return [make_source(root, "alpha", seed=1), make_source(root, "beta", classes=6, seed=2)]


def settings(**kw):
    base = dict(num_tasks=4, min_classes=3, max_classes=5, images_per_class=8, features_per_class=4,
                cells_per_task=2, seed=0, schedule=TINY)
    base.update(kw)
    return BuildSettings(**base)


def test_task_drawing_is_seeded(sources):
    folders = {s.name: read_image_folder(s) for s in sources}
    a = draw_tasks(folders, settings(num_tasks=20))
    b = draw_tasks(folders, settings(num_tasks=20))
    c = draw_tasks(folders, settings(num_tasks=20, seed=1))
    assert a == b and a != c
    for t in a:
        assert 3 <= len(t.classes) <= 5 and len(t.cells) == 2 and len(set(t.cells)) == 2
        for tr, va in zip(t.train, t.val):
            assert len(tr) + len(va) == 8 and not set(tr) & set(va)
    assert {t.source for t in a} == {"alpha", "beta"}


def test_tasks_grow_to_min_task_images(sources):
    folders = {s.name: read_image_folder(s) for s in sources}
    plain = draw_tasks(folders, settings(num_tasks=20))
    # 3 classes of 8 images are 24: a task must take 4 classes to hold 30, and a source of
    # 5 classes cannot reach 48, so it gives every class it has.
    grown = draw_tasks(folders, settings(num_tasks=20, min_task_images=30))
    capped = draw_tasks(folders, settings(num_tasks=20, min_task_images=48))
    for p, g, c in zip(plain, grown, capped):
        assert p.source == g.source == c.source
        assert set(p.classes) <= set(g.classes) and len(g.classes) == max(len(p.classes), 4)
        assert len(c.classes) == len(folders[c.source].classes)
    assert any(len(p.classes) < len(g.classes) for p, g in zip(plain, grown))
    # Without the setting the draw is the one every existing database was built with.
    assert draw_tasks(folders, settings(num_tasks=20, min_task_images=0)) == plain


def test_build_end_to_end_and_resume(sources, tmp_path):
    db_path = tmp_path / "db"
    written = build(db_path, sources, settings(), device="cpu")
    assert written == 8
    db = Database(db_path)
    records = db.records()
    assert len(records) == 8 and all(0 <= r.accuracy <= 100 for r in records)
    info = db.info()
    assert info["tasks"] == 4 and info["tasks_complete"] == 4 and info["records"] == 8
    assert info["draw"]["cells_per_task"] == 2 and "schedule" not in info["draw"]
    sizes = [sum(map(len, t.train)) for t in db.tasks()]
    assert info["train_images_per_task"] == {"min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes)}
    manifest = db.manifest
    assert manifest["encoder"]["identity"].startswith("efficientnet_lite0")
    assert set(manifest["sources"]) == {"alpha", "beta"} and len(manifest["sources"]["alpha"]["hash"]) == 64
    used = {t.source for t in db.tasks()}
    for name in used:
        feats = db.features(name)
        assert all(f.shape == (4, 1280) for f in feats.values())
    # Running again resumes: nothing left to do, nothing duplicated.
    assert build(db_path, sources, settings(), device="cpu") == 0
    assert len(db.records()) == 8
    # Other settings on the same folder are refused.
    with pytest.raises(UserError, match="other settings"):
        build(db_path, sources, settings(cells_per_task=3), device="cpu")
    # A manifest from before the labels' augmentation and rate were recorded reads as
    # crop-flip's at 0.1.
    assert manifest["settings"]["schedule"]["augment"] == DEFAULT_AUGMENT
    assert manifest["settings"]["schedule"]["lr"] == 0.1
    del manifest["settings"]["schedule"]["augment"], manifest["settings"]["schedule"]["lr"]
    del manifest["settings"]["min_task_images"]  # drawn before it existed: none
    (db_path / "manifest.json").write_text(json.dumps(manifest))
    assert build(db_path, sources, settings(schedule=replace(TINY, augment="crop-flip")), device="cpu") == 0
    others = [replace(TINY, augment="crop-flip", lr=0.025)] + ([TINY] if DEFAULT_AUGMENT != "crop-flip" else [])
    for other in others:
        with pytest.raises(UserError, match="other settings"):
            build(db_path, sources, settings(schedule=other), device="cpu")


def test_db_info_resolves_a_shipped_name(tmp_path, monkeypatch, capsys):
    # From a clone's root, as the README runs commands (CI installs the package non-editable,
    # so nothing is found beside the installed code).
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cli.run(["db", "info", "nb201", "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["path"]).parts[-2:] == ("databases", "nb201")
    assert cli.run(["db", "info", "no-such-db"]) == 2
    assert "no database 'no-such-db'" in capsys.readouterr().err


def test_shipped_databases_are_one_draw_at_two_budgets():
    # nb201_30ep took its first records from label_budget.py's relabels of nb201's tasks
    # (benchmarks/budget_import.py): each must be a complete 30-epoch fit of one of the
    # task's own cells, and the two databases must hold the same tasks.
    root = Path(__file__).resolve().parents[1] / "databases"
    short, long = Database(root / "nb201"), Database(root / "nb201_30ep")
    assert (short.path / "tasks.json").read_bytes() == (long.path / "tasks.json").read_bytes()
    assert replace(short.schedule, epochs=30) == long.schedule
    same = ("encoder", "sources")
    assert {k: short.manifest[k] for k in same} == {k: long.manifest[k] for k in same}
    drawn = lambda db: {k: v for k, v in db.manifest["settings"].items() if k != "schedule"}  # noqa: E731
    assert drawn(short) == drawn(long)
    cells = {t.id: set(t.cells) for t in long.tasks()}
    for db in (short, long):
        for r in db.records():
            assert r.cell in cells.get(r.task, ())
            assert len(r.curve) == db.schedule.epochs and r.accuracy == max(r.curve)
            assert r.curve.index(r.accuracy) == r.best_epoch - 1  # the earliest best, as fit keeps it


def test_shards_lock_and_merge(sources, tmp_path):
    db_path = tmp_path / "db"
    build(db_path, sources, settings(), shard=(0, 2), device="cpu")
    db = Database(db_path)
    with db.shard_writer((1, 2)):
        with pytest.raises(UserError, match="another builder is writing shard 1/2"):
            build(db_path, sources, settings(), shard=(1, 2), device="cpu")
    with pytest.raises(UserError, match="another split"):
        build(db_path, sources, settings(), shard=(0, 3), device="cpu")
    build(db_path, sources, settings(), shard=(1, 2), device="cpu")
    assert len(db.records()) == 8
    assert db.merge() == 8
    assert [f.name for f in db.record_files()] == ["records.jsonl"]
    assert len(db.records()) == 8


def test_torn_line_is_ignored(sources, tmp_path):
    db_path = tmp_path / "db"
    build(db_path, sources, settings(num_tasks=1), device="cpu")
    f = db_path / "records-0of1.jsonl"
    lines = f.read_text().splitlines()
    f.write_text(lines[0] + "\n" + lines[1][:15])  # the builder died mid-write
    db = Database(db_path)
    assert len(db.records()) == 1
    assert build(db_path, sources, settings(num_tasks=1), device="cpu") == 1
    assert len(db.records()) == 2


def test_build_resumes_in_a_database_that_carries_its_readme_and_table(sources, tmp_path):
    db_path = tmp_path / "db"
    assert build(db_path, sources, settings(num_tasks=1, cells_per_task=1), device="cpu") == 1
    (db_path / "README.md").write_text("what this database is")
    (db_path / "imagenet16_120.csv").write_text("arch,acc\n")
    f = db_path / "records-0of1.jsonl"
    f.write_text("")  # as if the build had been stopped before its record
    assert build(db_path, sources, settings(num_tasks=1, cells_per_task=1), device="cpu") == 1
    # In a folder that holds no database they are someone else's files.
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("not ours")
    with pytest.raises(UserError, match="other is not empty"):
        build(other, sources, settings(num_tasks=1, cells_per_task=1))


def test_build_writes_only_into_a_new_folder_or_its_own_database(sources, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_text("not ours")
    with pytest.raises(UserError, match=r"photos is not empty \(holiday.jpg, \.\.\.\); give a new or empty folder"):
        build(photos, sources, settings(num_tasks=1, cells_per_task=1))
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file is a file; give a folder"):
        build(tmp_path / "file", sources, settings(num_tasks=1, cells_per_task=1))


def test_cli_prints_a_bracketed_source_name_as_it_is(tmp_path, capsys):
    # "[bold]" is rich markup: unescaped, `db info` dropped it from the name.
    src = make_source(tmp_path, "[bold]s", classes=3)
    db = tmp_path / "db"
    args = ["db", "build", str(db), "-s", str(src), "--tasks", "1", "--cells-per-task", "1", "--min-classes", "3",
            "--max-classes", "3", "--images-per-class", "8", "--features-per-class", "2", "--epochs", "1",
            "--device", "cpu"]
    assert run(args) == 0
    assert "1 new records" in capsys.readouterr().out
    assert run(["db", "info", str(db)]) == 0
    out = capsys.readouterr().out
    assert "sources    [bold]s: 1" in out
    # 3 classes of 8 images, 2 of each held out for validation
    assert "draw       seed 0, 3-3 classes, at most 8 images a class, at least 0 a task, 1 cells a task" in out
    assert "task size  18-18 training images (median 18)" in out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cells_per_task": 20_000}, "--cells-per-task must be in 1..15625, got 20000"),  # hung: 15,625 cells exist
        ({"cells_per_task": 0}, "--cells-per-task must be in 1..15625, got 0"),
        ({"num_tasks": 0}, "--tasks must be at least 1, got 0"),
        ({"images_per_class": 1}, "--images-per-class must be at least 3"),
        ({"features_per_class": 0}, "--features-per-class must be at least 1, got 0"),
        ({"seed": -1}, "--seed must be at least 0, got -1"),
        ({"min_classes": 1}, "--min-classes must be at least 2, got 1"),
        ({"min_classes": 4, "max_classes": 3}, "--max-classes 3 is below --min-classes 4"),
        ({"schedule": LabelSchedule(epochs=0)}, "--epochs must be at least 1, got 0"),
    ],
)
def test_settings_are_checked_before_any_work(sources, tmp_path, time_limit, change, message):
    with time_limit(30), pytest.raises(UserError, match=message):
        build(tmp_path / "db", sources, settings(**change), device="cpu")
    assert not (tmp_path / "db").exists()


def test_cli_on_paths_that_are_no_database(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("x")
    cases = [
        (["db", "info", str(tmp_path / "file")], f"{tmp_path / 'file'} is not a metad2a database (a file)"),
        (["db", "merge", str(tmp_path / "file")], f"{tmp_path / 'file'} is not a metad2a database (a file)"),
        (["db", "info", str(tmp_path / "nowhere")],
         f"no database at {tmp_path / 'nowhere'}: give a folder made by `metad2a db build`"),
        (["db", "merge", str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'} does not exist"),
        (["db", "merge", str(tmp_path / "folder")], f"{tmp_path / 'folder'} is not a metad2a database (no manifest.json)"),
        (["db", "build", str(tmp_path / "file"), "-s", str(tmp_path)], f"{tmp_path / 'file'} is a file; give a folder"),
    ]
    for args, message in cases:
        assert run(args) == 2, args
        assert capsys.readouterr().err == f"error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("option, value, message", [("--epochs", "0", "--epochs must be at least 1, got 0"),
                                                     ("--cells-per-task", "20000", "--cells-per-task must be in 1..15625"),
                                                     ("--lr", "0", "--lr must be a positive finite number, got 0.0")])
def test_cli_checks_label_settings_in_one_line(sources, tmp_path, capsys, time_limit, option, value, message):
    with time_limit(30):
        assert run(["db", "build", str(tmp_path / "db"), "-s", str(sources[0]), option, value, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "db").exists()


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(UserError):
            parse_shard(bad)


def test_killed_builder_resumes_without_duplicates(sources, tmp_path):
    db_path = tmp_path / "db"
    args = [sys.executable, "-m", "metad2a_cli", "db", "build", str(db_path), "--tasks", "6",
            "--cells-per-task", "3", "--min-classes", "3", "--max-classes", "5", "--images-per-class", "8",
            "--features-per-class", "4", "--epochs", "1", "--device", "cpu"]
    for s in sources:
        args += ["-s", str(s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = db_path / "records-0of1.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or records.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(Database(db_path).records())
    assert 2 <= before < 18, "the kill must land mid-build"
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    recs = Database(db_path).records()
    assert len(recs) == 18
    lines, torn = [], 0
    for line in records.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            torn += 1  # the one line the kill may have cut
    assert torn <= 1
    assert len({(r["task"], r["cell"]) for r in lines}) == len(lines) == 18


def test_info_counts_records_per_device_old_records_included(tmp_path, capsys):
    from metad2a_cli.cli import run

    db_path = tmp_path / "db"
    db_path.mkdir()
    (db_path / "manifest.json").write_text(json.dumps(
        {"format_version": 2, "encoder": {"identity": "enc"}, "settings": {"schedule": {"epochs": 1}}, "sources": {}}))
    (db_path / "tasks.json").write_text("[]")
    lines = [
        {"task": "t00000", "cell": "a", "accuracy": 10.0, "seconds": 1.0},  # format 1: no device, no curve
        {"task": "t00000", "cell": "b", "accuracy": 20.0, "seconds": 1.0, "best_epoch": 1, "curve": [20.0], "device": "cpu"},
        {"task": "t00001", "cell": "a", "accuracy": 30.0, "seconds": 1.0, "best_epoch": 1, "curve": [30.0], "device": "NVIDIA H100"},
        {"task": "t00001", "cell": "b", "accuracy": 40.0, "seconds": 1.0, "best_epoch": 1, "curve": [40.0], "device": "NVIDIA H100"},
    ]
    (db_path / "records-0of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert Database(db_path).info()["records_per_device"] == {"unknown": 1, "cpu": 1, "NVIDIA H100": 2}
    assert run(["db", "info", str(db_path)]) == 0
    out = capsys.readouterr().out
    assert "devices    NVIDIA H100: 2, cpu: 1, unknown: 1" in out
    # A schedule from before augmentation and rate were recorded: what its labels trained with.
    assert "labels     1-epoch fits, C=16 N=5 32 px, augment crop-flip, peak lr 0.1\n" in out
    manifest = json.loads((db_path / "manifest.json").read_text())
    for version, readable in ((1, True), (3, False)):  # format 1 (proxy labels) still reads
        (db_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
        if readable:
            assert Database(db_path).info()["records"] == 4
        else:
            with pytest.raises(UserError, match="database format 3 is not supported"):
                Database(db_path).info()


def test_a_record_names_the_precision_a_cpu_trained_in(monkeypatch):
    from metad2a_cli.meta.db import device_name
    from metad2a_cli.training import recipe

    monkeypatch.setattr(recipe, "computes_bfloat16", lambda device: True)
    assert device_name("cpu") == "cpu bfloat16"
    monkeypatch.setattr(recipe, "computes_bfloat16", lambda device: False)
    assert device_name("cpu") == "cpu"
