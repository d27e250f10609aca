"""The three stages every photo of a ``run`` goes through, as plain functions of picklable values.

1. :func:`prepare` (a worker): decode at the network's size (JPEG DCT scaling: a 12 MP JPEG is never decoded
   at full size here), apply EXIF orientation, resize to the network input → :class:`Prepared`.
2. scoring: :meth:`smartcrop.cropper.Cropper.best_crops_batch` on a batch of prepared images in the process that
   holds the model — or, on a many-core CPU, :func:`prepare_and_score` in every worker (each loads the model
   once; :class:`WorkerModel`).
3. :func:`finish` (a worker): for each chosen crop, either a lossless DCT-domain crop of the JPEG
   (:mod:`smartcrop.jpegcrop`) or a full decode (once per photo), crop, optional resize and encode; then an
   atomic write → one :class:`Written` per crop.

The local engine (:mod:`smartcrop.runner`) runs stages 1 and 3 in a process pool and stage 2 in the main
process or in the pool; a distributed engine can run the same functions as remote tasks.  Only
:func:`prepare_and_score` imports torch, in the worker that runs it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from .cropper import MIN_CROP_SIDE, Choice
from .errors import SmartcropError, one_line, out_of_memory


class CropError(SmartcropError):
    """A chosen crop cannot be written as asked (too small, would need upscaling): fails that photo."""


@dataclass
class Prepared:
    """A photo ready for scoring."""

    image: object  # PIL RGB image at the network's input size
    full_size: tuple[int, int]  # upright full-resolution (w, h)
    format: str  # Pillow format name of the source ("JPEG", "PNG", ...)
    has_alpha: bool = False
    reduced_depth: int = 0  # bits per sample of a deeper source whose crops will be 8-bit (0: none)
    faces: object = None  # with --faces: the faces found on ``image`` (full-size pixels, faces.detect_faces)
    gray_depth: int = 0  # bits per sample of a 16-bit grayscale source: PNG and TIFF crops keep them, others not


def depth_lost(reduced_depth: int, gray_depth: int, ext: str) -> int:
    """Bits per sample of a deep source that its crops written as ``ext`` reduce to 8 (0: none): any deep
    source's (``Prepared.reduced_depth``), and 16-bit grayscale's (``Prepared.gray_depth``) unless the crops are
    PNG or TIFF."""
    from .imageio import DEEP_FORMATS, OUTPUT_FORMATS

    if gray_depth and OUTPUT_FORMATS.get("." + ext.lower().lstrip(".")) not in DEEP_FORMATS:
        return gray_depth
    return reduced_depth


@dataclass
class CropSpec:
    """One crop to write."""

    ratio: str
    box: tuple[int, int, int, int]  # upright full-resolution pixels
    score: float
    out_size: tuple[int, int]  # size of the written image
    target: str | None  # output path, or None to return the encoded bytes (stdout)

    @property
    def own_size(self) -> bool:
        """Written at the box's own size (no resize): what a lossless JPEG crop needs."""
        return self.out_size == (self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclass
class FinishJob:
    """Everything a worker needs to write the crops of one photo."""

    source: object  # path (str) or the file's bytes (stdin)
    ext: str  # output extension without the dot
    crops: list  # CropSpec
    quality: int | None = None  # None: lossless where possible, else 92
    strip: bool = False
    overwrite: bool = False
    lossless: bool = True  # allow DCT-domain JPEG crops
    retried: bool = False  # resubmitted after the worker running it died
    skip_existing: bool = False  # a name another process took since it was claimed: skipped, not renamed
    mark: bytes | None = None  # the input's tag in each crop's marker (:func:`smartcrop.naming.source_of`)
    full_size: tuple | None = None  # upright (w, h) of the photo the boxes were chosen on: checked when read again


@dataclass
class Written:
    """What :func:`finish` did with one crop."""

    box: tuple[int, int, int, int]  # the box actually written (a lossless crop snaps to the iMCU grid)
    output: str | None
    lossless: bool
    data: bytes | None = None  # the encoded image when the target was None
    skipped: str | None = None  # "exists": with skip_existing, another process wrote the name first


DEFAULT_QUALITY = 92

#: Errors that fail one photo (raised in a worker and sent back, or where the photo is planned)
PER_FILE_ERRORS = (SmartcropError, OSError, ValueError, MemoryError)


@dataclass
class Decision:
    """What becomes of one chosen crop: written (``spec`` indexes the job's crops), skipped, or only reported."""

    ratio: str
    box: tuple[int, int, int, int]
    score: float
    size: tuple[int, int]
    output: str | None = None  # the claimed path (also for a skipped crop)
    skipped: str | None = None  # "exists"
    spec: int | None = None


def crop_job(display: str, source, crops, ext: str, opts, claim=None, write: bool = True, on_refused=None,
             mark: bytes | None = None, full_size: tuple | None = None):
    """Stage 2½, shared by every engine: from a photo's chosen crops to ``(decisions, FinishJob or None)``.

    ``crops``: ``(ratio, box, score)`` triples, best first per ratio; ``ext``: the default output extension;
    ``opts``: the run's options (``size``, ``max_side``, ``upscale``, ``quality``, ``strip``, ``overwrite``,
    ``reencode``, ``dry_run``); ``claim(ratio, rank, ext, size)``: the output name of a crop (a
    :class:`~smartcrop.naming.Claim`), None to return the encoded bytes instead; ``write=False``: decide and
    check only.  A crop that cannot be written as asked (:func:`check_crop`: too small, would need
    upscaling) is left out and said to ``on_refused``, one line a ratio ("ratio 10:1: the best crop is only
    …"), the photo's other crops going on; without ``on_refused``, or when no crop is left, :class:`CropError` is
    raised (that photo fails) before anything is written.  ``mark``: the input's tag for the crops' markers;
    ``full_size``: the upright size of the photo as scored, which :func:`finish` checks the file still has.
    """
    decisions: list[Decision] = []
    specs: list[CropSpec] = []
    ranks: dict[str, int] = {}
    refused: dict[str, list] = {}  # ratio -> [the first refused crop's CropError, how many refused]
    for ratio, box, score in crops:
        ranks[ratio] = ranks.get(ratio, 0) + 1
        box = tuple(int(v) for v in box)
        size = output_size(box, opts.size, opts.max_side)
        try:
            check_crop(box, size, opts.upscale)
        except CropError as e:
            if on_refused is None:
                raise
            refused.setdefault(ratio, [e, 0])[1] += 1
            continue
        d = Decision(ratio, box, float(score), tuple(size))
        decisions.append(d)
        if opts.dry_run or not write:
            continue
        target = None
        if claim is not None:
            c = claim(ratio, ranks[ratio], ext, size)
            d.output = str(c.path)
            if c.skip:
                d.skipped = c.skip
                continue
            target = str(c.path)
        d.spec = len(specs)
        specs.append(CropSpec(ratio, box, float(score), tuple(size), target))
    if refused and not decisions:
        raise next(iter(refused.values()))[0]  # nothing left: the photo fails, as without on_refused
    for ratio, (reason, n) in refused.items():  # one line a ratio
        on_refused(f"ratio {ratio}: {reason}" + (f" ({n} of its crops left out)" if n > 1 else ""))
    # the written format follows the names (a template may give its own extension, e.g. '{stem}.png')
    exts = {name_ext(s.target) or ext for s in specs}
    if len(exts) > 1:
        raise CropError(f"the name template gives the crops of {display} different formats")
    job = None
    if specs:
        job = FinishJob(source, exts.pop(), specs, quality=opts.quality, strip=opts.strip, overwrite=opts.overwrite,
                        lossless=not opts.reencode, skip_existing=opts.skip_existing, mark=mark,
                        full_size=tuple(full_size) if full_size is not None else None)
    return decisions, job


def name_ext(target: str | None) -> str | None:
    """The image extension a path or URI names (``jpeg`` → ``jpg``), None without one."""
    if target is None:
        return None
    if "://" in target:
        target = target.split("?", 1)[0]
    sfx = Path(target).suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "tiff": "tif"}.get(sfx, sfx) or None


def prepare(source, short_side: int, max_long_side: int, faces: bool = False) -> Prepared:
    """Stage 1: decode ``source`` (a path or bytes) at about the network's size and resize it exactly; with
    ``faces``, also find its faces (what :meth:`~smartcrop.cropper.Cropper.find_faces` would find on that
    image), so that the decoding workers do it in parallel rather than the scoring process."""
    from PIL import Image

    from .imageio import load_image
    from .pool import pixel_budget
    from .transforms import network_size

    with pixel_budget(_pixels(source, draft=True)):
        li = load_image(source, target_short_side=short_side)
    size = network_size(li.full_size[0], li.full_size[1], short_side, max_long_side)
    img = li.image if li.image.size == size else li.image.resize(size, Image.BILINEAR, reducing_gap=2.0)
    found = None
    if faces:
        from .faces import detect_for_model, one_thread

        one_thread()  # one photo per worker and core, as for torch
        found = detect_for_model(img, li.full_size, size)
    deep = li.bit_depth if li.bit_depth > 8 else 0
    return Prepared(img, li.full_size, li.format, li.has_alpha, deep if li.reduced_depth else 0, found,
                    gray_depth=0 if li.reduced_depth else deep)


class ScoringError(SmartcropError):
    """The model could not score a photo (e.g. an allocation failure): fails that photo."""


def scoring_failure(e: BaseException) -> str:
    """One line for a photo whose scoring raised ``e`` (a ``RuntimeError`` or ``MemoryError``; shown after its
    name), in every scoring path."""
    return "out of memory while scoring this photo" if out_of_memory(e) else \
        f"cannot score this photo ({one_line(str(e) or type(e).__name__)})"


@dataclass(frozen=True)
class WorkerModel:
    """What a worker needs to score photos itself: the model file and what to ask it."""

    path: str
    ratios: tuple
    top_k: int
    short_side: int
    max_long_side: int
    choice: Choice = Choice()


_worker_croppers: dict = {}  # model path -> Cropper, in a worker process

#: environment variable naming the model :mod:`smartcrop.preload` loads in the scoring workers' fork server
PRELOAD_ENV = "SMARTCROP_PRELOAD_MODEL"


def may_crop_losslessly(opts) -> bool:
    """Whether a run with these options may write any crop losslessly: :func:`crop_job` lets :func:`finish` try
    (``FinishJob.lossless``) unless ``--reencode``, ``finish`` needs no ``--quality`` and a crop at its own size
    (``--size`` resizes), and ``--dry-run`` writes nothing.  Only a run-level hint (whether to
    :func:`warm_lossless` its workers): ``finish`` decides each crop."""
    return not (opts.reencode or opts.dry_run or opts.quality is not None or opts.size)


def warm_lossless() -> None:
    """Load the lossless JPEG backend now (~65 ms the first time in a process, measured) instead of at the first
    crop: the run's workers call it when they start, while the main process imports torch, so that the first
    photo's crop does not wait for it."""
    from . import jpegcrop

    jpegcrop.available()


def worker_cropper(path: str):
    """This process's scoring copy of the model at ``path`` (loaded at the first call, one CPU thread, BatchNorm
    folded), kept for the next photos; :mod:`smartcrop.preload` makes it in the fork server, before the workers
    are forked, so that they share it."""
    cropper = _worker_croppers.get(path)
    if cropper is None:
        import torch

        from .cropper import Cropper

        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # one photo per worker and core: more threads would fight the other workers
        cropper = _worker_croppers[path] = Cropper(weights=path, device="cpu")
        cropper.scorer  # noqa: B018 - the folded copy (a property), made now rather than at the first photo
    return cropper


def prepare_and_score(source, model: WorkerModel) -> tuple:
    """Stages 1 and 2 in one worker: :func:`prepare`, then score with the worker's own copy of the model (loaded
    at its first photo, one CPU thread) → ``(Prepared, crops)``.  Spreads scoring over every core of a many-core
    CPU, where one scoring process would cap the run (~30 ms a photo)."""
    p = prepare(source, model.short_side, model.max_long_side, model.choice.faces)
    cropper = worker_cropper(model.path)
    cropper.choice = model.choice
    try:
        crops = cropper.best_crops_batch([(p.image, p.full_size)], list(model.ratios), model.top_k,
                                         faces=[p.faces] if model.choice.faces else None)[0]
    except (RuntimeError, MemoryError) as e:
        raise ScoringError(scoring_failure(e)) from None
    return p, crops


def output_size(box, size: tuple[int, int] | None, max_side: int | None) -> tuple[int, int]:
    """Size of the written crop: ``size`` exactly, or the crop's own size capped to ``max_side``."""
    w, h = box[2] - box[0], box[3] - box[1]
    if size:
        return tuple(size)
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        return max(1, round(w * s)), max(1, round(h * s))
    return w, h


def check_crop(box, out_size: tuple[int, int], upscale: bool) -> None:
    """Refuse crops too small to be useful, and enlargements nobody asked for."""
    w, h = box[2] - box[0], box[3] - box[1]
    if min(w, h) < MIN_CROP_SIDE:
        raise CropError(f"the best crop is only {w}x{h} pixels (at least {MIN_CROP_SIDE} on each side are needed)")
    if (out_size[0] > w or out_size[1] > h) and not upscale:
        raise CropError(f"the crop is {w}x{h} pixels, smaller than the requested {out_size[0]}x{out_size[1]}; "
                        "pass --upscale to enlarge it")


def finish(job: FinishJob) -> list[Written]:
    """Stage 3: write every crop of one photo; lossless for JPEG → JPEG crops at their own size when possible.

    A photo is decoded at full size at most once (for the crops that cannot be cut losslessly), while holding
    its share of the pixel budget.  A file that is no longer the size its crops were chosen on (replaced since it
    was scored) fails with :class:`CropError` before anything is written."""
    from .imageio import crop_image, encode_image, write_file
    from .pool import pixel_budget

    encoded: list = [None] * len(job.crops)
    boxes = [tuple(spec.box) for spec in job.crops]
    if job.lossless and job.ext == "jpg" and job.quality is None:
        data = None
        for k, spec in enumerate(job.crops):
            if spec.own_size:
                if data is None:
                    data = _read_bytes(job.source)
                    _check_unchanged(job, _jpeg_size(data), either_way=True)
                encoded[k], boxes[k] = _lossless(data, boxes[k], job.strip)
    lossless = [e is not None for e in encoded]
    if not all(lossless):
        from .imageio import load_full

        with pixel_budget(_pixels(job.source)):
            full = load_full(job.source)
            _check_unchanged(job, full.original.size)
            keep = not job.strip
            for k, spec in enumerate(job.crops):
                if encoded[k] is None:
                    img = crop_image(full.original, spec.box, None if spec.own_size else spec.out_size)
                    encoded[k] = encode_image(img, job.ext, quality=job.quality or DEFAULT_QUALITY,
                                              exif=full.exif if keep else None, icc=full.icc if keep else None,
                                              xmp=full.xmp if keep else None, iptc=full.iptc if keep else None,
                                              lossless=full.lossless, subsampling=full.subsampling)
            del full, img
    out: list[Written] = []
    for spec, box, data, was_lossless in zip(job.crops, boxes, encoded, lossless):
        if spec.target is None:
            out.append(Written(box, None, was_lossless, data))
            continue
        target = Path(spec.target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a sub-folder of the name template (`{stem}/…`)
            from .naming import OutputError

            raise OutputError(f"cannot write {target}: a file is in the way of its folder") from None
        except OSError as e:  # a full disk, a read-only one
            _cannot_write(target, e)
        try:
            write_file(target, data, overwrite=job.overwrite, source=job.mark)
        except FileExistsError:
            # another process (a second run into this folder) wrote that name since it was claimed: it is never
            # replaced; the crop is skipped (--skip-existing) or written under the next free suffix
            if job.skip_existing:
                out.append(Written(box, str(target), was_lossless, skipped="exists"))
                continue
            target = _write_under_free_name(target, data, job.mark)
        except OSError as e:
            _cannot_write(target, e)
        out.append(Written(box, str(target), was_lossless))
    return out


def _cannot_write(target: Path, e: OSError) -> None:
    """Raise the one line for a crop that cannot be written (the output's problem, not the photo's): a full
    disk as :func:`~smartcrop.imageio.write_file` says it, any other reason ("Read-only file system") after
    "cannot write PATH"."""
    from .imageio import disk_full, safe_name
    from .naming import OutputError

    if (full := disk_full(target, e)) is not None:
        raise full from None
    raise OutputError(f"cannot write {safe_name(target)} ({e.strerror or e})") from None


#: at most this many suffixes are tried for a name another process took (:func:`_write_under_free_name`)
MAX_RACE_SUFFIX = 999


def _write_under_free_name(target: Path, data: bytes, mark: bytes | None = None) -> Path:
    """Write ``data`` as ``target``'s stem with the first free ``-1``, ``-2`` … suffix (each claimed atomically,
    never replacing a file) and return that path."""
    from .imageio import write_file

    for k in range(1, MAX_RACE_SUFFIX + 1):
        path = target.with_name(f"{target.stem}-{k}{target.suffix}")
        try:
            write_file(path, data, overwrite=False, source=mark)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"{MAX_RACE_SUFFIX} names taken", str(target))


def _check_unchanged(job: FinishJob, size, either_way: bool = False) -> None:
    """:class:`CropError` when the photo read to write its crops is not the size they were chosen on: the file
    was replaced since it was scored, and its boxes would be clamped into another picture.  ``either_way``:
    ``size`` is the stored one, compared whichever way the photo is turned (a turn read differently is
    :func:`_lossless`'s to catch)."""
    if job.full_size is None or size is None:
        return
    same = sorted(size) == sorted(job.full_size) if either_way else tuple(size) == tuple(job.full_size)
    if not same:
        (w, h), (w2, h2) = job.full_size, size
        raise CropError(f"the file changed while it was being cropped (its crops were chosen on {w}x{h}, it is now "
                        f"{w2}x{h2}): nothing written for it; run again to crop it")


def _jpeg_size(data: bytes):
    """The stored size a JPEG's header gives, None when it gives none (not a JPEG, or one jpegcrop cannot parse:
    the photo is then decoded and checked there)."""
    from . import jpegcrop

    try:
        info = jpegcrop.probe(data)
    except (jpegcrop.LosslessUnsupported, ValueError):
        return None
    return info.width, info.height


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open(source, "rb") as f:
        return f.read()


def _pixels(source, draft: bool = False) -> int:
    """Pixels a decode of ``source`` will hold (from its header; 0 when it cannot be read — the decode will
    then report the problem).  A JPEG decoded for scoring is DCT-scaled: about 1/64 of its pixels."""
    import io

    from PIL import Image

    import warnings

    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
        with fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning: the decode itself decides
            with Image.open(fp) as im:
                w, h = im.size
                fmt = im.format
    except Exception:  # noqa: BLE001 - any unreadable header: the real decode reports it
        return 0
    return w * h // (64 if draft and fmt == "JPEG" else 1)


def _lossless(data: bytes, box, strip: bool):
    """``(jpeg bytes, box used)`` of a DCT-domain crop, or ``(None, box)`` when the JPEG must be re-encoded."""
    from . import jpegcrop
    from .imageio import jpeg_orientation

    if not jpegcrop.available():
        return None, box
    try:
        orientation = jpegcrop.read_orientation(data)
        if strip and orientation != 1:
            return None, box  # without EXIF the stored orientation would be lost: re-encode upright instead
        if orientation != jpeg_orientation(data):
            # the box is upright as the photo was loaded; an Orientation tag the two EXIF readers read differently
            # (stored as a signed short, say) would cut another region: re-encoded upright instead
            return None, box
        encoded, used = jpegcrop.lossless_crop(data, box, orientation, strip=strip)
    except (jpegcrop.LosslessUnsupported, ValueError):
        return None, box
    return encoded, tuple(int(v) for v in used)
