"""Benchmarks on GAICD (dense human scores) and FCDB (one expert crop per photo).

GAICD: the model scores every annotated crop of each image; per-image SRCC/PCC and Acc K/N are averaged
(:func:`smartcrop.metrics.gaicd_metrics`).  FCDB: the model picks its best crop, either among free GAIC anchors
(``ratio="any"``, as the paper does) or among anchors of the expert crop's aspect ratio (``ratio="gt"``); IoU
and boundary displacement are averaged.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .anchors import FREE_GRID, free_anchors, ratio_anchors
from .data import FcdbItem, GaicdItem, annotation_outside
from .imageio import ImageError, load_image
from .metrics import fcdb_metrics, gaicd_metrics
from .progress import track


def decoded_items(cropper, items: Sequence, what: str, progress: bool | None, on_error) -> Iterator[tuple]:
    """``(item, loaded image)`` for every item whose image decodes at the model's input size and whose
    annotated crops lie on the photo (:func:`~smartcrop.data.annotation_outside`); the others are reported
    through ``on_error`` (with ``progress``: a progress bar titled ``what``).  Public for benchmarks that score
    the same photos their own way (benchmarks/free_grid.py and others)."""
    for item in track(items, len(items), what, progress):
        try:
            li = load_image(item.image_path, target_short_side=cropper.config.short_side)
        except ImageError as e:
            if on_error:
                on_error(f"{item.image_path}: {e}")
            continue
        outside = annotation_outside(item, *li.full_size)
        if outside is not None:
            if on_error:
                on_error(f"{item.image_path}: {outside}; photo skipped")
            continue
        yield item, li


def gaicd_predictions(cropper, items: Sequence[GaicdItem], progress: bool | None = None,
                      on_error: Callable[[str], None] | None = None) -> list[tuple[GaicdItem, np.ndarray]]:
    """Model scores of every annotated crop of every image, in annotation order."""
    out = []
    for item, li in decoded_items(cropper, items, "GAICD", progress, on_error):
        s = cropper.score_boxes(li.image, li.full_size, {"gt": item.boxes})["gt"]
        out.append((item, s))
    return out


def evaluate_gaicd(cropper, items: Sequence[GaicdItem], predictions_path: str | Path | None = None,
                   progress: bool | None = None, on_error=None) -> dict:
    preds = gaicd_predictions(cropper, items, progress, on_error)
    if predictions_path is not None:
        write_predictions(preds, predictions_path)
    return gaicd_metrics((s, item.mos) for item, s in preds)


def check_predictions_path(path: str | Path, root: str | Path) -> None:
    """Refuse, before any scoring, a predictions file that cannot be written where asked (a folder, a missing
    folder), that would land among the benchmark's own files (under ``ROOT/images`` or ``ROOT/annotations``,
    where it would replace an annotation or become one) or that would replace anything but an earlier
    predictions file or an empty one (the model being scored, your notes, a link, a device): a
    :class:`~smartcrop.errors.UsageError` naming it."""
    from .errors import UsageError
    from .imageio import safe_name

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{safe_name(p)}: is a folder: give the predictions a file name")
    if not p.parent.is_dir():
        what = "not a folder" if os.path.lexists(p.parent) else "no such folder"
        raise UsageError(f"{safe_name(p.parent)}: {what} for the predictions file")
    target = p.parent.resolve() / p.name
    for sub in ("images", "annotations"):
        folder = (Path(root) / sub).resolve()
        if folder in target.parents:
            raise UsageError(f"{safe_name(p)}: inside the benchmark's {sub} folder, where it would replace or "
                             "join its files: write the predictions elsewhere")
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"{safe_name(p)}: cannot be checked ({e.strerror})") from None
    if not stat.S_ISREG(mode) or not _is_predictions(p):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file" if not stat.S_ISREG(mode) else \
            "not a predictions file"
        raise UsageError(f"{safe_name(p)}: exists and is {what}; --predictions replaces only an earlier "
                         "predictions file (or an empty one): choose another name")


def _is_predictions(path: Path, limit: int = 256 << 20) -> bool:
    """Whether ``path`` is empty or holds what :func:`write_predictions` writes (one ``{"image", "scores"}``
    object a line); a file over ``limit`` bytes is not read and counts as not."""
    try:
        if path.stat().st_size > limit:
            return False
        with open(path, "rb") as f:
            for line in f:
                d = json.loads(line)
                if not (isinstance(d, dict) and d.keys() == {"image", "scores"}):
                    return False
    except (OSError, ValueError):  # unreadable, not UTF-8 (UnicodeDecodeError), not JSON
        return False
    return True


def write_predictions(preds, path: str | Path) -> None:
    """One JSON line per image: ``{"image": NAME, "scores": [...]}`` in annotation order (atomic write)."""
    from .imageio import write_atomic

    lines = [json.dumps({"image": item.name, "scores": [round(float(v), 6) for v in s]}) + "\n" for item, s in preds]
    write_atomic(path, "".join(lines).encode())


def fcdb_eval_candidates(width: int, height: int, box, ratio: str, grid: str = FREE_GRID) -> np.ndarray:
    """The crops FCDB evaluation chooses among on a ``width`` × ``height`` photo whose expert crop is ``box``:
    the free anchors of ``grid`` (``ratio="any"``; with ``cropper.refine`` :func:`fcdb_choices` adds the best
    one's neighbours, as ``run --refine`` does) or the anchors of the expert crop's aspect ratio (``"gt"``)."""
    if ratio == "any":
        return free_anchors(width, height, grid)
    x1, y1, x2, y2 = box
    return ratio_anchors(width, height, max(x2 - x1, 1e-6) / max(y2 - y1, 1e-6))


def fcdb_choices(cropper, items: Sequence[FcdbItem], ratio: str = "any", progress: bool | None = None,
                 on_error=None) -> list[tuple[FcdbItem, np.ndarray, tuple[int, int]]]:
    """The model's best box for each photo: among free anchors (``any``: of ``cropper.free_grid``; refined
    around the best one when ``cropper.refine``) or anchors of the expert's ratio (``gt``), chosen and fused with its neighbours as
    :class:`~smartcrop.cropper.Cropper` does (``cropper.fuse``; ``cropper.faces``)."""
    if ratio not in {"any", "gt"}:
        raise ValueError(f"ratio must be 'any' or 'gt', not {ratio!r}")
    out = []
    for item, li in decoded_items(cropper, items, f"FCDB ({ratio})", progress, on_error):
        w, h = li.full_size
        sets = {"a": fcdb_eval_candidates(w, h, item.box, ratio, cropper.free_grid)}
        refine = ["a"] if ratio == "any" and cropper.refine else []
        faces = cropper.find_faces(li.image, (w, h))
        s = cropper.score_boxes_batch([(li.image, (w, h))], [sets], refine=refine, faces=[faces])[0]["a"]
        c = cropper.choice_scores(sets["a"], s, faces)
        out.append((item, cropper.fused(sets["a"], c, int(np.argmax(c)), ratio == "any"), (w, h)))
    return out


def evaluate_fcdb(cropper, items: Sequence[FcdbItem], ratio: str = "any", progress: bool | None = None,
                  on_error=None) -> dict:
    choices = fcdb_choices(cropper, items, ratio, progress, on_error)
    return fcdb_metrics((tuple(b), item.box, w, h) for item, b, (w, h) in choices)


def benchmark_items(kind: str, root: str | Path, split: str, on_note: Callable[[str], None] | None = None,
                    on_error: Callable[[str], None] | None = None) -> list:
    """The annotated items of a GAICD (``kind="gaicd"``) or FCDB (``"fcdb"``: split test or train) benchmark;
    an unreadable or empty one is a :class:`~smartcrop.errors.UsageError` naming it.  The readers' warnings
    (annotations without a photo, photos not there) go to ``on_note``, one line each (else to Python's
    warnings); with ``on_error``, a GAICD image whose annotation is malformed is reported there and skipped."""
    from .data import read_fcdb, read_gaicd, reading
    from .errors import UsageError

    if kind == "fcdb" and split not in {"test", "train"}:
        raise UsageError(f"FCDB split must be test or train, not {split!r}")
    with reading(on_note):
        items = read_gaicd(root, split, on_error) if kind == "gaicd" else read_fcdb(root, split)
    if not items:
        raise UsageError(f"{root}: no annotated images in split {split!r}")
    seen = _also_in_training_list(root, items) if kind == "fcdb" and split == "test" and on_note else 0
    if seen:
        on_note(f"note: {seen} photos of the test list are also in the training list of {root}: a model trained "
                "on that list has seen them")
    return items


def _also_in_training_list(root: str | Path, items: Sequence[FcdbItem]) -> int:
    """How many of FCDB test ``items`` the training list of ``root`` names too (0 when it cannot be read)."""
    import warnings

    from .data import read_fcdb

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its photos missing here, or listed twice: not this split's concern
            train = {it.image_path for it in read_fcdb(root, "train")}
    except (OSError, ValueError):
        return 0
    return sum(it.image_path in train for it in items)
