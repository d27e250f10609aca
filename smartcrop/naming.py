"""Output names of ``run``: the ``--name`` template, its checks, and the assignment of one file per crop.

Fields: ``{stem} {ratio} {ext} {rank} {w} {h} {name}``.  A template is checked before any work (unknown
fields, bad format specs, paths leaving the output folder are usage errors).
"""

from __future__ import annotations

import string
import threading
from dataclasses import dataclass
from pathlib import Path

from .anchors import ratio_label
from .errors import UsageError
from .imageio import FORMAT_EXTENSIONS, OUTPUT_FORMATS
from .inputs import InputItem

TEMPLATE_FIELDS = {"stem", "ratio", "ext", "rank", "w", "h", "name"}


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


@dataclass
class Claim:
    """Where one crop goes: ``path``, or nothing to write when ``skip`` says why (``"exists"``)."""

    path: Path
    skip: str | None = None


class OutputNamer:
    """Assigns each crop an output path: never two crops of one run on the same file; existing files are kept
    (a ``-1``, ``-2`` … suffix is added), overwritten (``overwrite``) or the crop skipped (``skip_existing``)."""

    def __init__(self, out_dir: Path, template: str, overwrite: bool, skip_existing: bool, items=()):
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

    def claim(self, item: InputItem, ratio: str, rank: int, ext: str, size: tuple) -> Claim:
        """The output of one crop (see :meth:`assign`)."""
        wanted = self.render(item, ratio, rank, ext, size)
        path = self.assign(wanted)
        return Claim(wanted, "exists") if path is None else Claim(path)

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
