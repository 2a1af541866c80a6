"""`db build --ray`: the same records as a local build, through worker and driver faults.

The Ray tests share one local Ray instance (starting one takes ~10 s) and are marked slow:
`pytest -m slow tests/test_distributed.py` runs them. Without Ray installed they skip; the
one-line install hint is tested without Ray either way.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_db import make_source

from metad2a_cli.cli import run
from metad2a_cli.errors import UserError
from metad2a_cli.meta.db import BuildSettings, Database, build, device_name
from metad2a_cli.training.schedule import LabelSchedule

SMALL = LabelSchedule(epochs=2, channels=2, cells_per_stage=1, input_size=16)


def settings(**kw):
    base = dict(num_tasks=6, min_classes=3, max_classes=5, images_per_class=16, features_per_class=4,
                cells_per_task=3, seed=0, schedule=SMALL)
    return BuildSettings(**{**base, **kw})


def labels(db_path: Path) -> dict:
    return {(r.task, r.cell): (r.accuracy, r.best_epoch, r.curve) for r in Database(db_path).records()}


def unique_lines(path: Path) -> list[tuple[str, str]]:
    keys = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # the one line a kill may have cut
        keys.append((r["task"], r["cell"]))
    assert len(keys) == len(set(keys)), "a (task, cell) was written twice"
    return keys


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return [make_source(root, "alpha", per_class=16, seed=1), make_source(root, "beta", classes=6, per_class=16, seed=2)]


# -- without a cluster -----------------------------------------------------------------------


@pytest.mark.parametrize("address", [[], ["auto"]])
def test_ray_missing_is_one_line_with_the_install_command(sources, tmp_path, monkeypatch, capsys, address):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when it is not installed
    code = run(["db", "build", str(tmp_path / "db"), "--ray", *address, "-s", str(sources[0])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'metad2a[ray]'" in err
    assert not (tmp_path / "db").exists()  # refused before any work


def test_ray_without_an_address_is_a_local_instance():
    from metad2a_cli.cli.db import ray_address_optional

    assert ray_address_optional(["db", "build", "d", "--ray"]) == ["db", "build", "d", "--ray", "local"]
    assert ray_address_optional(["db", "build", "d", "--ray", "-s", "x"]) == ["db", "build", "d", "--ray", "local", "-s", "x"]
    assert ray_address_optional(["db", "build", "d", "--ray", "auto"]) == ["db", "build", "d", "--ray", "auto"]
    assert ray_address_optional(["db", "info", "d"]) == ["db", "info", "d"]


def test_gpu_share_is_checked(sources, tmp_path, capsys):
    # None of this needs Ray: a mistake in the options is named whether or not it is installed.
    from metad2a_cli.meta.distributed import worker_resources

    assert worker_resources(0, None) == {"num_cpus": 1, "num_gpus": 0}
    assert worker_resources(4, None) == {"num_cpus": 1, "num_gpus": 1}
    assert worker_resources(4, 0.25)["num_gpus"] == 0.25
    assert worker_resources(4, 0)["num_gpus"] == 0  # CPUs only, on a GPU cluster
    with pytest.raises(UserError, match="no GPUs"):
        worker_resources(0, 0.5)
    refusals = {
        ("--ray", "local", "--ray-gpus-per-worker", "2"): "must be between 0 and 1 (a share of one GPU), got 2",
        ("--ray-gpus-per-worker", "0.5"): "error: --ray-gpus-per-worker needs --ray",
    }
    for args, message in refusals.items():
        code = run(["db", "build", str(tmp_path / "db"), "-s", str(sources[0]), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
        assert not (tmp_path / "db").exists()


# -- on a local Ray instance -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        # Ray's processes inherit this environment: keep the workers off the user's cache.
        mp.setenv("METAD2A_CACHE", str(tmp_path_factory.mktemp("ray-cache")))
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def running_units() -> list[int]:
    """Pids of the Ray workers labeling a unit now (Ray titles a busy worker by its task)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::label_on_worker"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_ray_build_writes_the_local_build_records(cluster, sources, tmp_path, monkeypatch):
    from metad2a_cli.meta.distributed import ray_runner

    torch = pytest.importorskip("torch")
    # A CPU label depends on torch's thread count (the order of its sums); a Ray worker has
    # one CPU and so one thread, and a local build with one thread must match it bit for bit.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert build(tmp_path / "local", sources, settings()) == 18
    finally:
        torch.set_num_threads(threads)
    assert build(tmp_path / "ray", sources, settings(), runner=ray_runner()) == 18
    assert labels(tmp_path / "ray") == labels(tmp_path / "local")
    assert Database(tmp_path / "ray").tasks() == Database(tmp_path / "local").tasks()
    assert Database(tmp_path / "ray").info()["records_per_device"] == {device_name("cpu"): 18}
    # ... and it resumes like one: nothing left to do.
    assert build(tmp_path / "ray", sources, settings(), runner=ray_runner()) == 0


@pytest.mark.slow
def test_killed_worker_is_retried_without_loss_or_duplicates(cluster, sources, tmp_path):
    from metad2a_cli.meta.distributed import ray_runner

    killed = []

    def kill_a_busy_worker(done: int, todo: int, seconds: float) -> None:
        if not killed:
            for pid in running_units():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    # More cells per unit so a unit outlasts the gap between finding its worker and the kill.
    db_path = tmp_path / "db"
    assert build(db_path, sources, settings(num_tasks=4, cells_per_task=5), progress=kill_a_busy_worker, runner=ray_runner()) == 20
    assert killed, "no worker was busy when the first unit came back"
    assert len(unique_lines(db_path / "records-0of1.jsonl")) == 20
    assert build(tmp_path / "again", sources, settings(num_tasks=4, cells_per_task=5), runner=ray_runner()) == 20
    assert labels(tmp_path / "again") == labels(db_path)  # the retried unit gave the same records


def cli_build(db_path: Path, sources, address: str) -> list[str]:
    args = [sys.executable, "-m", "metad2a_cli", "db", "build", str(db_path), "--tasks", "4", "--cells-per-task", "3",
            "--min-classes", "3", "--max-classes", "5", "--images-per-class", "8", "--features-per-class", "4",
            "--epochs", "1", "--device", "cpu", "--ray", address]
    for s in sources:
        args += ["-s", str(s)]
    return args


def wait_for_records(path: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the build did not write {n} records in time (exit {proc.poll()})")


@pytest.mark.slow
def test_killed_driver_resumes_with_the_same_command(cluster, sources, tmp_path):
    db_path = tmp_path / "db"
    args = cli_build(db_path, sources, cluster)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = db_path / "records-0of1.jsonl"
    wait_for_records(records, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(Database(db_path).records())
    assert 2 <= before < 12, "the kill must land mid-build"
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(Database(db_path).records()) == 12
    # One bar for the cluster's labels, left at its last state (stderr is not a terminal):
    # every record of the build counted, with its rate.
    bar = [line for line in done.stderr.splitlines() if "training cells on Ray" in line]
    assert len(bar) == 1 and f"{12 - before}/{12 - before}" in bar[0] and "records/min" in bar[0], done.stderr
    assert len(unique_lines(records)) == 12


@pytest.mark.slow
def test_ctrl_c_stops_the_cluster_work(cluster, sources, tmp_path):
    db_path = tmp_path / "db"
    # Its own process group, as a terminal's Ctrl-C reaches every process of the command; and
    # Ctrl-C's default action, which a test run started in the background (nohup, `&`) would
    # otherwise pass down as "ignored", so that the build never saw it.
    proc = subprocess.Popen(cli_build(db_path, sources, cluster), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_records(db_path / "records-0of1.jsonl", 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err and "Traceback" not in err
    deadline = time.time() + 20
    while running_units() and time.time() < deadline:
        time.sleep(0.1)
    assert not running_units(), "units still run on the cluster after Ctrl-C"


@pytest.mark.slow
def test_a_node_without_the_sources_fails_with_one_message(cluster, sources, tmp_path):
    from metad2a_cli.data.images import read_image_folder
    from metad2a_cli.meta.db import WorkUnit, draw_tasks
    from metad2a_cli.meta.distributed import ray_runner

    task = draw_tasks({s.name: read_image_folder(s) for s in sources}, settings(num_tasks=1))[0]
    unit = WorkUnit(task, tmp_path / "not-mounted-here", tuple(task.cells))
    with pytest.raises(UserError, match="not a folder on .*same path"):
        list(ray_runner()([unit], settings()))
