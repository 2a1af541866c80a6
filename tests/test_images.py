"""Reading image folders and lists, decoding every format and every kind of bad file."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metad2a_cli.data.images import (
    BROKEN_LINK,
    CORRUPT,
    DUPLICATE,
    EMPTY,
    EMPTY_CLASS,
    HIDDEN,
    LOOP,
    MISSING,
    NOT_A_FILE,
    NOT_IMAGE,
    OUTSIDE,
    TOO_LARGE,
    UNREADABLE,
    BadImage,
    load_rgb,
    read_image_folder,
    read_image_list,
    sample_order,
    sample_per_class,
    summarize,
)
from metad2a_cli.errors import UserError


def write_image(path: Path, size=(16, 12), color=(200, 30, 40), fmt: str | None = None, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def reasons(skipped) -> dict[str, str]:
    return {s.path.name: s.reason for s in skipped}


def decode_reason(path: Path) -> str:
    with pytest.raises(BadImage) as info:
        load_rgb(path)
    return info.value.reason


# -- folder layout ---------------------------------------------------------------------------


def test_classes_are_first_level_folders_with_images_anywhere_below(tmp_path):
    write_image(tmp_path / "b_dog" / "1.png")
    write_image(tmp_path / "a_cat" / "x.jpg")
    write_image(tmp_path / "a_cat" / "deeper" / "more" / "y.png")
    folder = read_image_folder(tmp_path)
    assert folder.classes == ("a_cat", "b_dog")
    assert [[p.name for p in f] for f in folder.files] == [["y.png", "x.jpg"], ["1.png"]]
    assert folder.skipped == ()


def test_hidden_loose_and_special_entries_are_skipped_with_reasons(tmp_path):
    write_image(tmp_path / "cat" / "1.png")
    write_image(tmp_path / "dog" / "1.png")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\1")
    write_image(tmp_path / "dog" / ".hidden_dir" / "2.png")
    write_image(tmp_path / ".git" / "3.png")  # a hidden top-level folder is no class
    (tmp_path / "README.txt").write_text("about these images")
    (tmp_path / "empty_class").mkdir()
    os.mkfifo(tmp_path / "dog" / "pipe")
    folder = read_image_folder(tmp_path)
    assert folder.classes == ("cat", "dog")
    assert reasons(folder.skipped) == {
        ".DS_Store": HIDDEN,
        ".hidden_dir": HIDDEN,
        ".git": HIDDEN,
        "README.txt": OUTSIDE,
        "empty_class": EMPTY_CLASS,
        "pipe": NOT_A_FILE,
    }
    assert "6 skipped" in summarize(folder.skipped) and "3 hidden" in summarize(folder.skipped)


def test_symlink_loops_and_broken_links_are_skipped_not_followed_forever(tmp_path):
    write_image(tmp_path / "cat" / "1.png")
    write_image(tmp_path / "dog" / "sub" / "1.png")
    os.symlink("..", tmp_path / "dog" / "sub" / "up")  # loops back to dog/
    os.symlink("self", tmp_path / "cat" / "self")  # points at itself: ELOOP
    os.symlink("nowhere.png", tmp_path / "cat" / "gone.png")
    folder = read_image_folder(tmp_path)
    assert [len(f) for f in folder.files] == [1, 1]
    assert reasons(folder.skipped) == {"up": LOOP, "self": LOOP, "gone.png": BROKEN_LINK}


def test_symlinked_class_folders_are_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "a.png")
    root = tmp_path / "root"
    write_image(root / "cat" / "1.png")
    os.symlink(elsewhere, root / "dog")
    folder = read_image_folder(root)
    assert folder.classes == ("cat", "dog") and folder.files[1][0].name == "a.png"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root.mkdir(), "no classes"),
        (lambda root: write_image(root / "only" / "1.png"), "only one class"),
        (lambda root: (write_image(root / "a.png"), (root / "x").mkdir()), "no classes"),
    ],
)
def test_folders_that_are_not_datasets_are_user_errors(tmp_path, make, message):
    root = tmp_path / "root"
    make(root)
    with pytest.raises(UserError, match=message):
        read_image_folder(root)


def test_missing_root_and_plain_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_image_folder(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        read_image_folder(tmp_path / "f.txt")


# -- lists -----------------------------------------------------------------------------------


def test_csv_list_with_header_relative_paths_missing_and_duplicates(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.png")
    write_image(tmp_path / "imgs" / "c.png")
    lst = tmp_path / "labels.csv"
    lst.write_text(
        "filename,label\nimgs/a.png,cat\nimgs/b.png,dog\nimgs/c.png,dog\nimgs/gone.png,cat\nimgs/a.png,cat\n"
    )
    folder = read_image_folder(lst)  # dispatches on the suffix
    assert folder.root == tmp_path
    assert folder.classes == ("cat", "dog")
    assert [[p.name for p in f] for f in folder.files] == [["a.png"], ["b.png", "c.png"]]
    assert sorted(s.reason for s in folder.skipped) == sorted([MISSING, DUPLICATE])


def test_csv_without_header_and_json_forms(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "l.csv").write_text("a.png,0\nb.png,1\n")
    assert read_image_list(tmp_path / "l.csv").classes == ("0", "1")
    (tmp_path / "l.json").write_text(json.dumps([{"path": "a.png", "label": 3}, ["b.png", "x"]]))
    folder = read_image_list(tmp_path / "l.json")
    assert folder.classes == ("3", "x")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("l.json", "{not json", "not valid JSON"),
        ("l.json", json.dumps({"a": 1}), "expected a JSON list"),
        ("l.json", json.dumps([{"path": "a.png"}]), "non-empty label"),
        ("l.csv", "a.png\n", "expected a path and a label"),
        ("l.csv", "a.png,cat\n", "only one class"),
    ],
)
def test_malformed_lists_are_user_errors(tmp_path, name, text, message):
    write_image(tmp_path / "a.png")
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message):
        read_image_list(tmp_path / name)


@pytest.mark.parametrize(
    ("name", "text"),
    [("l.csv", "a.png,cat\nb\0.png,dog\n"), ("l.json", json.dumps([["a.png", "cat"], ["b\0.png", "dog"]]))],
)
def test_a_nul_byte_in_a_listed_path_is_a_user_error(tmp_path, name, text):
    write_image(tmp_path / "a.png")
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=r"(row 2|item 1): the path holds a NUL byte"):
        read_image_list(tmp_path / name)


def test_csv_header_with_other_column_names(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "l.csv").write_text("file,category\na.png,cat\nb.png,dog\n")
    folder = read_image_list(tmp_path / "l.csv")
    assert folder.classes == ("cat", "dog") and folder.skipped == ()  # the header is no row


def test_a_folder_of_splits_is_named_as_such(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            write_image(tmp_path / split / c / "1.png")
    with pytest.raises(UserError, match=f"{tmp_path} holds the splits train, val, each a folder of class folders; "
                                        f"give one of them, e.g. {tmp_path / 'train'}"):
        read_image_folder(tmp_path)
    assert read_image_folder(tmp_path / "train").classes == ("cat", "dog")


def test_a_link_back_to_the_root_is_no_class(tmp_path):
    write_image(tmp_path / "root" / "cat" / "1.png")
    write_image(tmp_path / "root" / "dog" / "1.png")
    os.symlink(".", tmp_path / "root" / "all")
    os.symlink("..", tmp_path / "root" / "up")
    folder = read_image_folder(tmp_path / "root")
    assert folder.classes == ("cat", "dog")
    assert reasons(folder.skipped) == {"all": LOOP, "up": LOOP}


# -- sampling --------------------------------------------------------------------------------


def test_sampling_is_seeded_prefix_stable_and_per_class(tmp_path):
    files = [tmp_path / f"{i:03d}.png" for i in range(60)]
    assert sample_order(files, 0, "cat") == sample_order(files, 0, "cat")
    assert sample_order(files, 0, "cat") != sample_order(files, 1, "cat")
    assert sample_order(files, 0, "cat") != sample_order(files, 0, "dog")
    assert sorted(sample_order(files, 5, "cat")) == sorted(files)

    for c in ("cat", "dog", "eel"):
        for i in range(30 if c != "eel" else 3):
            write_image(tmp_path / "set" / c / f"{i:02d}.png", size=(2, 2))
    folder = read_image_folder(tmp_path / "set")
    small, large = sample_per_class(folder, 5, seed=7), sample_per_class(folder, 12, seed=7)
    assert [len(s) for s in small] == [5, 5, 3]  # eel has only 3: all of them
    assert all(big[:5] == s[:5] for big, s in zip(large, small))  # a larger sample extends a smaller

    # A class's sample does not depend on which other classes exist.
    write_image(tmp_path / "other" / "zebra" / "0.png")
    os.symlink(tmp_path / "set" / "cat", tmp_path / "other" / "cat")
    other = read_image_folder(tmp_path / "other")
    assert other.classes == ("cat", "zebra")
    assert [p.name for p in sample_per_class(other, 5, seed=7)[0]] == [p.name for p in small[0]]
    with pytest.raises(UserError):
        sample_per_class(folder, 0)


# -- decoding: formats -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM"])
def test_every_supported_format_decodes_to_rgb(tmp_path, fmt):
    path = write_image(tmp_path / f"img.{fmt.lower()}", size=(24, 16), color=(0, 160, 255), fmt=fmt)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (24, 16)
    r, g, b = np.asarray(image)[8, 12].astype(int)
    assert b > 200 and r < 40 and 120 < g < 200  # lossy formats drift a little, not far


def test_pgm_grayscale_becomes_rgb(tmp_path):
    path = write_image(tmp_path / "g.pgm", color=90, fmt="PPM", mode="L")
    assert np.asarray(load_rgb(path))[0, 0].tolist() == [90, 90, 90]


def test_png_with_a_jpeg_name_is_read_by_its_content(tmp_path):
    path = write_image(tmp_path / "photo.jpg", color=(1, 2, 3), fmt="PNG")
    assert np.asarray(load_rgb(path))[0, 0].tolist() == [1, 2, 3]  # lossless: really read as PNG


def test_one_pixel_image(tmp_path):
    image = load_rgb(write_image(tmp_path / "dot.png", size=(1, 1), color=(9, 8, 7)))
    assert image.size == (1, 1) and np.asarray(image)[0, 0].tolist() == [9, 8, 7]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    assert np.asarray(load_rgb(path))[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_and_transparent_palette_are_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [10, 20, 30] and out[3, 3].tolist() == [255, 255, 255]

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.gif", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "p.gif"))
    assert out[1, 1].tolist() == [200, 0, 0] and out[0, 0].tolist() == [255, 255, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    r, g, b = np.asarray(load_rgb(path))[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    r, g, b = np.asarray(load_rgb(tmp_path / "anim.gif"))[3, 3].astype(int)
    assert r > 200 and b < 60


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.size == (10, 20)  # portrait once upright
    a = np.asarray(out).astype(int)
    assert a[2, 5].mean() > 200 and a[17, 5].mean() < 60  # the white half is now on top


def test_jpeg_draft_keeps_the_requested_size(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(800, 600))
    assert min(load_rgb(path, min_size=64).size) >= 64
    assert load_rgb(path, min_size=64).size[0] < 800  # decoded at a reduced scale


# -- decoding: bad files ---------------------------------------------------------------------


def test_truncated_jpeg(tmp_path):
    good = write_image(tmp_path / "good.jpg", size=(64, 64), color=(10, 200, 30))
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert decode_reason(tmp_path / "cut.jpg") == CORRUPT


def test_jpeg_cut_inside_its_header_is_corrupt_not_foreign(tmp_path):
    good = write_image(tmp_path / "good.jpg", size=(64, 64))
    (tmp_path / "stub.jpg").write_bytes(good.read_bytes()[:40])
    assert decode_reason(tmp_path / "stub.jpg") == CORRUPT


def test_truncated_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert decode_reason(tmp_path / "cut.png") == CORRUPT


def test_empty_text_and_garbage_files(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image at all")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))  # JPEG magic, then noise
    assert decode_reason(tmp_path / "zero.jpg") == EMPTY
    assert decode_reason(tmp_path / "notes.png") == NOT_IMAGE
    assert decode_reason(tmp_path / "junk.jpg") == CORRUPT


def test_eps_files_are_not_handed_to_ghostscript(tmp_path):
    (tmp_path / "x.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert decode_reason(tmp_path / "x.eps") == NOT_IMAGE


def _png_claiming(width: int, height: int) -> bytes:
    # A valid PNG header for a huge image and a tiny (deflated, all-zero) data stream: the
    # shape of a decompression bomb, without building one.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(50_000, 50_000))  # over 2x PIL's limit: PIL raises
    (tmp_path / "big.png").write_bytes(_png_claiming(10_000, 10_000))  # over 1x: PIL only warns
    assert decode_reason(tmp_path / "bomb.png") == TOO_LARGE
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_reason(tmp_path / "big.png") == TOO_LARGE


def test_the_pixel_limit_follows_pil(tmp_path, monkeypatch):
    path = write_image(tmp_path / "a.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000 - 1)
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_reason(path) == TOO_LARGE


def test_unopenable_paths(tmp_path):
    (tmp_path / "dir.png").mkdir()
    assert decode_reason(tmp_path / "dir.png") == UNREADABLE
    os.symlink("loop.png", tmp_path / "loop.png")
    assert decode_reason(tmp_path / "loop.png") == LOOP


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(tmp_path):
    path = write_image(tmp_path / "secret.png")
    path.chmod(0)
    assert decode_reason(path) == UNREADABLE


def test_summary_counts_by_reason():
    from metad2a_cli.data.images import Skipped

    skipped = [Skipped(Path("a"), CORRUPT), Skipped(Path("b"), HIDDEN), Skipped(Path("c"), CORRUPT)]
    assert summarize(skipped) == f"3 skipped: 2 {CORRUPT}, 1 {HIDDEN}"
    assert summarize([]) == ""

