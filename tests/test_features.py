"""encode_folder end to end: sampling, bad files, the per-image cache, the output file, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metad2a_cli.cli import run
from metad2a_cli.data import features as feat
from metad2a_cli.data.encoder import FEATURE_DIM, ImageEncoder
from metad2a_cli.data.features import (
    DatasetFeatures,
    FeatureCache,
    encode_folder,
    encode_images,
)
from metad2a_cli.data.images import CORRUPT, NOT_IMAGE, read_image_folder
from metad2a_cli.errors import UserError

RES = 32  # the smallest resolution the encoder takes: these tests check plumbing, not features


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    return ImageEncoder(resolution=RES, device="cpu")


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("METAD2A_CACHE", str(root))
    return root


def noise_image(path: Path, seed: int, size=(20, 14)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_set(root: Path, per_class: dict[str, int]) -> Path:
    seed = 0
    for name, n in per_class.items():
        for i in range(n):
            noise_image(root / name / f"{i:02d}.png", seed)
            seed += 1
    return root


def run_encode(root: Path, encoder: ImageEncoder, n: int = 3, seed: int = 0, **kw) -> DatasetFeatures:
    return encode_images(read_image_folder(root), n, seed, encoder, **kw)


def cache_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.bin"))


def test_per_class_features_and_sample_counts(tmp_path, encoder, cache_root):
    root = make_set(tmp_path / "set", {"a": 5, "b": 4, "c": 2})
    out = run_encode(root, encoder, n=3)
    assert out.classes == ["a", "b", "c"]
    assert out.counts == [3, 3, 2] and out.short_classes == {"c": 2}
    assert all(f.shape == (n, FEATURE_DIM) and f.dtype == np.float32 for f, n in zip(out.features, out.counts))
    assert out.encoder == encoder.identity
    assert all(len(files) == n for files, n in zip(out.files, out.counts))
    assert set(out.files[2]) == {"c/00.png", "c/01.png"}
    # The features are those of the files named, in that order.
    direct = encoder.encode([encoder.prepare(Image.open(root / out.files[0][1]).convert("RGB"))])
    np.testing.assert_allclose(out.features[0][1:2], direct.numpy(), atol=1e-4, rtol=1e-4)


def test_seed_fixes_the_sample(tmp_path, encoder, cache_root):
    root = make_set(tmp_path / "set", {"a": 12, "b": 12})
    first, again = run_encode(root, encoder, seed=3), run_encode(root, encoder, seed=3)
    assert first.files == again.files
    torch.testing.assert_close(first.features, again.features)
    assert run_encode(root, encoder, seed=4).files != first.files


def test_bad_files_are_skipped_and_replaced_by_the_next_in_order(tmp_path, encoder, cache_root):
    root = make_set(tmp_path / "set", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes((root / "a" / "00.png").read_bytes()[:60])
    (root / "b" / "notes.jpg").write_text("hello")
    out = run_encode(root, encoder, n=4)  # every file is needed, so every file is tried
    assert out.counts == [3, 3]
    assert {(s.path.name, s.reason) for s in out.skipped} == {("broken.png", CORRUPT), ("notes.jpg", NOT_IMAGE)}
    assert all("broken" not in f and "notes" not in f for files in out.files for f in files)


def test_a_class_with_no_readable_image_is_dropped(tmp_path, encoder, cache_root):
    root = make_set(tmp_path / "set", {"a": 2, "b": 2})
    (root / "c").mkdir()
    (root / "c" / "x.png").write_bytes(b"")
    out = run_encode(root, encoder)
    assert out.classes == ["a", "b"] and out.dropped_classes == ["c"]


def test_no_readable_images_is_a_user_error(tmp_path, encoder, cache_root):
    for c in ("a", "b"):
        (tmp_path / "set" / c).mkdir(parents=True)
        (tmp_path / "set" / c / "x.jpg").write_text("not an image")
    with pytest.raises(UserError, match="no readable images"):
        run_encode(tmp_path / "set", encoder)
    noise_image(tmp_path / "set" / "a" / "ok.png", 0)
    with pytest.raises(UserError, match="one class only"):
        run_encode(tmp_path / "set", encoder)


# -- cache -----------------------------------------------------------------------------------


def test_second_run_neither_decodes_nor_loads_the_network(tmp_path, encoder, cache_root, monkeypatch):
    root = make_set(tmp_path / "set", {"a": 3, "b": 3})
    (root / "a" / "bad.png").write_text("x")
    cold = run_encode(root, encoder, n=4)
    assert cold.stats.decoded == 6 and cold.stats.cache_hits == 0
    assert len(cache_files(cache_root)) == 7  # 6 features and one remembered bad file

    def boom(*a, **k):
        raise AssertionError("a warm run must not decode or encode")

    monkeypatch.setattr(feat, "load_rgb", boom)
    fresh = ImageEncoder(resolution=RES, device="cpu")
    monkeypatch.setattr(type(fresh), "encode", boom)
    warm = run_encode(root, fresh, n=4)
    assert warm.stats.cache_hits == 6 and warm.stats.decoded == 0
    assert "model" not in vars(fresh)  # the network was never built
    assert [(s.path.name, s.reason) for s in warm.skipped] == [("bad.png", NOT_IMAGE)]
    torch.testing.assert_close(warm.features, cold.features)


def test_a_changed_file_is_encoded_again(tmp_path, encoder, cache_root):
    root = make_set(tmp_path / "set", {"a": 2, "b": 2})
    cold = run_encode(root, encoder)
    changed = root / "b" / "01.png"
    noise_image(changed, 999)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # a later edit
    warm = run_encode(root, encoder)
    assert warm.stats.decoded == 1 and warm.stats.cache_hits == 3
    row = cold.files[1].index("b/01.png")
    assert not np.allclose(warm.features[1][row], cold.features[1][row])
    torch.testing.assert_close(warm.features[0], cold.features[0])


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "nan"])
def test_a_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path, encoder, cache_root, damage):
    root = make_set(tmp_path / "set", {"a": 2, "b": 2})
    cold = run_encode(root, encoder)
    entry = cache_files(cache_root)[0]
    blob = bytearray(entry.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x40
    elif damage == "truncate":
        blob = blob[:100]
    elif damage == "garbage":
        blob = bytearray(os.urandom(len(blob)))
    if damage == "nan":
        # A well-formed entry (right digest) whose numbers are not finite: still refused.
        FeatureCache(cache_root / "features").put(entry.stem, np.full(FEATURE_DIM, np.nan, np.float32))
    else:
        entry.write_bytes(bytes(blob))
    warm = run_encode(root, encoder)
    assert warm.stats.cache_rebuilt == 1 and warm.stats.decoded == 1 and warm.stats.cache_hits == 3
    # Recomputed alone rather than in a batch of 4: equal up to float summation order.
    torch.testing.assert_close(warm.features, cold.features, atol=1e-4, rtol=1e-4)
    again = run_encode(root, encoder)  # the rebuilt entry is good again
    assert again.stats.cache_hits == 4 and again.stats.cache_rebuilt == 0


def test_a_different_encoder_does_not_share_entries(tmp_path, encoder, cache_root):
    root = make_set(tmp_path / "set", {"a": 2, "b": 2})
    run_encode(root, encoder)
    other = run_encode(root, ImageEncoder(resolution=RES + 8, device="cpu"))
    assert other.stats.cache_hits == 0 and other.stats.decoded == 4
    assert other.features[0].shape == (2, FEATURE_DIM)


def test_larger_samples_reuse_the_smaller_ones(tmp_path, encoder, cache_root):
    root = make_set(tmp_path / "set", {"a": 6, "b": 6})
    run_encode(root, encoder, n=2)
    more = run_encode(root, encoder, n=5)
    assert more.stats.cache_hits == 4 and more.stats.decoded == 6


def test_no_cache_reads_and_writes_nothing(tmp_path, encoder, cache_root):
    root = make_set(tmp_path / "set", {"a": 2, "b": 2})
    run_encode(root, encoder)
    entries = {p: p.read_bytes() for p in cache_files(cache_root)}
    out = run_encode(root, encoder, cache=False)
    assert out.stats.cache_hits == 0 and out.stats.decoded == 4
    assert {p: p.read_bytes() for p in cache_files(cache_root)} == entries


def test_cache_lives_under_the_configured_root(tmp_path, encoder, monkeypatch):
    monkeypatch.delenv("METAD2A_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run_encode(make_set(tmp_path / "set", {"a": 1, "b": 1}), encoder)
    assert len(cache_files(tmp_path / "xdg" / "metad2a" / "features")) == 2


def test_an_unwritable_cache_does_not_fail_the_run(tmp_path, encoder, cache_root):
    cache_root.mkdir()
    (cache_root / "features").write_text("a file where the cache folder should be")
    out = run_encode(make_set(tmp_path / "set", {"a": 1, "b": 1}), encoder)
    assert out.counts == [1, 1] and out.stats.cache_write_error


# -- output file and CLI ---------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, encoder, cache_root):
    out = run_encode(make_set(tmp_path / "set", {"a": 3, "b": 1}), encoder)
    path = out.save(tmp_path / "f.safetensors")
    back = DatasetFeatures.load(path)
    assert back.classes == out.classes and back.files == out.files and back.encoder == out.encoder
    assert (back.num_samples, back.seed) == (3, 0)
    torch.testing.assert_close(back.features, out.features)
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError):
        DatasetFeatures.load(tmp_path / "x.safetensors")


def test_encode_folder_reads_lists_too(tmp_path, cache_root):
    root = make_set(tmp_path / "set", {"a": 2, "b": 2})
    rows = [{"path": f"set/{c}/{i:02d}.png", "label": c.upper()} for c in "ab" for i in range(2)]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    out = encode_folder(tmp_path / "list.json", num_samples=2, device="cpu", resolution=RES)
    assert out.classes == ["A", "B"] and out.counts == [2, 2]
    assert out.files[0][0].startswith("set/a/") and root.is_dir()


def test_cli_encode_writes_features_and_reports_skips(tmp_path, cache_root, capsys, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # restored after the test
    root = make_set(tmp_path / "set", {"a": 2, "b [my data]": 1})  # brackets: not rich markup
    (root / "a" / "cut.png").write_bytes((root / "a" / "00.png").read_bytes()[:50])
    out = tmp_path / "f.safetensors"
    assert run(["encode", str(root), "-o", str(out), "--num-samples", "3", "--device", "cpu", "--verbose"]) == 0
    captured = capsys.readouterr()
    assert "1 skipped: 1 truncated or corrupt" in captured.err
    assert "cut.png" in captured.err  # --verbose names it
    assert "'b [my data]' has 1" in captured.err  # a short class says so
    assert DatasetFeatures.load(out).counts == [2, 1]
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # for the torch it would have loaded

    before = out.read_bytes()
    assert run(["encode", str(root), "-o", str(out), "-n", "3", "--device", "cpu", "--json"]) == 2
    assert f"{out} exists; add --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert run(["encode", str(root), "-o", str(out), "-n", "3", "--device", "cpu", "--json", "--force"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache_hits"] == 3 and info["decoded"] == 0
    assert info["skipped"] == [{"path": str(root / "a" / "cut.png"), "reason": "truncated or corrupt"}]


def test_cli_errors_are_one_line_and_exit_2(tmp_path, cache_root, capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the command must not override a choice
    (tmp_path / "one" / "only").mkdir(parents=True)
    noise_image(tmp_path / "one" / "only" / "a.png", 0)
    assert run(["encode", str(tmp_path / "one"), "-o", str(tmp_path / "f.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "only one class" in err and "Traceback" not in err
    assert run(["encode", str(tmp_path / "missing"), "-o", str(tmp_path / "f.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
