"""Planning a ``run``: every check that can be made before any photo is decoded.

:func:`plan_run` validates the request (ratios, size, format, name template, preview, output folder), collects
the inputs and returns a :class:`RunPlan` for :class:`smartcrop.runner.Runner`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .anchors import parse_ratio
from .errors import UsageError
from .imageio import OUTPUT_FORMATS
from .inputs import collect_inputs
from .naming import check_template

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
    quality: int | None = None  # None: lossless JPEG crops where possible, else quality 92
    reencode: bool = False  # never crop JPEGs losslessly
    upscale: bool = False  # allow --size to enlarge a crop
    out_format: str | None = None  # force an output format (jpg, png, webp, tif)
    strip: bool = False
    overwrite: bool = False
    skip_existing: bool = False
    dry_run: bool = False
    workers: int = 0  # worker processes; 0: one per usable core
    batch: int = 8  # photos scored per model pass
    preview: Path | None = None

    def template(self) -> str:
        if self.name_template:
            return self.name_template
        return "{stem}_{ratio}_{rank}.{ext}" if self.top_k > 1 else "{stem}_{ratio}.{ext}"


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
