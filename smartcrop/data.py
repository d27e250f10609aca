"""Dataset readers (official GAICD and FCDB layouts) and photo-folder listing.  No image is decoded here.

GAICD (Zeng et al.): ``ROOT/images/SPLIT/*.jpg`` and ``ROOT/annotations/SPLIT/*.txt`` with one line
``y1 x1 y2 x2 MOS`` per grid-anchor crop in the image's pixels (note: y first); MOS −2 marks an unrated crop.
Any split name works (``dev``, ``train``, ``val``, ``test`` …), so the full GAICD release reads unchanged.

FCDB (Chen et al.): ``ROOT/images/`` and ``ROOT/cropping_{training,testing}_set.json``, lists of
``{"url", "flickr_photo_id", "crop": [x, y, w, h]}``; the image file is the last part of the url.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np

GAICD_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
UNRATED = -2.0
MOS_RANGE = (1.0, 5.0)  # GAICD's scores are means of 1-5 ratings
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


@dataclass(frozen=True)
class GaicdItem:
    """One annotated GAICD image.  Equality and hashing use ``name`` and ``image_path`` only (arrays are not
    hashable)."""

    name: str
    image_path: Path
    boxes: np.ndarray = field(repr=False, compare=False)  # (N, 4) float32 x1, y1, x2, y2 in image pixels
    mos: np.ndarray = field(repr=False, compare=False)  # (N,) float32 mean opinion scores


@dataclass(frozen=True)
class FcdbItem:
    name: str
    image_path: Path
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels


def gaicd_splits(root: str | os.PathLike) -> list[str]:
    """Labeled splits of a GAICD root: names with both ``images/SPLIT/`` and ``annotations/SPLIT/``, sorted.

    Image-only folders (e.g. an unlabeled ``holdout``) are not listed; a root without ``annotations/`` has none.
    """
    root = Path(root)
    d = root / "annotations"
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (root / "images" / p.name).is_dir())


def parse_gaicd_annotation(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes (N, 4) x1 y1 x2 y2, mos (N,))`` float32 from one GAICD ``y1 x1 y2 x2 MOS`` file, in file order.

    Blank lines are ignored (and a UTF-8 byte-order mark) and unrated crops (MOS -2) skipped; anything else
    malformed — not five plain decimal numbers, a MOS outside GAICD's 1 to 5, an empty box — raises
    ``ValueError`` naming the file and line number.
    """
    boxes, mos = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM: a Notepad save
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not text: {raw.strip()[:60]!r}") from None
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 5:
                raise ValueError(f"{path}:{lineno}: expected 'y1 x1 y2 x2 MOS', got {line.strip()[:80]!r}")
            if not all(_DECIMAL.fullmatch(v) for v in parts):  # float() also takes "1_0", "nan", other digits
                raise ValueError(f"{path}:{lineno}: not numbers: {line.strip()[:80]!r}")
            y1, x1, y2, x2, m = (float(v) for v in parts)
            if not all(np.isfinite((y1, x1, y2, x2, m))) or max(abs(y1), abs(x1), abs(y2), abs(x2), abs(m)) > 1e9:
                raise ValueError(f"{path}:{lineno}: not finite or out of range: {line.strip()!r}")
            if m == UNRATED:
                continue
            if not MOS_RANGE[0] <= m <= MOS_RANGE[1]:
                raise ValueError(f"{path}:{lineno}: MOS {m:g} is outside GAICD's {MOS_RANGE[0]:g} to "
                                 f"{MOS_RANGE[1]:g} ({UNRATED:g}: unrated)")
            if not (x2 > x1 and y2 > y1):
                raise ValueError(f"{path}:{lineno}: empty box {line.strip()!r}")
            boxes.append((x1, y1, x2, y2))
            mos.append(m)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(mos, dtype=np.float32)


def read_gaicd(root: str | os.PathLike, split: str, on_error: Callable[[str], None] | None = None
               ) -> list[GaicdItem]:
    """Annotated images of one split (any split name), sorted by name.

    Images (.jpg/.jpeg/.png) without an annotation file (``STEM.txt``, the suffix in any case) are unlabeled
    and skipped, as are images whose crops are all unrated and (counted in one ``UserWarning``) those with
    fewer than two differently scored crops.
    A missing ``images/SPLIT`` or ``annotations/SPLIT`` folder raises ``FileNotFoundError`` (naming the
    labeled splits there are); a malformed annotation line raises ``ValueError`` naming the file and line —
    or, with ``on_error``, is reported there in one line and that image skipped.
    """
    if split in {"", ".", ".."} or "/" in split or "\\" in split:
        raise ValueError(f"{_short(split)} is not a split name (a folder of ROOT/images/ and ROOT/annotations/)")
    root = Path(root)
    img_dir = root / "images" / split
    ann_dir = root / "annotations" / split
    if not img_dir.is_dir() or not ann_dir.is_dir():
        splits = gaicd_splits(root)
        here = f"; the labeled splits of {root} are {', '.join(splits)}" if splits else ""
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{img_dir}: no such GAICD image folder (expected ROOT/images/{split}/{here})")
        raise FileNotFoundError(f"{ann_dir}: no such GAICD annotation folder (expected ROOT/annotations/{split}/"
                                f"{here})")
    items, flat, empty = [], 0, 0
    images = [p for p in img_dir.iterdir()
              if p.suffix.lower() in GAICD_IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    # annotation files by stem, the suffix in any case (a.txt, a.TXT: cameras and Windows tools write both)
    anns: dict[str, list[Path]] = {}
    for a in ann_dir.iterdir():
        if a.suffix.lower() == ".txt" and not a.name.startswith(".") and a.is_file():
            anns.setdefault(a.stem, []).append(a)
    by_stem: dict[str, Path] = {}
    for img in sorted(images, key=lambda p: (p.stem, p.name)):
        if img.stem not in anns:
            continue
        if len(anns[img.stem]) > 1:
            names = " and ".join(sorted(a.name for a in anns[img.stem]))
            raise ValueError(f"{ann_dir}: {names} both annotate {img.name}: keep one")
        ann = anns[img.stem][0]
        if img.stem in by_stem:
            raise ValueError(f"{ann}: annotates both {by_stem[img.stem].name} and {img.name}: keep one")
        by_stem[img.stem] = img
        try:
            boxes, mos = parse_gaicd_annotation(ann)
        except ValueError as e:
            if on_error is None:
                raise
            on_error(f"{e}; {img.name} skipped")
            continue
        if len(np.unique(mos)) < 2:  # nothing to rank (one crop, or all tied): SRCC 0 and Acc 100 mean nothing
            flat += bool(len(mos))
            empty += not len(mos)
            continue
        items.append(GaicdItem(img.stem, img, boxes, mos))
    orphans = sum(len(v) for stem, v in anns.items() if stem not in by_stem)
    if orphans:
        warnings.warn(f"{ann_dir}: {orphans} annotation files have no image in {img_dir}; skipped", stacklevel=2)
    if flat:
        warnings.warn(f"{ann_dir}: {flat} annotation files score fewer than two crops differently (nothing to "
                      "rank); skipped", stacklevel=2)
    if empty:
        warnings.warn(f"{ann_dir}: {empty} annotation files score no crop (empty, or every crop unrated); skipped",
                      stacklevel=2)
    return items


def read_fcdb(root: str | os.PathLike, split: str = "test") -> list[FcdbItem]:
    """Photos of FCDB's ``train`` or ``test`` list with their expert crop ``(x, y, x + w, y + h)``, in list order.

    The image file is the last part of each entry's url, looked up in ``ROOT/images/``.  Entries whose image
    is missing are skipped and counted in one ``UserWarning``.
    """
    root = Path(root)
    names = {"train": "cropping_training_set.json", "test": "cropping_testing_set.json"}
    if split not in names:
        raise ValueError(f"FCDB split must be 'train' or 'test', not {split!r}")
    js = root / names[split]
    if not js.is_file():
        raise FileNotFoundError(f"{js}: no such FCDB list")
    try:
        entries = json.loads(js.read_text())
    except ValueError as e:
        raise ValueError(f"{js}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{js}: not an FCDB list (JSON nested too deeply to read)") from None
    if not isinstance(entries, list):
        raise ValueError(f"{js}: expected a JSON list of {{url, flickr_photo_id, crop}} entries")
    items, missing, seen, repeated = [], 0, set(), 0
    for k, e in enumerate(entries):
        try:
            url, crop = e["url"], e["crop"]
        except (KeyError, TypeError):
            raise ValueError(f"{js}: entry {k} lacks a url or a crop [x, y, w, h]") from None
        if not isinstance(url, str):
            raise ValueError(f"{js}: entry {k}: url {_short(url)} is not text")
        # the file name is the last part of the url's path (a query or fragment is not part of it)
        fname = (urlsplit(url).path if "://" in url else url).rstrip("/").rsplit("/", 1)[-1]
        x = y = w = h = float("nan")  # not a box unless four JSON numbers ("1234" is not 1, 2, 3, 4; true not 1)
        if isinstance(crop, list) and len(crop) == 4 and all(type(v) in (int, float) for v in crop):
            try:
                x, y, w, h = (float(v) for v in crop)
            except OverflowError:  # an integer beyond any float
                pass
        if not (np.isfinite((x, y, w, h)).all() and max(abs(x), abs(y), w, h) < 1e9 and w > 0 and h > 0):
            raise ValueError(f"{js}: entry {k}: crop {_short(e['crop'])} is not a box [x, y, w, h] with w, h > 0")
        path = root / "images" / fname
        if not path.is_file():
            missing += 1
            continue
        if fname in seen:  # a photo listed again would weigh twice in the metrics (and in training)
            repeated += 1
            continue
        seen.add(fname)
        items.append(FcdbItem(Path(fname).stem, path, (x, y, x + w, y + h)))
    if missing:
        warnings.warn(f"{js}: {missing} listed photos are not in {root / 'images'}; skipped", stacklevel=2)
    if repeated:
        warnings.warn(f"{js}: {repeated} entries list a photo already listed; only its first entry is used",
                      stacklevel=2)
    return items


@contextmanager
def reading(on_note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Around reading annotated data (:func:`read_gaicd`, :func:`read_fcdb`): a reader's ``ValueError`` or
    ``OSError`` (a malformed annotation or list, a missing file) becomes a one-line
    :class:`~smartcrop.errors.UsageError`, and its warnings (annotations without a photo, photos not there,
    photos listed twice) go to ``on_note`` as ``note: …`` lines (else to Python's warnings)."""
    from .errors import UsageError

    try:
        with warnings.catch_warnings(record=on_note is not None) as caught:
            yield
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    for w in caught or ():
        on_note(f"note: {w.message}")


def annotation_outside(item, width: int, height: int, slack: float = 1.0) -> str | None:
    """Why the annotated crops of a :class:`GaicdItem` or :class:`FcdbItem` do not fit its ``width`` ×
    ``height`` photo (the first crop reaching more than ``slack`` pixels beyond it), or None when they fit.
    Annotations of another photo, or of a resized copy, show up this way."""
    b = np.asarray(item.boxes if isinstance(item, GaicdItem) else [item.box], dtype=np.float64).reshape(-1, 4)
    bad = (b[:, 0] < -slack) | (b[:, 1] < -slack) | (b[:, 2] > width + slack) | (b[:, 3] > height + slack)
    if not bad.any():
        return None
    x1, y1, x2, y2 = b[int(np.argmax(bad))]
    return (f"the annotated crop x {x1:g}-{x2:g}, y {y1:g}-{y2:g} lies outside the {width}x{height} photo "
            "(the annotation of another photo or of a resized copy, or x and y swapped?)")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def file_identity(path: str | os.PathLike) -> tuple:
    """What makes two paths the same file: its (st_dev, st_ino), links followed; for a path that cannot be
    stat'ed, its resolved form.  How a photo reached twice (given twice, through a link) is counted once."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return (st.st_dev, st.st_ino)


def list_images(paths: Iterable[str | os.PathLike], recursive: bool = True,
                on_error: Callable[[str], None] | None = None) -> list[Path]:
    """Image files among ``paths``: files as given, folders walked (recursively by default) with the one folder
    walker of ``run`` (:func:`smartcrop.inputs.walk_folder`: sorted, hidden entries, non-files and smartcrop's own
    outputs skipped).

    A missing path raises ``FileNotFoundError`` naming it; an unreadable sub-folder or a non-file entry is
    reported through ``on_error`` (default: a warning) and skipped.  A file reached twice (given twice, given and
    in a folder given, or through a link) is listed once, where first reached.
    """
    from .inputs import walk_folder

    report = on_error or (lambda line: warnings.warn(line, stacklevel=3))
    out: list[Path] = []
    seen: set = set()

    def add(f: Path) -> None:
        key = file_identity(f)
        if key not in seen:
            seen.add(key)
            out.append(f)

    for p in paths:
        p = Path(p)
        if p.is_file():
            add(p)
        elif p.is_dir():
            for f, _ in walk_folder(p, recursive, report):
                add(f)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out
