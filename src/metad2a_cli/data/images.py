"""Read a labeled image set: a folder of class folders, or a CSV/JSON list of (path, label).

Bad input never crashes a read and never passes silently: whatever is left out is kept as
a ``Skipped(path, reason)`` so the caller can print one summary line (and list them on
request). Listing is cheap; images are opened only when sampled (``load_rgb``), so a
broken file is found, and reported, when a run would have used it.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

# PIL format names tried when opening, whatever the file's extension says. "JPEG" also
# opens the multi-picture JPEGs (MPO) many cameras write; "PPM" covers pgm and pbm too.
# Keeping the list short keeps plugins such as EPS (which runs Ghostscript) off user files.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
LIST_SUFFIXES = (".csv", ".json")
# Unambiguous first bytes of accepted formats: a file that starts like an image but does
# not open is a damaged image, not some other kind of file.
_MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\0", b"MM\0*")

# Reasons, short and fixed so a summary can count them.
HIDDEN = "hidden"
LOOP = "symlink loop"
BROKEN_LINK = "broken link"
UNREADABLE = "unreadable"
NOT_A_FILE = "not a regular file"
EMPTY = "empty file"
NOT_IMAGE = "not an image"
CORRUPT = "truncated or corrupt"
TOO_LARGE = "too many pixels (decompression bomb?)"
OUTSIDE = "not in a class folder"
EMPTY_CLASS = "class folder without files"
MISSING = "listed but missing"
DUPLICATE = "listed twice"


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str
    detail: str = ""  # the underlying error, for --verbose


class BadImage(Exception):
    """A file that cannot be used as an image; ``reason`` is one of the reasons above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageFolder:
    """A labeled image set as listed: classes (sorted) and their candidate files (sorted).

    Files are candidates, not yet opened; ``load_rgb`` decides whether each is an image.
    """

    root: Path
    classes: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]  # parallel to classes
    skipped: tuple[Skipped, ...]

    @property
    def num_files(self) -> int:
        return sum(len(f) for f in self.files)


def summarize(skipped: Sequence[Skipped]) -> str:
    """'3 skipped: 2 hidden, 1 truncated or corrupt', or '' when nothing was skipped."""
    if not skipped:
        return ""
    counts = Counter(s.reason for s in skipped)
    parts = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
    return f"{len(skipped)} skipped: {parts}"


# -- folders -------------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _stat_error_reason(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return LOOP
    if err.errno == errno.ENOENT:
        return BROKEN_LINK
    return UNREADABLE


def _walk(folder: Path, ancestors: frozenset[tuple[int, int]], skipped: list[Skipped]) -> Iterable[Path]:
    """Regular files below ``folder``, following symlinks but never around a loop."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        skipped.append(Skipped(folder, UNREADABLE, err.strerror or str(err)))
        return
    for entry in entries:
        path = Path(entry.path)
        if _is_hidden(entry.name):
            skipped.append(Skipped(path, HIDDEN))
            continue
        if entry.is_file(follow_symlinks=False):  # the common case, known without a stat
            yield path
            continue
        try:
            st = entry.stat()  # follows symlinks
        except OSError as err:
            skipped.append(Skipped(path, _stat_error_reason(err), err.strerror or str(err)))
            continue
        if entry.is_dir():
            node = (st.st_dev, st.st_ino)
            if node in ancestors:  # a link back up the tree
                skipped.append(Skipped(path, LOOP))
                continue
            yield from _walk(path, ancestors | {node}, skipped)
        elif entry.is_file():
            yield path
        else:
            skipped.append(Skipped(path, NOT_A_FILE))


def _check_classes(classes: Sequence[str], root: Path, layout: str) -> None:
    if not classes:
        raise UserError(f"no classes with files in {root}; expected {layout}")
    if len(classes) == 1:
        raise UserError(
            f"only one class ({classes[0]!r}) in {root}; a classification dataset needs at least 2"
        )


# Folder names that mean a dataset split, not a class (ROOT/train/<class>/..., ROOT/val/...).
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")


def _check_not_splits(root: Path, classes: Sequence[str], files: Sequence[Sequence[Path]]) -> None:
    """Refuse ROOT/train/<class> + ROOT/val/<class>: read as is, the splits would be the classes."""
    if not classes or any(c.lower() not in SPLIT_NAMES for c in classes):
        return
    if all(len(f.relative_to(root / c).parts) >= 2 for c, fs in zip(classes, files) for f in fs):
        first = next((c for c in classes if c.lower().startswith("train")), classes[0])
        raise UserError(
            f"{root} holds the splits {', '.join(classes)}, each a folder of class folders; "
            f"give one of them, e.g. {root / first}"
        )


def _nodes_up_to_root(root: Path) -> frozenset[tuple[int, int]]:
    """(device, inode) of ``root`` and every folder above it: a class folder linking to one
    of them would hold the whole set (or more) as one class."""
    nodes = set()
    for folder in (root, *root.resolve().parents):
        try:
            st = folder.stat()
        except OSError:
            continue
        nodes.add((st.st_dev, st.st_ino))
    return frozenset(nodes)


def read_image_folder(root: str | Path) -> ImageFolder:
    """``ROOT/<class>/<images>``: a class is a first-level folder, its images anywhere below.

    A path ending in .csv or .json is read as a list instead (``read_image_list``).
    """
    root = Path(root)
    if root.suffix.lower() in LIST_SUFFIXES and root.is_file():
        return read_image_list(root)
    if not root.exists():
        raise UserError(f"{root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder, nor a .csv or .json list of images")
    skipped: list[Skipped] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"cannot read {root}: {err.strerror}") from err
    st = root.stat()
    top = frozenset({(st.st_dev, st.st_ino)})
    above = _nodes_up_to_root(root)
    classes: list[str] = []
    files: list[tuple[Path, ...]] = []
    for entry in entries:
        path = Path(entry.path)
        if _is_hidden(entry.name):
            skipped.append(Skipped(path, HIDDEN))
            continue
        try:
            st = entry.stat()
        except OSError as err:
            skipped.append(Skipped(path, _stat_error_reason(err), err.strerror or str(err)))
            continue
        if not entry.is_dir():
            skipped.append(Skipped(path, OUTSIDE))
            continue
        if (st.st_dev, st.st_ino) in above:
            skipped.append(Skipped(path, LOOP))
            continue
        found = tuple(_walk(path, top | {(st.st_dev, st.st_ino)}, skipped))
        if found:
            classes.append(entry.name)
            files.append(found)
        else:
            skipped.append(Skipped(path, EMPTY_CLASS))
    _check_not_splits(root, classes, files)
    _check_classes(classes, root, "ROOT/<class>/<image> (one folder per class)")
    return ImageFolder(root, tuple(classes), tuple(files), tuple(skipped))


# -- lists -----------------------------------------------------------------------------------

_PATH_KEYS = ("path", "file", "filename", "filepath", "file_path", "image", "image_path", "img")
_LABEL_KEYS = ("label", "class", "category", "target", "class_name", "classname")


def _pick(row: dict, keys: Sequence[str]) -> object:
    for key in keys:
        if key in row:
            return row[key]
    return None


def _csv_rows(path: Path) -> list[tuple[int, object, object]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if any(cell.strip() for cell in r)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    # One known column name makes the first row a header; the other column is then the
    # first one not named (a header "file,category" is not a file labeled "category").
    pi = next((header.index(k) for k in _PATH_KEYS if k in header), None)
    li = next((header.index(k) for k in _LABEL_KEYS if k in header), None)
    if pi is not None or li is not None:
        pi = pi if pi is not None else next(i for i in range(len(header) + 1) if i != li)
        li = li if li is not None else next(i for i in range(len(header) + 1) if i != pi)
        body, first_line = rows[1:], 2
    else:
        pi, li, body, first_line = 0, 1, rows, 1
    out = []
    for line, row in enumerate(body, start=first_line):
        if len(row) <= max(pi, li):
            raise UserError(f"{path}, row {line}: expected a path and a label, got {row!r}")
        out.append((line, row[pi].strip(), row[li].strip()))
    return out


def _json_rows(path: Path) -> list[tuple[int, object, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise UserError(f'{path}: expected a JSON list of {{"path": ..., "label": ...}} or [path, label]')
    out = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            out.append((i, _pick(item, _PATH_KEYS), _pick(item, _LABEL_KEYS)))
        elif isinstance(item, list) and len(item) == 2:
            out.append((i, item[0], item[1]))
        else:
            raise UserError(f"{path}, item {i}: expected {{'path': ..., 'label': ...}} or [path, label]")
    return out


def read_image_list(list_path: str | Path) -> ImageFolder:
    """A CSV (columns path,label; header optional) or JSON list of (path, label).

    Relative paths are read from the list's own folder, which becomes the set's root.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise UserError(f"{list_path} does not exist")
    is_csv = list_path.suffix.lower() == ".csv"
    try:
        rows = _csv_rows(list_path) if is_csv else _json_rows(list_path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read {list_path}: {err}") from err
    root = list_path.parent
    where = "row" if is_csv else "item"
    by_class: dict[str, list[Path]] = {}
    seen: set[str] = set()
    skipped: list[Skipped] = []
    for line, raw_path, label in rows:
        if not isinstance(raw_path, str) or not raw_path or label is None or str(label).strip() == "":
            raise UserError(f"{list_path}, {where} {line}: needs a path and a non-empty label")
        if "\0" in raw_path:  # no file system has such a name; os.stat raises ValueError
            raise UserError(f"{list_path}, {where} {line}: the path holds a NUL byte")
        path = root / raw_path
        key = os.path.normpath(os.path.abspath(path))
        if key in seen:
            skipped.append(Skipped(path, DUPLICATE))
            continue
        seen.add(key)
        try:
            st = os.stat(path)
        except OSError as err:
            reason = MISSING if err.errno == errno.ENOENT else _stat_error_reason(err)
            skipped.append(Skipped(path, reason, err.strerror or str(err)))
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped.append(Skipped(path, NOT_A_FILE))
            continue
        by_class.setdefault(str(label).strip(), []).append(path)
    classes = sorted(by_class)
    _check_classes(classes, list_path, "rows of (path, label) with at least 2 labels")
    files = tuple(tuple(sorted(by_class[c], key=str)) for c in classes)
    return ImageFolder(root, tuple(classes), files, tuple(skipped))


# -- sampling --------------------------------------------------------------------------------


def sample_order(files: Sequence[Path], seed: int, label: str) -> list[Path]:
    """A class's files in a reproducible random order.

    Seeded by (seed, class name), so a class draws the same images whatever other classes
    the set has, and a larger sample starts with the smaller one: asking 50 per class
    reuses the 20 already encoded. Callers walk the order and pass over unreadable files.
    """
    order = list(files)
    random.Random(f"{seed}/{label}").shuffle(order)
    return order


def sample_per_class(folder: ImageFolder, num_samples: int, seed: int = 0) -> list[list[Path]]:
    """Up to ``num_samples`` files per class (every file when a class has fewer)."""
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    return [sample_order(f, seed, c)[:num_samples] for c, f in zip(folder.classes, folder.files)]


# -- decoding --------------------------------------------------------------------------------


def _flatten_alpha(image):
    from PIL import Image

    # Transparent pixels keep whatever colour they were saved with, often black; a white
    # backdrop is what a viewer shows and what logo or icon classes look like.
    rgba = image.convert("RGBA")
    backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(backdrop, rgba).convert("RGB")


def _to_rgb(image):
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(image).astype(np.float32)
        if mode.startswith("I;16"):
            a = a / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0  # float images usually hold 0..1
        elif a.size and float(a.max()) > 255:
            a = a / 257.0  # a 32-bit integer image holding 16-bit samples (older PIL, PNG)
        gray = np.nan_to_num(a).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    return image if mode == "RGB" else image.convert("RGB")


def load_rgb(path: str | Path, min_size: int | None = None):
    """Decode one file into an upright 8-bit RGB PIL image, or raise ``BadImage``.

    The file's content decides its format, not its extension. ``min_size`` lets JPEG
    decoding skip detail (DCT scaling) while keeping both sides at least that long.
    GIFs give their first frame; EXIF orientation is applied; grey, palette, alpha,
    16-bit and CMYK images all come back as RGB. Over PIL's pixel limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) the file is refused before it is decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        fh = open(path, "rb")
    except OSError as err:
        raise BadImage(_stat_error_reason(err), err.strerror or str(err)) from err
    with fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise BadImage(EMPTY)
        try:
            image = Image.open(fh, formats=IMAGE_FORMATS)
        except UnidentifiedImageError as err:
            fh.seek(0)
            head = fh.read(12)
            damaged = head.startswith(_MAGICS) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            raise BadImage(CORRUPT if damaged else NOT_IMAGE) from err
        except Image.DecompressionBombError as err:
            raise BadImage(TOO_LARGE, str(err)) from err
        except Exception as err:  # a header PIL recognised but could not parse
            raise BadImage(CORRUPT, f"{type(err).__name__}: {err}") from err
        width, height = image.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:
            raise BadImage(TOO_LARGE, f"{width}x{height} pixels")
        if width < 1 or height < 1:
            raise BadImage(CORRUPT, f"size {width}x{height}")
        try:
            if min_size and image.format in ("JPEG", "MPO"):
                image.draft(None, (min_size, min_size))
            image.load()  # PIL refuses truncated files unless told otherwise; we never tell it
        except Exception as err:  # PIL raises many types for damaged data; all mean the same
            raise BadImage(CORRUPT, f"{type(err).__name__}: {err}") from err
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:
        pass  # damaged EXIF: the pixels are fine, only the orientation tag is lost
    try:
        return _to_rgb(image)
    except Exception as err:  # a colour mode PIL cannot convert
        raise BadImage(CORRUPT, f"{type(err).__name__}: {err}") from err
