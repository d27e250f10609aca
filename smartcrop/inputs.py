"""Collecting ``run``'s inputs: files, folders (optionally recursive), file lists and stdin.

Each input becomes an :class:`InputItem`; an input that cannot be collected is reported through ``on_error``
as one line naming it, and the others are still collected.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import UsageError

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"II*\x00", b"MM\x00*", b"BM")


@dataclass
class InputItem:
    display: str  # what error messages and JSON show
    path: Path | None  # None for stdin data
    rel_dir: Path  # sub-folder mirrored under the output folder
    stem: str
    suffix: str
    data: bytes | None = None


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
