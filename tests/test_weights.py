"""Weights: checkpoint folders, the Hub path (against a fake Hub on 127.0.0.1), fallbacks."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hub_server import FakeHub
from safetensors.numpy import save

from metad2a_cli.errors import UserError
from metad2a_cli.meta import weights
from metad2a_cli.meta.weights import (
    DEFAULT_REPO,
    FORMAT_VERSION,
    UNREACHABLE_MESSAGE,
    HubRef,
    HubSettings,
    check_encoder,
    load_checkpoint_config,
    resolve_weights,
    write_checkpoint,
)

ENCODER = {"identity": "resnet18-imagenet", "resolution": 32, "feature_dim": 512}


# --- helpers -------------------------------------------------------------------------


def checkpoint_files(name: str, *, seed: int = 0, encoder: dict | None = None) -> dict[str, bytes]:
    """The files of a small checkpoint, built here without write_checkpoint."""
    rng = np.random.default_rng(seed)
    blobs = {
        "predictor.safetensors": save({"w": rng.standard_normal((4, 3)).astype(np.float32)}),
        "generator.safetensors": save({"w": rng.standard_normal((5,)).astype(np.float32),
                                       "b": np.arange(3, dtype=np.int64)}),
    }
    config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "model": {"hidden": 4},
        "encoder": dict(encoder or ENCODER),
        "database": {"cells": 10},
        "metrics": {"spearman": 0.5},
        "files": {file: hashlib.sha256(data).hexdigest() for file, data in blobs.items()},
    }
    return {"config.json": json.dumps(config).encode(), **blobs}


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def closed_port() -> int:
    # Bind, note the port, close: nothing listens there, so connecting is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def snapshot_files(hf_home: Path, repo_id: str) -> list[Path]:
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    return sorted(p for p in (repo_dir / "snapshots").glob("*/*")) if repo_dir.exists() else []


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch) -> Path:
    """A private HF_HOME, online mode, and an endpoint where nothing listens.

    Tests that want a Hub point HF_ENDPOINT at the fake one; no test can reach the network.
    """
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_HUB_ETAG_TIMEOUT", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return home


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    yield server
    server.stop()


@pytest.fixture
def packaged(tmp_path, monkeypatch) -> Path:
    """A shipped checkpoint, standing in for the one a release will carry."""
    folder = write_folder(tmp_path / "shipped" / "nb201", checkpoint_files("shipped", seed=7))
    monkeypatch.setattr(weights, "packaged_weights_dir", lambda: folder)
    return folder


# --- local folders -------------------------------------------------------------------


def test_local_folder_loads_and_verifies(tmp_path):
    folder = write_folder(tmp_path / "ckpt", checkpoint_files("local-one"))
    checkpoint = resolve_weights(str(folder))
    assert checkpoint.source == "local"
    assert checkpoint.path == folder
    assert checkpoint.name == "local-one"
    assert sorted(checkpoint.files) == ["generator.safetensors", "predictor.safetensors"]
    assert checkpoint.arrays("generator.safetensors")["b"].tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="no weights file 'other.safetensors'"):
        checkpoint.file("other.safetensors")


def test_local_folder_missing_file(tmp_path):
    files = checkpoint_files("x")
    del files["generator.safetensors"]
    folder = write_folder(tmp_path / "ckpt", files)
    with pytest.raises(UserError, match="missing generator.safetensors"):
        load_checkpoint_config(folder)


def test_local_folder_bad_hash_names_the_file(tmp_path):
    files = checkpoint_files("x")
    files["predictor.safetensors"] = files["predictor.safetensors"][:-1] + b"\x00"
    folder = write_folder(tmp_path / "ckpt", files)
    with pytest.raises(UserError, match="predictor.safetensors .*does not match config.json"):
        resolve_weights(str(folder))


@pytest.mark.parametrize(("version", "message"), [(2, "upgrade metad2a"), (0, "reads only 1"), ("1", "integer")])
def test_local_folder_bad_format_version(tmp_path, version, message):
    files = checkpoint_files("x")
    config = json.loads(files["config.json"])
    config["format_version"] = version
    files["config.json"] = json.dumps(config).encode()
    folder = write_folder(tmp_path / "ckpt", files)
    with pytest.raises(UserError, match=message):
        load_checkpoint_config(folder)


def test_local_folder_damaged_json(tmp_path):
    files = checkpoint_files("x")
    files["config.json"] = files["config.json"][:40]
    folder = write_folder(tmp_path / "ckpt", files)
    with pytest.raises(UserError, match="damaged: not valid JSON"):
        load_checkpoint_config(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("encoder"), "'encoder' section"),
        (lambda c: c["encoder"].update(resolution="32"), "encoder.resolution must be a int"),
        (lambda c: c.update(files={}), "lists no weights files"),
        (lambda c: c.update(files={"../evil.safetensors": "0" * 64}), "plain"),
        (lambda c: c["files"].update({"predictor.safetensors": "abc"}), "64 lowercase hex"),
    ],
)
def test_local_folder_bad_structure(tmp_path, change, message):
    files = checkpoint_files("x")
    config = json.loads(files["config.json"])
    change(config)
    files["config.json"] = json.dumps(config).encode()
    folder = write_folder(tmp_path / "ckpt", files)
    with pytest.raises(UserError, match=message):
        load_checkpoint_config(folder)


def test_spec_that_is_neither_folder_nor_hub(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        resolve_weights(str(tmp_path / "nowhere"))
    a_file = tmp_path / "config.json"
    a_file.write_text("{}")
    with pytest.raises(UserError, match="is a file"):
        resolve_weights(str(a_file))
    with pytest.raises(UserError, match="not a metad2a checkpoint"):
        resolve_weights(str(tmp_path))


# --- encoder check -------------------------------------------------------------------


def test_check_encoder():
    config = json.loads(checkpoint_files("x")["config.json"])
    check_encoder(config, ENCODER["identity"])
    check_encoder(config, ENCODER["identity"], resolution=ENCODER["resolution"])
    with pytest.raises(UserError) as err:
        check_encoder(config, "vit-b16-clip")
    assert str(err.value) == (
        "these weights expect encoder resnet18-imagenet at resolution 32; this metad2a uses vit-b16-clip"
    )
    with pytest.raises(UserError, match="uses resnet18-imagenet at resolution 64"):
        check_encoder(config, ENCODER["identity"], resolution=64)


# --- writing -------------------------------------------------------------------------


def test_write_checkpoint_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    predictor = {"w": rng.standard_normal((6, 2)).astype(np.float32)}
    generator = {"w": rng.standard_normal((3, 3)).astype(np.float64)[:, ::2]}  # not contiguous
    config = {"name": "written", "model": {"h": 2}, "encoder": ENCODER, "database": {}, "metrics": {}}
    folder = tmp_path / "out" / "ckpt"
    written = write_checkpoint(folder, config, {"p.safetensors": predictor, "g.safetensors": generator})

    loaded = load_checkpoint_config(folder)
    assert loaded == written.config
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["files"]["p.safetensors"] == hashlib.sha256((folder / "p.safetensors").read_bytes()).hexdigest()
    again = resolve_weights(str(folder))
    np.testing.assert_array_equal(again.arrays("p.safetensors")["w"], predictor["w"])
    np.testing.assert_array_equal(again.arrays("g.safetensors")["w"], generator["w"])
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "g.safetensors", "p.safetensors"]


def test_write_checkpoint_refuses_bad_input_and_leaves_old_checkpoint(tmp_path):
    config = {"name": "v1", "model": {}, "encoder": ENCODER, "database": {}, "metrics": {}}
    folder = tmp_path / "ckpt"
    write_checkpoint(folder, config, {"p.safetensors": {"w": np.zeros(2, np.float32)}})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        write_checkpoint(folder, {**config, "name": "v2"}, {"p.safetensors": {"w": [1.0, 2.0]}})
    with pytest.raises(UserError, match="plain"):
        write_checkpoint(folder, {**config, "name": "v2"}, {"p.bin": {"w": np.ones(2, np.float32)}})
    with pytest.raises(UserError, match="'encoder' section"):
        write_checkpoint(folder, {"name": "v2", "model": {}, "database": {}, "metrics": {}},
                         {"p.safetensors": {"w": np.ones(2, np.float32)}})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_write_checkpoint_accepts_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    config = {"name": "t", "model": {}, "encoder": ENCODER, "database": {}, "metrics": {}}
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # a transposed view
    checkpoint = write_checkpoint(tmp_path / "ckpt", config, {"m.safetensors": {"w": tensor}})
    np.testing.assert_array_equal(checkpoint.arrays("m.safetensors")["w"], tensor.numpy())


def test_importing_weights_does_not_import_torch_or_the_hub_client():
    code = (
        "import sys, metad2a_cli.meta.weights as w; w.packaged_weights_dir();"
        "print(sorted(m for m in ('torch', 'huggingface_hub') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- spec parsing and settings -------------------------------------------------------


def test_hub_ref_parse():
    assert HubRef.parse("hf://org/repo") == HubRef("org/repo", None)
    assert HubRef.parse("hf://org/repo@v1.0") == HubRef("org/repo", "v1.0")
    assert HubRef.parse("hf://org/repo@refs/pr/3") == HubRef("org/repo", "refs/pr/3")
    assert str(HubRef("org/repo", "abc")) == "hf://org/repo@abc"
    for bad in ("hf://repo", "hf://org/repo/extra", "hf://org/repo@", "hf:///repo", "hf://org/"):
        with pytest.raises(UserError, match="is not hf://ORG/REPO"):
            HubRef.parse(bad)


def test_hub_settings_follow_huggingface_hub_precedence(tmp_path):
    env = {"HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": "http://127.0.0.1:9/"}
    settings = HubSettings.from_env(env)
    assert settings.cache_dir == tmp_path / "home" / "hub"
    assert settings.endpoint == "http://127.0.0.1:9"
    assert settings.offline is False
    assert HubSettings.from_env({**env, "HF_HUB_CACHE": str(tmp_path / "c")}).cache_dir == tmp_path / "c"
    assert HubSettings.from_env({"XDG_CACHE_HOME": str(tmp_path)}).cache_dir == tmp_path / "huggingface" / "hub"
    assert HubSettings.from_env({"HF_HUB_OFFLINE": "yes"}).offline is True
    assert HubSettings.from_env({"HF_HUB_OFFLINE": "0"}).offline is False
    assert HubSettings.from_env({"HF_HUB_ETAG_TIMEOUT": "1"}).timeout_s == 1.0
    assert HubSettings.from_env({"HF_HUB_ETAG_TIMEOUT": "60"}).timeout_s == weights.HUB_TIMEOUT_S


# --- the Hub -------------------------------------------------------------------------


def test_hub_download_then_cache_then_offline(hub, hf_env, monkeypatch):
    files = checkpoint_files("from-hub")
    commit = hub.repo("org/repo").commit(files)

    checkpoint = resolve_weights("hf://org/repo")
    assert checkpoint.source == "hub"
    assert checkpoint.name == "from-hub"
    assert checkpoint.path == hf_env / "hub" / "models--org--repo" / "snapshots" / commit
    assert (checkpoint.path / "predictor.safetensors").read_bytes() == files["predictor.safetensors"]
    assert {p.name for p in snapshot_files(hf_env, "org/repo")} == set(files)
    assert any(path.startswith("/org/repo/resolve/main/config.json") for path in hub.requested("GET"))

    hub.stop()
    # Hub gone, not offline: the probe fails fast and the cache answers.
    assert resolve_weights("hf://org/repo").path == checkpoint.path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = resolve_weights("hf://org/repo")
    assert (offline.path, offline.source, offline.config) == (checkpoint.path, "hub", checkpoint.config)


def test_hub_revision_pinning(hub, hf_env, monkeypatch):
    repo = hub.repo("org/repo")
    old = repo.commit(checkpoint_files("old", seed=1))
    repo.refs["v1"] = old
    new = repo.commit(checkpoint_files("new", seed=2))
    assert old != new

    assert resolve_weights("hf://org/repo").name == "new"
    assert resolve_weights("hf://org/repo@v1").name == "old"
    pinned = resolve_weights(f"hf://org/repo@{old}")
    assert pinned.name == "old"
    assert pinned.path.name == old
    # The weights files come from the commit config.json was read at.
    assert f"/org/repo/resolve/{old}/predictor.safetensors" in hub.requested("GET") or \
        f"/org/repo/resolve/{old}/predictor.safetensors" in hub.requested("HEAD")

    # A cached commit never changes, so it is not asked for again.
    asked = len(hub.requests)
    assert resolve_weights(f"hf://org/repo@{old}").name == "old"
    assert len(hub.requests) == asked

    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_weights("hf://org/repo@v1").name == "old"
    assert resolve_weights("hf://org/repo").name == "new"


def test_hub_unknown_repo_revision_or_file(hub):
    hub.repo("org/repo").commit(checkpoint_files("x"))
    hub.repo("org/empty").commit({"README.md": b"hello"})
    with pytest.raises(UserError, match="no Hub repository org/nothing"):
        resolve_weights("hf://org/nothing")
    with pytest.raises(UserError, match="no revision 'v9'"):
        resolve_weights("hf://org/repo@v9")
    with pytest.raises(UserError, match="has no config.json"):
        resolve_weights("hf://org/empty")


def test_hub_listed_file_missing_from_repo(hub):
    files = checkpoint_files("x")
    del files["generator.safetensors"]
    hub.repo("org/repo").commit(files)
    with pytest.raises(UserError, match="has no generator.safetensors"):
        resolve_weights("hf://org/repo")


def test_explicit_hub_down_fails_fast(hf_env):
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        resolve_weights("hf://org/repo")
    assert time.monotonic() - start < 10
    assert isinstance(err.value, weights.HubUnavailable)
    assert "cannot connect to http://127.0.0.1" in str(err.value)
    assert "holds no copy" in str(err.value)


def test_offline_without_cache_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set, and the cache .* holds no copy"):
        resolve_weights("hf://org/repo")


def test_default_uses_the_hub_when_it_answers(hub, packaged):
    hub.repo(DEFAULT_REPO).commit(checkpoint_files("default-on-hub"))
    lines: list[str] = []
    checkpoint = resolve_weights(None, log=lines.append)
    assert (checkpoint.source, checkpoint.name, lines) == ("hub", "default-on-hub", [])


def test_default_falls_back_to_packaged_when_hub_down(packaged):
    lines: list[str] = []
    start = time.monotonic()
    checkpoint = resolve_weights(None, log=lines.append)
    assert time.monotonic() - start < 10
    assert (checkpoint.source, checkpoint.path, checkpoint.name) == ("packaged", packaged, "shipped")
    assert len(lines) == 1
    assert lines[0].startswith(UNREACHABLE_MESSAGE)
    assert "\n" not in lines[0]


def test_default_falls_back_when_hub_does_not_answer(packaged, monkeypatch):
    # A server that accepts connections but never replies: only the timeout ends the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(weights, "HUB_TIMEOUT_S", 0.5)
        lines: list[str] = []
        start = time.monotonic()
        checkpoint = resolve_weights(None, log=lines.append)
        elapsed = time.monotonic() - start
    assert checkpoint.source == "packaged"
    assert elapsed < 5
    assert lines == [f"{UNREACHABLE_MESSAGE} (no answer from {weights.HubSettings.from_env().endpoint} within 0.5 s)"]


def test_hub_outage_uses_cache_or_packaged(hub, packaged):
    hub.repo(DEFAULT_REPO).commit(checkpoint_files("on-hub"))
    hub.outage = 503
    lines: list[str] = []
    assert resolve_weights(None, log=lines.append).source == "packaged"
    assert lines == [f"{UNREACHABLE_MESSAGE} ({hub.endpoint} answered HTTP 503)"]
    with pytest.raises(weights.HubUnavailable, match="answered HTTP 503"):
        resolve_weights("hf://org/repo")

    hub.outage = None
    assert resolve_weights(None).source == "hub"  # fills the cache
    hub.outage = 503
    lines.clear()
    assert (resolve_weights(None, log=lines.append).name, lines) == ("on-hub", [])


def test_default_offline_prefers_cache_then_packaged(hub, packaged, monkeypatch):
    hub.repo(DEFAULT_REPO).commit(checkpoint_files("cached-default"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines: list[str] = []
    assert resolve_weights(None, log=lines.append).source == "packaged"  # nothing cached yet
    assert len(lines) == 1 and lines[0].startswith(UNREACHABLE_MESSAGE)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_weights(None).source == "hub"  # fills the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines.clear()
    cached = resolve_weights(None, log=lines.append)
    assert (cached.source, cached.name, lines) == ("hub", "cached-default", [])


def test_default_repo_missing_falls_back(hub, packaged):
    lines: list[str] = []
    assert resolve_weights(None, log=lines.append).source == "packaged"
    assert lines == [f"{DEFAULT_REPO} is not on the Hub; using the weights shipped with metad2a"]


def test_default_without_any_weights_explains(monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "packaged_weights_dir", lambda: tmp_path / "none")
    with pytest.raises(UserError) as err:
        resolve_weights(None)
    message = str(err.value)
    assert "--weights PATH" in message and "hf://" in message and "metad2a train" in message


@pytest.mark.parametrize("fault", ["cut", "short"])
def test_truncated_download_is_refused(hub, hf_env, fault):
    files = checkpoint_files("x")
    hub.repo("org/repo").commit(files)
    hub.faults["generator.safetensors"] = fault
    start = time.monotonic()
    with pytest.raises(UserError, match="downloading generator.safetensors from hf://org/repo failed"):
        resolve_weights("hf://org/repo")
    assert time.monotonic() - start < 10
    assert "generator.safetensors" not in {p.name for p in snapshot_files(hf_env, "org/repo")}
    # No blob for it, complete or partial, stayed in the cache.
    blobs_dir = hf_env / "hub" / "models--org--repo" / "blobs"
    assert hashlib.sha256(files["generator.safetensors"]).hexdigest() not in {p.name for p in blobs_dir.iterdir()}
    assert not [p for p in blobs_dir.iterdir() if p.name.endswith(".incomplete")]

    del hub.faults["generator.safetensors"]  # the server heals: the next call succeeds
    assert resolve_weights("hf://org/repo").name == "x"


def test_hash_mismatch_is_refused_every_time(hub, hf_env, monkeypatch):
    hub.repo("org/repo").commit(checkpoint_files("x"))
    hub.faults["predictor.safetensors"] = "corrupt"
    for _ in range(2):
        with pytest.raises(UserError, match="predictor.safetensors from hf://org/repo does not match the sha256"):
            resolve_weights("hf://org/repo")
        assert "predictor.safetensors" not in {p.name for p in snapshot_files(hf_env, "org/repo")}
    # The refused bytes are not in the cache, so offline there is nothing to (mis)trust.
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.HubUnavailable, match="no copy of its predictor.safetensors"):
        resolve_weights("hf://org/repo")


def test_tampered_cache_is_refused_and_evicted(hub, hf_env, monkeypatch):
    hub.repo("org/repo").commit(checkpoint_files("x"))
    checkpoint = resolve_weights("hf://org/repo")
    target = checkpoint.path / "generator.safetensors"
    blob = target.resolve()
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-4] + b"evil")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="generator.safetensors from hf://org/repo does not match"):
        resolve_weights("hf://org/repo")
    assert not target.exists() and not blob.exists()

    monkeypatch.delenv("HF_HUB_OFFLINE")  # online again: a good copy is fetched
    assert sorted(resolve_weights("hf://org/repo").files) == sorted(checkpoint.files)


# --- packaging -----------------------------------------------------------------------


def test_pyproject_ships_every_package_and_the_weights_folder():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["metad2a_cli._weights"] == "weights"
    assert "metad2a_cli._weights" in setuptools["packages"]
    # The list is explicit (the finder cannot map weights/), so a new subpackage must be added.
    on_disk = {".".join(p.parent.relative_to(root / "src").parts) for p in (root / "src").rglob("__init__.py")}
    assert on_disk - set(setuptools["packages"]) == set()


def test_packaged_weights_dir_in_a_checkout():
    from importlib import resources

    found = weights.packaged_weights_dir()
    # In a wheel or a checkout alike, the default weights are there and verify.
    config = weights.load_checkpoint_config(found)
    for name, sha in config["files"].items():
        weights.verify_file(found / name, sha)
    if not (resources.files("metad2a_cli") / "_weights").is_dir():  # not a wheel install
        assert found == Path(__file__).resolve().parents[1] / "weights" / weights.PACKAGED_CHECKPOINT
