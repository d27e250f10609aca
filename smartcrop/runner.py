"""``smartcrop run``: crop files, folders and pipes, never losing anything.

The pipeline per photo: decode once at full resolution with EXIF orientation applied (worker threads), score
every requested ratio's anchors in one model pass (main thread), then crop, resize, encode and write
atomically (worker threads).  At most a few photos are in flight, so memory stays flat over any folder.
"""

from __future__ import annotations

import os
import string
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .anchors import parse_ratio, ratio_label
from .errors import SmartcropError, UsageError, one_line
from .imageio import FORMAT_EXTENSIONS, OUTPUT_FORMATS, ImageError, crop_image, encode_image, load_image, save_image

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"II*\x00", b"MM\x00*", b"BM")
TEMPLATE_FIELDS = {"stem", "ratio", "ext", "rank", "w", "h", "name"}
#: ``--format`` names and their aliases → output extension
FORMAT_NAMES = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp", "tif": "tif", "tiff": "tif"}


@dataclass
class RunOptions:
    ratios: list = field(default_factory=lambda: ["any"])
    out_dir: Path | None = Path("cropped")  # None: write the single result to stdout
    name_template: str | None = None  # default: {stem}_{ratio}.{ext} ({stem}_{ratio}_{rank}.{ext} with top_k > 1)
    size: tuple | None = None  # exact output size (w, h)
    max_side: int | None = None
    top_k: int = 1
    quality: int = 92
    out_format: str | None = None  # force an output format (jpg, png, webp, tif)
    strip: bool = False
    overwrite: bool = False
    skip_existing: bool = False
    dry_run: bool = False
    workers: int = 2
    batch: int = 1
    preview: Path | None = None

    def template(self) -> str:
        if self.name_template:
            return self.name_template
        return "{stem}_{ratio}_{rank}.{ext}" if self.top_k > 1 else "{stem}_{ratio}.{ext}"


@dataclass
class InputItem:
    display: str  # what error messages and JSON show
    path: Path | None  # None for stdin data
    rel_dir: Path  # sub-folder mirrored under the output folder
    stem: str
    suffix: str
    data: bytes | None = None


@dataclass
class CropRecord:
    input: str
    output: str | None
    ratio: str
    box: list
    score: float
    size: list

    def to_json(self) -> dict:
        return {"input": self.input, "output": self.output, "ratio": self.ratio, "box": self.box,
                "score": round(self.score, 4), "size": self.size}


# --------------------------------------------------------------------------------------------------------------
# validation of the command line


def normalize_ratios(ratios: Sequence[str] | None, size: tuple | None) -> list[str]:
    out: list[str] = []
    for r in ratios or []:
        r = r.strip()
        if r.lower() == "any":
            r = "any"
        else:
            try:
                parse_ratio(r)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if r not in out:
            out.append(r)
    if size is not None:
        want = size[0] / size[1]
        if not out:
            out = [f"{size[0]}:{size[1]}"]
        for r in out:
            if r == "any" or abs(float(parse_ratio(r)) - want) / want > 0.01:
                raise UsageError(f"output size {size[0]}x{size[1]} does not have the aspect ratio {r}")
    return out or ["any"]


def parse_size(text: str | None) -> tuple | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"bad output size {text!r}: expected WIDTHxHEIGHT such as 1920x1080") from None
    if not (0 < w <= 65535 and 0 < h <= 65535):
        raise UsageError(f"bad output size {text!r}: sides must be 1..65535")
    return w, h


def check_template(template: str) -> None:
    """Refuse templates with unknown fields or that could leave the output folder."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UsageError(f"bad name template {template!r}: {e}") from None
    unknown = names - TEMPLATE_FIELDS
    if unknown:
        raise UsageError(f"bad name template {template!r}: unknown field(s) {', '.join(sorted(unknown))} "
                         f"(available: {', '.join(sorted(TEMPLATE_FIELDS))})")
    sample = template.format(stem="x", ratio="16x9", ext="jpg", rank=1, w=1, h=1, name="x.jpg")
    _check_relative(sample, template)


def _check_relative(rendered: str, template: str) -> None:
    p = Path(rendered)
    if not rendered or p.is_absolute() or rendered.startswith(("/", "\\")) or ".." in p.parts or \
            any(part in {"", "."} for part in rendered.replace("\\", "/").split("/")[-1:]):
        raise UsageError(f"name template {template!r} would write outside the output folder")


# --------------------------------------------------------------------------------------------------------------
# inputs


def looks_like_image(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def collect_inputs(paths: Sequence[str], recursive: bool, stdin=None, list_file: str | None = None,
                   on_error: Callable[[str], None] | None = None) -> list[InputItem]:
    """Input items from paths (``-`` = stdin: one image, or a list of paths one per line) and a list file.

    A path given on the command line that does not exist is a usage error (:class:`UsageError`, exit 2);
    a missing path read from a file list is reported through ``on_error`` and the others still run.
    """
    from .data import walk_images

    items: list[InputItem] = []
    names: list[str] = list(paths)
    for n in names:
        if n != "-" and not Path(n).exists():
            raise UsageError(f"{n}: no such file or folder")
    if list_file is not None:
        if list_file == "-":
            text = (stdin or sys.stdin.buffer).read().decode("utf-8", "replace")
        else:
            try:
                text = Path(list_file).read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise UsageError(f"{list_file}: cannot read file list ({e.strerror})") from None
        names += [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "-" in names and list_file == "-":
        raise UsageError("stdin cannot be both a file list and an input")
    expanded: list[str] = []
    for n in names:
        if n != "-":
            expanded.append(n)
            continue
        data = (stdin or sys.stdin.buffer).read()
        if looks_like_image(data) or not data.strip():
            items.append(InputItem("<stdin>", None, Path(), "stdin", "", data))
        else:  # a list of paths
            expanded += [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    for n in expanded:
        p = Path(n)
        if p.is_dir():
            for f in walk_images(p, recursive, on_error=on_error):
                rel = f.relative_to(p)
                items.append(InputItem(str(f), f, rel.parent, f.stem, f.suffix))
        elif p.exists():
            items.append(InputItem(str(p), p, Path(), p.stem, p.suffix))
        else:
            if on_error is None:
                raise UsageError(f"{n}: no such file or folder")
            on_error(f"{n}: no such file or folder")
    return items


# --------------------------------------------------------------------------------------------------------------
# output names


class OutputNamer:
    """Assigns each crop an output path: never two crops of one run on the same file; existing files are kept
    (a ``-1``, ``-2`` … suffix is added), overwritten (``overwrite``) or the crop skipped (``skip_existing``)."""

    def __init__(self, out_dir: Path, template: str, overwrite: bool, skip_existing: bool):
        self.out_dir = out_dir
        self.root = out_dir.resolve()
        self.template = template
        self.overwrite = overwrite
        self.skip_existing = skip_existing
        self.reserved: set[Path] = set()
        self.lock = threading.Lock()

    def render(self, item: InputItem, ratio: str, rank: int, ext: str, size: tuple) -> Path:
        name = self.template.format(stem=item.stem, ratio=ratio_label(ratio), ext=ext, rank=rank, w=size[0],
                                    h=size[1], name=f"{item.stem}{item.suffix}")
        _check_relative(name, self.template)
        path = self.out_dir / item.rel_dir / name
        try:
            path.resolve().relative_to(self.root)
        except ValueError:
            raise UsageError(f"name template {self.template!r} would write outside the output folder") from None
        return path

    def assign(self, wanted: Path) -> Path | None:
        """The path to write for ``wanted``, or None to skip it."""
        with self.lock:
            if wanted not in self.reserved:
                if not wanted.exists() or self.overwrite:
                    self.reserved.add(wanted)
                    return wanted
                if self.skip_existing:
                    return None
            for k in range(1, 100000):
                cand = wanted.with_name(f"{wanted.stem}-{k}{wanted.suffix}")
                if cand not in self.reserved and not cand.exists():
                    self.reserved.add(cand)
                    return cand
        raise OSError(f"{wanted}: no free output name")


def output_ext(item: InputItem, out_format: str | None, loaded_format: str | None) -> str:
    """Output extension (no dot): ``out_format``, else the input's own if writable (``jpeg`` → ``jpg``), else
    that of its decoded format if writable, else ``png``."""
    if out_format:
        return out_format
    ext = item.suffix.lower()
    if ext in OUTPUT_FORMATS:
        return "jpg" if ext == ".jpeg" else ext[1:]
    return FORMAT_EXTENSIONS.get(loaded_format or "", ".png")[1:]


def output_size(box: tuple, size: tuple | None, max_side: int | None) -> tuple[int, int]:
    w, h = box[2] - box[0], box[3] - box[1]
    if size:
        return size
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        return max(1, round(w * s)), max(1, round(h * s))
    return w, h


# --------------------------------------------------------------------------------------------------------------
# planning: every check that can be made before any photo is decoded


@dataclass
class RunPlan:
    items: list  # InputItem
    opts: RunOptions
    input_errors: list  # one line per input that could not be collected (already reported)


def parse_format(name: str | None) -> str | None:
    """An output format name (``jpg``, ``jpeg``, ``png``, ``webp``, ``tif``, ``tiff``, any case) → extension."""
    if not name:
        return None
    fmt = FORMAT_NAMES.get(name.lower().lstrip("."))
    if fmt is None:
        raise UsageError(f"output format must be jpg, png, webp or tif, not {name!r}")
    return fmt


def prepare_output_dir(out_dir: Path) -> None:
    """Create the output folder and check that a file can be created in it.

    The check creates a file with a random name and ``O_EXCL`` (``tempfile.mkstemp``), which never follows a
    symlink planted in the folder, and removes it."""
    import tempfile

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".smartcrop-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{out_dir}: output folder is not writable ({e.strerror or e})") from None


def plan_run(inputs: Sequence[str], *, from_file: str | None = None, recursive: bool = False,
             ratios: Sequence[str] = (), size: str | None = None, output: Path | None = None,
             out_format: str | None = None, preview: Path | None = None, dry_run: bool = False,
             as_json: bool = False, overwrite: bool = False, skip_existing: bool = False, stdin=None,
             on_error: Callable[[str], None] | None = None, **options) -> RunPlan:
    """Validate a ``run`` request, collect its inputs and prepare the output folder.

    Raises :class:`UsageError` for anything wrong with the request itself; inputs that cannot be collected
    are reported through ``on_error`` and listed in the plan.  ``options`` are further :class:`RunOptions`
    fields (``name_template``, ``max_side``, ``top_k``, ``quality``, ``strip``, ``workers``, ``batch``).
    """
    if overwrite and skip_existing:
        raise UsageError("overwriting and skipping existing outputs exclude each other")
    if not inputs and from_file is None:
        raise UsageError("no input: give photos or folders, '-' for stdin, or a file list")
    sz = parse_size(size)
    opts = RunOptions(ratios=normalize_ratios(ratios, sz), size=sz, out_format=parse_format(out_format),
                      preview=preview, dry_run=dry_run, overwrite=overwrite, skip_existing=skip_existing,
                      **options)
    if preview is not None and preview.suffix.lower() not in OUTPUT_FORMATS:
        raise UsageError("the preview must be a .jpg, .png, .webp or .tif file")
    if opts.name_template:
        check_template(opts.name_template)
    errors: list[str] = []

    def report(line: str) -> None:
        errors.append(line)
        if on_error is not None:
            on_error(line)

    items = collect_inputs(list(inputs), recursive, stdin=stdin, list_file=from_file, on_error=report)
    stdin_image = any(it.path is None for it in items)
    if stdin_image and len(items) > 1:
        raise UsageError("a single image on stdin cannot be mixed with other inputs")
    if not items and not errors:
        raise UsageError("no image files found in the inputs" + ("" if recursive else " (use -r for sub-folders)"))
    if stdin_image and output is None:
        opts.out_dir = None
        if as_json and not dry_run:
            raise UsageError("JSON lines and an image on stdout cannot share stdout: give an output folder or a "
                             "dry run")
    else:
        opts.out_dir = output or Path("cropped")
        if not dry_run:
            prepare_output_dir(opts.out_dir)
    return RunPlan(items, opts, errors)


# --------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class RunSummary:
    images: int = 0
    failed: int = 0
    written: int = 0
    skipped: int = 0
    records: list = field(default_factory=list)

    def describe(self, opts: RunOptions, input_errors: int = 0) -> str:
        """The one-line summary shown on a terminal."""
        failed = self.failed + input_errors
        what = "boxes computed" if opts.dry_run else "crops written"
        return (f"{self.images} photos, {len(self.records)} {what}"
                + (f", {self.skipped} skipped (exist)" if self.skipped else "")
                + (f", {failed} failed" if failed else "")
                + ("" if opts.dry_run or opts.out_dir is None else f" → {opts.out_dir}"))


class Runner:
    def __init__(self, cropper, opts: RunOptions, on_record: Callable[[CropRecord], None] | None = None,
                 on_error: Callable[[str], None] | None = None, progress: bool | None = None):
        self.cropper = cropper
        self.opts = opts
        self.on_record = on_record or (lambda r: None)
        self.on_error = on_error or (lambda s: print(s, file=sys.stderr))
        self.progress = progress
        self.namer = None
        if opts.out_dir is not None:
            check_template(opts.template())
            self.namer = OutputNamer(opts.out_dir, opts.template(), opts.overwrite, opts.skip_existing)
        self.thumbs: list = []
        self._lock = threading.Lock()

    # -- stages ----------------------------------------------------------------------------------------------

    def _load(self, item: InputItem):
        src = item.data if item.path is None else item.path
        return load_image(src, keep_original=not self.opts.dry_run)

    def _all_exist(self, item: InputItem) -> bool:
        """With --skip-existing: true when every output this photo would get exists already (no decode needed)."""
        t = self.opts.template()
        if not (self.opts.skip_existing and self.namer) or "{w}" in t or "{h}" in t:
            return False  # sizes are only known once the crop is chosen
        ext = output_ext(item, self.opts.out_format, None)
        for r in self.opts.ratios:
            for rank in range(1, self.opts.top_k + 1):
                if not self.namer.render(item, r, rank, ext, (0, 0)).exists():
                    return False
        return True

    def _write(self, item: InputItem, li, crop, rank: int) -> CropRecord | None:
        opts = self.opts
        size = output_size(crop.box, opts.size, opts.max_side)
        rec = CropRecord(item.display, None, crop.ratio, list(crop.box), crop.score, list(size))
        if opts.dry_run:
            return rec
        img = crop_image(li.original if li.original is not None else li.image, crop.box,
                         None if size == crop.size else size)
        exif = None if opts.strip else li.exif
        icc = None if opts.strip else li.icc
        if self.namer is None:  # stdout
            data = encode_image(img, output_ext(item, opts.out_format, li.format), quality=opts.quality, exif=exif,
                                icc=icc)
            out = sys.stdout.buffer
            out.write(data)
            out.flush()
            rec.output = "-"
            return rec
        ext = output_ext(item, opts.out_format, li.format)
        wanted = self.namer.render(item, crop.ratio, rank, ext, size)
        for _ in range(3):
            path = self.namer.assign(wanted)
            if path is None:
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                save_image(img, path, quality=opts.quality, exif=exif, icc=icc, overwrite=opts.overwrite)
            except FileExistsError:  # appeared meanwhile: take the next free name
                continue
            rec.output = str(path)
            return rec
        raise OSError(f"{wanted}: could not find a free output name")

    def _finish(self, item: InputItem, li, crops) -> list:
        records = []
        ranks: dict[str, int] = {}
        for c in crops:
            ranks[c.ratio] = ranks.get(c.ratio, 0) + 1
            rec = self._write(item, li, c, ranks[c.ratio])
            records.append(rec)
        if self.opts.preview is not None:
            self._add_thumb(item, li, crops)
        return records

    def _add_thumb(self, item, li, crops) -> None:
        from .preview import thumbnail_with_boxes

        t = thumbnail_with_boxes(li.image, li.full_size, crops, Path(item.display).name)
        with self._lock:
            self.thumbs.append(t)

    # -- driver ----------------------------------------------------------------------------------------------

    def run(self, items: Sequence[InputItem]) -> RunSummary:
        from .progress import progress_bar

        opts = self.opts
        summary = RunSummary()
        if self.namer is None and (len(items) != 1 or len(opts.ratios) * opts.top_k != 1) and not opts.dry_run:
            raise UsageError("writing to stdout needs exactly one input image and one crop (use -o DIR)")
        workers = max(1, opts.workers)
        window = max(2, workers + opts.batch)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smartcrop-io")
        loads: deque[tuple[InputItem, Future]] = deque()
        writes: deque[tuple[InputItem, Future]] = deque()
        it = iter(items)

        def fill():
            while len(loads) < window:
                item = next(it, None)
                if item is None:
                    return
                if self._all_exist(item):
                    summary.skipped += len(opts.ratios) * opts.top_k
                    summary.images += 1
                    bar.advance()
                    continue
                loads.append((item, pool.submit(self._load, item)))

        def drain_writes(block: bool):
            while writes and (block or writes[0][1].done() or len(writes) > window):
                item, fut = writes.popleft()
                try:
                    recs = fut.result()
                except (SmartcropError, ImageError, OSError, ValueError) as e:
                    summary.failed += 1
                    self.on_error(f"{item.display}: {_describe(e)}")
                    bar.advance()
                    continue
                for rec in recs:
                    if rec is None:
                        summary.skipped += 1
                        continue
                    summary.written += 0 if opts.dry_run else 1
                    summary.records.append(rec)
                    self.on_record(rec)
                bar.advance()

        try:
            with progress_bar(len(items), "cropping", self.progress) as bar:
                fill()
                while loads:
                    batch = []
                    while loads and len(batch) < max(1, opts.batch):
                        item, fut = loads.popleft()
                        try:
                            batch.append((item, fut.result()))
                        except (SmartcropError, ImageError, OSError, ValueError) as e:
                            summary.images += 1
                            summary.failed += 1
                            self.on_error(f"{item.display}: {_describe(e)}")
                            bar.advance()
                        fill()
                    if batch:
                        results = self.cropper.best_crops_batch([(li.image, li.full_size) for _, li in batch],
                                                                opts.ratios, opts.top_k)
                        for (item, li), crops in zip(batch, results):
                            summary.images += 1
                            writes.append((item, pool.submit(self._finish, item, li, crops)))
                    drain_writes(block=False)
                    fill()
                drain_writes(block=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if opts.preview is not None and self.thumbs:
            from .preview import contact_sheet

            try:
                save_image(contact_sheet(self.thumbs), opts.preview, overwrite=True)
            except (SmartcropError, ImageError, OSError) as e:
                summary.failed += 1
                self.on_error(f"{opts.preview}: cannot write preview: {_describe(e)}")
        return summary


def _describe(e: BaseException) -> str:
    msg = getattr(e, "strerror", None) if isinstance(e, OSError) and not str(e) else str(e)
    return one_line(msg or type(e).__name__)
