"""Planning a ``run``: every check that can be made before any photo is decoded.

:func:`plan_run` validates the request (ratios, size, format, name template, preview, output folder), collects
the inputs and returns a :class:`RunPlan` for :class:`smartcrop.runner.Runner`.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .anchors import parse_ratio
from .cropper import Choice
from .errors import UsageError, one_line
from .imageio import OUTPUT_FORMATS, existing_parent, safe_name
from .inputs import Passed, collect_inputs, shown
from .naming import InputCollision, OutputError, OutputNamer, check_template, names_known, output_ext
from .progress import is_tty

#: ``--format`` names and their aliases → output extension
FORMAT_NAMES = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp", "tif": "tif", "tiff": "tif",
                "avif": "avif"}


@dataclass
class RunOptions:
    ratios: list = field(default_factory=lambda: ["any"])
    out_dir: Path | None = Path("cropped")  # None: write the single result to stdout
    name_template: str | None = None  # default: {stem}_{ratio}.{ext} ({stem}_{ratio}_{rank}.{ext} with top_k > 1)
    size: tuple | None = None  # exact output size (w, h)
    max_side: int | None = None
    top_k: int = 1
    quality: int | None = None  # None: lossless JPEG crops where possible, else quality 92
    reencode: bool = False  # never crop JPEGs losslessly
    upscale: bool = False  # allow --size to enlarge a crop
    out_format: str | None = None  # force an output format (jpg, png, webp, tif)
    strip: bool = False
    overwrite: bool = False
    skip_existing: bool = False
    dry_run: bool = False
    workers: int = 0  # worker processes; 0: one per usable core
    batch: int = 0  # photos scored per model pass; 0: 1 on a CPU (batching only delays the workers), 16 on a GPU
    scoring: str = "auto"  # where photos are scored: main, workers, auto (runner.scoring_in_workers)
    choice: Choice = Choice()  # how a crop is chosen among the scored anchors (--fuse, --refine, --faces, --free-grid)
    preview: Path | None = None
    made_dirs: tuple = ()  # the folders the plan created for out_dir, deepest first (removed again if left empty)
    #: one run's identity: the output namers of its plan, its runner and its Ray tasks share what earlier runs
    #: left in the output folders (:func:`smartcrop.naming.earlier_outputs`)
    run_id: str = field(default_factory=lambda: os.urandom(8).hex())

    def __post_init__(self) -> None:
        if self.choice.faces:  # a missing extra is the request's error (exit 2), not every photo's
            from .faces import require

            require()

    def template(self) -> str:
        if self.name_template:
            return self.name_template
        return "{stem}_{ratio}_{rank}.{ext}" if self.top_k > 1 else "{stem}_{ratio}.{ext}"


def normalize_ratios(ratios: Sequence[str] | None, size: tuple | None) -> list[str]:
    out: list[str] = []
    values: set = set()
    for r in ratios or []:
        r = r.strip()
        if r.lower() == "any":
            r = value = "any"
        else:
            try:
                value = parse_ratio(r)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if value not in values:  # 16:9, 16x9 and 32:18 are one ratio: one crop, under the first spelling
            values.add(value)
            out.append(r)
    if size is not None:
        want = size[0] / size[1]
        if not out:
            out = [f"{size[0]}:{size[1]}"]
            try:
                parse_ratio(out[0])
            except ValueError as e:
                raise UsageError(f"output size {size[0]}x{size[1]}: {e}") from None
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


@dataclass
class RunPlan:
    items: list  # InputItem
    opts: RunOptions
    input_errors: list  # one line per input that could not be collected (already reported)
    #: with --skip-existing: index of an item whose every crop an earlier run wrote → [(ratio, path)], in
    #: ratio × rank order; such photos are neither decoded nor scored
    done: dict = field(default_factory=dict)


def parse_format(name: str | None) -> str | None:
    """An output format name (``jpg``, ``jpeg``, ``png``, ``webp``, ``tif``, ``tiff``, ``avif``, any case) →
    extension; AVIF only where this Pillow writes it."""
    from .imageio import ImageError, pillow_output_format

    if not name:
        return None
    fmt = FORMAT_NAMES.get(name.lower().lstrip("."))
    if fmt is None:
        raise UsageError(f"output format must be jpg, png, webp, tif or avif, not {name!r}")
    try:
        pillow_output_format(fmt)
    except ImageError as e:
        raise UsageError(str(e)) from None
    return fmt


def check_output_folder(out_dir: Path) -> None:
    """A :class:`UsageError` when ``out_dir`` cannot be the output folder as it is: a file, or a symlink to
    nothing.  Nothing is made (a dry run checks this too)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{safe_name(out_dir)}: the output folder is a file")
    if out_dir.is_symlink() and not out_dir.exists():
        raise UsageError(f"{safe_name(out_dir)}: the output folder is a symlink to {safe_name(os.readlink(out_dir))}, "
                         "which does not exist")


def prepare_output_dir(out_dir: Path) -> tuple[Path, ...]:
    """Create the output folder, check that a file can be created in it, and remove the temporary files that
    killed smartcrop runs left there; returns the folders it created, deepest first (see
    :func:`remove_if_empty`).

    The check creates a file there and removes it (:func:`probe_writable`)."""
    from .imageio import remove_stale_temps

    check_output_folder(out_dir)
    made: tuple[Path, ...] = ()
    try:
        made = make_folder(out_dir)
        probe_writable(out_dir)
    except OSError as e:
        remove_if_empty(made)
        raise UsageError(f"{safe_name(out_dir)}: output folder is not writable ({e.strerror or e})") from None
    remove_stale_temps(out_dir)
    return made


def make_folder(folder: Path) -> tuple[Path, ...]:
    """Create ``folder`` and its missing parents; returns the folders it created, deepest first (see
    :func:`remove_if_empty`).  An ``OSError`` is raised once what it made is removed again."""
    made = []
    d = folder
    while not os.path.lexists(d) and d != d.parent:
        made.append(d)
        d = d.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_if_empty(made)
        raise
    return tuple(made)


def check_can_make(path: Path, what: str) -> None:
    """A :class:`UsageError` ("cannot write WHAT: …") unless a file can be made at ``path``: the nearest folder
    that exists above it (where its missing folders would be made) is a folder, and a file can be created
    there (:func:`probe_writable`)."""
    above = existing_parent(path)
    if above is None:
        return
    if not above.is_dir():
        raise UsageError(f"cannot write {what}: {safe_name(above)} is not a folder")
    try:
        probe_writable(above)
    except OSError as e:
        raise UsageError(f"cannot write {what}: {safe_name(above)} is not writable ({e.strerror or e})") from None


def probe_writable(folder: Path) -> None:
    """Create a file in ``folder`` and remove it again (OSError when it cannot be created): named like
    smartcrop's temporary files and made with ``O_EXCL | O_NOFOLLOW``, so it never follows a symlink planted
    there, and its random name cannot be predicted.  Unlike ``os.access`` it also answers for root, and for a
    read-only or pseudo file system (/proc)."""
    from .imageio import temp_name

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    probe = folder / temp_name()
    os.close(os.open(probe, flags, 0o600))
    os.unlink(probe)


def _crops(outputs: Sequence) -> str:
    """How many ``outputs`` (files carrying smartcrop's marker: its crops, and ``--preview`` contact sheets)."""
    n = len(outputs)
    return f"{n} file{'s' if n > 1 else ''} written by smartcrop"


def remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) that are empty — those a run created and wrote nothing into, e.g.
    because every photo failed — stopping at the first that is not."""
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:  # not empty (another run wrote there meanwhile), or gone
            return


def _same_file(a, b) -> bool:
    """Whether two streams are one regular file (``smartcrop run - < a.jpg 1<> a.jpg``)."""
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, ValueError, OSError):  # no file descriptor (in-memory streams), or a closed one
        return False
    return stat.S_ISREG(sa.st_mode) and os.path.samestat(sa, sb)


def _check_image_stdout(stdin, stdout) -> None:
    """The crop of an image read from stdin goes to stdout: refuse a terminal, a closed stdout (it would be
    lost) and a stdout that is the input file itself (it would be written over the original)."""
    out = stdout if stdout is not None else sys.stdout
    if out is None or getattr(out, "closed", False):
        raise UsageError("standard output is closed: give an output folder (-o DIR) for the crop")
    if is_tty(out):
        raise UsageError("refusing to write image data to a terminal: redirect stdout (> out.jpg) or give "
                         "an output folder (-o DIR)")
    if _same_file(stdin if stdin is not None else sys.stdin, out):
        raise InputCollision("standard output is the input image itself: the crop would be written over the "
                             "original; redirect stdout to another file or give an output folder (-o DIR)")


def plan_run(inputs: Sequence[str], *, from_file: str | None = None, recursive: bool = False,
             ratios: Sequence[str] = (), size: str | None = None, output: Path | None = None,
             out_format: str | None = None, preview: Path | None = None, dry_run: bool = False,
             as_json: bool = False, overwrite: bool = False, skip_existing: bool = False, stdin=None, stdout=None,
             on_error: Callable[[str], None] | None = None, on_note: Callable[[str], None] | None = None,
             adapt_min: int = 0, **options) -> RunPlan:
    """Validate a ``run`` request, collect its inputs and prepare the output folder.

    Raises :class:`UsageError` for anything wrong with the request itself — before any input is read where it
    can: bad ratios, sizes, formats or name templates, an image for a terminal, a preview or output that
    would replace an input (:class:`~smartcrop.naming.InputCollision`) or an existing file without
    ``overwrite``.  Inputs that cannot be collected, or for which no output name can be made, are reported
    through ``on_error`` (one line each) and listed in the plan; the others go on.  ``on_note`` gets a line
    that is not an error: how many files in the folders given were skipped as smartcrop's own crops.
    ``options`` are further :class:`RunOptions` fields (``name_template``, ``max_side``, ``top_k``,
    ``quality``, ``strip``, ``upscale``, ``workers``, ``batch`` …).  ``stdin``/``stdout`` default to the
    process's.  ``adapt_min``: the run first fine-tunes on its photos (``--adapt``), which needs at least that
    many photo files.
    """
    if overwrite and skip_existing:
        raise UsageError("overwriting and skipping existing outputs exclude each other")
    if not inputs and from_file is None:
        raise UsageError("no input: give photos or folders, '-' for stdin, or a file list")
    sz = parse_size(size)
    opts = RunOptions(ratios=normalize_ratios(ratios, sz), size=sz, out_format=parse_format(out_format),
                      preview=preview, dry_run=dry_run, overwrite=overwrite, skip_existing=skip_existing,
                      **options)
    if opts.scoring not in ("auto", "main", "workers"):
        raise UsageError(f"--scoring must be auto, main or workers, not {opts.scoring!r}")
    if sz is not None and opts.max_side:
        raise UsageError("--size and --max-side exclude each other (--size gives every crop that exact size)")
    if on_note is not None:
        from .anchors import FREE_GRID

        inert = []
        if opts.upscale and sz is None:
            inert.append("--upscale (it enlarges crops to --size only)")
        if "any" not in opts.ratios:
            free_only = "(it chooses free crops only: --ratio any)"
            inert += [f"{flag} {free_only}" for flag, on in (("--refine", opts.choice.refine),
                                                              ("--free-grid", opts.choice.free_grid != FREE_GRID))
                      if on]
        for flag in inert:
            on_note(f"note: {flag} changes nothing in this run")
    if preview is not None and preview.suffix.lower() not in OUTPUT_FORMATS:
        raise UsageError("the preview must be a .jpg, .png, .webp or .tif file")
    check_template(opts.template(), opts.ratios, opts.top_k)
    if list(inputs).count("-") > 1:
        raise UsageError("'-' (stdin) can be given once")
    uses_stdin = "-" in inputs or from_file == "-"
    if uses_stdin and stdin is None and is_tty(sys.stdin):
        raise UsageError("'-' reads stdin, which is a terminal: pipe an image or a list of paths into smartcrop")
    errors: list[str] = []

    def report(line: str) -> None:
        errors.append(line)
        if on_error is not None:
            on_error(line)

    passed = Passed()
    items = collect_inputs(list(inputs), recursive, stdin=stdin, list_file=from_file, on_error=report,
                           exclude=output or Path("cropped"), passed=passed)
    stdin_image = any(it.path is None for it in items)
    if stdin_image and len(items) > 1:
        raise UsageError("a single image on stdin cannot be mixed with other inputs")
    them = "them" if len(passed.own) > 1 else "it"
    own = (f"{_crops(passed.own)} in the output folder, never cropped into it again (copy {them} elsewhere or "
           f"give another -o to crop {them})")
    name = "name them as files to crop them" if len(passed.crops) > 1 else "name it as a file to crop it"
    if not items and not errors:
        raise UsageError("no image files found in the inputs" + (
            ": standard input is empty (neither an image nor a list of paths)" if passed.empty_stdin else
            f": the {own}" if passed.own else
            f": only {_crops(passed.crops)}, which a folder never gives again ({name})" if passed.crops
            else "" if recursive else " (use -r for sub-folders)"))
    if on_note is not None:
        if passed.crops:
            on_note(f"note: in the folders given, {_crops(passed.crops)}: not cropped again ({name})")
        if passed.own:
            on_note(f"note: {own}")
        if passed.folder_links:
            n = len(passed.folder_links)
            on_note(f"note: {n} symbolic link{'s' if n > 1 else ''} to folders not followed, "
                    f"{shown(str(passed.folder_links[0]))}{' …' if n > 1 else ''} (name a linked folder to crop "
                    "what it holds)")
    if adapt_min:
        if stdin_image:
            raise UsageError("--adapt fine-tunes on photo files: it cannot adapt to an image on stdin")
        if items and len(items) < adapt_min:
            raise UsageError(f"--adapt fine-tunes on the photos being cropped and needs at least {adapt_min}; "
                             f"{'only ' if len(items) > 1 else ''}{len(items)} given")
    if stdin_image and output is None:
        opts.out_dir = None
        if as_json and not dry_run:
            raise UsageError("JSON lines and an image on stdout cannot share stdout: give an output folder or a "
                             "dry run")
        if not dry_run:
            if len(opts.ratios) * opts.top_k != 1:
                raise UsageError("writing to stdout needs exactly one crop (one --ratio, --top-k 1): give an "
                                 "output folder (-o DIR) for more")
            _check_image_stdout(stdin, stdout)
    else:
        opts.out_dir = output or Path("cropped")
        try:
            opts.out_dir.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise UsageError(f"{safe_name(opts.out_dir)}: the output folder cannot be resolved ({one_line(e)})") \
                from None
    namer = OutputNamer.for_run(opts.out_dir or Path("."), opts, items)
    planned: set[Path] = set()
    if opts.out_dir is not None:  # a dry run refuses what the run would (an output over an input, a file as folder)
        if dry_run:
            check_output_folder(opts.out_dir)
        items, planned = _check_outputs(namer, items, opts, report)
    if preview is not None:
        _check_preview(preview, namer, planned, overwrite)
    done = already_done(namer, items, opts) if planned and skip_existing and preview is None else {}
    if opts.out_dir is not None and not dry_run and len(done) < len(items):
        opts.made_dirs = prepare_output_dir(opts.out_dir)
    return RunPlan(items, opts, errors, done)


def _check_outputs(namer: OutputNamer, items: list, opts: RunOptions, report) -> tuple[list, set]:
    """Every output name that can be known before the crops are chosen (all of them unless the template uses
    {w}/{h} without --size): none may be an input's path (InputCollision, a usage error), and an input that
    gets no valid name fails alone (reported, dropped).  Returns the remaining items and the planned paths."""
    if not names_known(opts.template(), opts.size):
        return items, set()
    planned: set[Path] = set()
    keep = []
    for it in items:
        ext = output_ext(it, opts.out_format, None)
        try:
            paths = [namer.target(it, r, k, ext, opts.size or (0, 0))
                     for r in opts.ratios for k in range(1, opts.top_k + 1)]
        except OutputError as e:
            report(f"{safe_name(it.display)}: {e}")
            continue
        planned.update(paths)
        keep.append(it)
    return keep, planned


def already_done(namer: OutputNamer, items: list, opts: RunOptions) -> dict:
    """With ``--skip-existing`` (names known before decoding): :attr:`RunPlan.done`, the items whose every crop
    an earlier run wrote (:func:`earlier_crops`)."""
    found = ((i, earlier_crops(namer, it, opts)) for i, it in enumerate(items))
    return {i: crops for i, crops in found if crops is not None}


def earlier_crops(namer, item, opts: RunOptions) -> list | None:
    """``[(ratio, path)]`` of every crop of ``item`` that an earlier run wrote, in ratio × rank order
    (``namer.earlier``: an :class:`~smartcrop.naming.OutputNamer`, or the Ray engine's namer of an URI); None
    when one is missing, or when the output extension depends on the decoded format (not an output format's,
    no ``--format``)."""
    if not opts.out_format and item.suffix.lower() not in OUTPUT_FORMATS:
        return None
    ext = output_ext(item, opts.out_format, None)
    found = []
    for ratio in opts.ratios:
        for rank in range(1, opts.top_k + 1):
            try:
                path = namer.earlier(item, ratio, rank, ext, opts.size or (0, 0))
            except OutputError:
                return None
            if path is None:
                return None
            found.append((ratio, path))
    return found


def _check_preview(preview: Path, namer: OutputNamer, planned: set, overwrite: bool) -> None:
    """The contact sheet never replaces an input or an output of this run, nor an existing file unless
    ``overwrite``, and can be written where asked (missing folders are made then)."""
    it = namer.input_at(preview)
    if it is not None:
        raise InputCollision(f"the preview {safe_name(preview)} would replace the input {safe_name(it.display)}: "
                             "originals are never written")
    if preview.is_dir():
        raise UsageError(f"the preview {safe_name(preview)} is a folder: give an image file name")
    # its folder is made when the sheet is written; something in the way that is not a folder is refused now
    check_can_make(preview, f"the preview {safe_name(preview)}")
    if os.path.lexists(preview) and not overwrite:
        raise UsageError(f"the preview {safe_name(preview)} exists: choose another name or pass --overwrite")
    resolved = {p.parent.resolve() / p.name for p in planned}
    if preview.parent.resolve() / preview.name in resolved:
        raise UsageError(f"the preview {safe_name(preview)} would replace one of this run's crops: choose another "
                         "name")
