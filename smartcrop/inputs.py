"""Collecting ``run``'s inputs: files, folders (optionally recursive), file lists and stdin.

Each input becomes an :class:`InputItem`.  Every input that cannot be collected — missing, a name too long,
unreadable, a FIFO, device or socket, a dangling symlink, an unreadable (sub-)folder — is reported through
``on_error`` as one line naming it (control characters escaped), and the others are still collected: one
problem input never stops a run.  Nothing is ever opened here except regular files, so a FIFO cannot hang
the run.

Folder walks skip hidden files and folders, the output folder (when it lies inside the walked folder) and
files smartcrop wrote itself (:func:`smartcrop.imageio.written_by_smartcrop`), and do not follow symbolic links
to folders; a file smartcrop wrote that lies in the output folder is passed over even when named, so a re-run
(``find . | smartcrop run -`` included) never crops its own crops.  What is passed over on purpose is counted
in :class:`Passed` for the run's notes.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import UsageError
from .imageio import is_image_path, safe_name, written_by_smartcrop

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"II*\x00", b"MM\x00*")
#: sizes of the BMP info headers there are: "BM" alone also starts a list of paths ("BMW_0001.jpg")
_BMP_INFO_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


@dataclass
class InputItem:
    display: str  # what error messages and JSON show
    path: Path | None  # None for stdin data
    rel_dir: Path  # sub-folder mirrored under the output folder
    stem: str
    suffix: str
    data: bytes | None = None
    ident: tuple | None = None  # (st_dev, st_ino) of the file when collected


@dataclass
class Passed:
    """Files and folders the collection passed over on purpose (not errors; the run says them in notes)."""

    crops: list = field(default_factory=list)  # smartcrop's crops found in the folders walked
    own: list = field(default_factory=list)  # smartcrop's crops in the output folder, named or listed
    folder_links: list = field(default_factory=list)  # symbolic links to folders met under -r, not followed
    empty_stdin: bool = False  # '-' given and standard input empty (`find` matched nothing): an empty list


#: Longest path shown in a message: a "name" longer than any path (a binary stream read as a list) is cut there
SHOWN_MAX = 300


def shown(name: str) -> str:
    """``name`` for a message: :func:`safe_name`, cut to :data:`SHOWN_MAX` characters."""
    text = safe_name(name)
    return text if len(text) <= SHOWN_MAX else f"{text[:SHOWN_MAX]}… ({len(text)} characters)"


def looks_like_image(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or \
        (data[4:8] == b"ftyp") or (data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_INFO_SIZES)


def _stat_problem(e: OSError | ValueError, name: str) -> str:
    """Why a path cannot be an input, in words."""
    if isinstance(e, ValueError):
        return "not a valid path (it contains a NUL byte)"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return "dangling symbolic link" if os.path.islink(name) else "no such file or folder"
    if e.errno == errno.ELOOP:
        return "symbolic link loop"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def list_lines(data: bytes) -> list[str]:
    """Paths of a file list, one per line (bytes decoded like the OS decodes file names; a leading UTF-8 byte
    order mark dropped; blank lines skipped).  A name is taken as written, spaces at either end included, when
    such a file exists; otherwise with those spaces trimmed (a hand-edited list's stray blanks).  A list of
    NUL-terminated names (``find -print0``: it ends in a NUL byte, or holds no newline) is split at the NULs
    instead, its names taken exactly (no path contains a NUL; a stray one in a line is that line's error)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its byte order mark (PowerShell's `>`)
        try:
            data = os.fsencode(data.decode("utf-16"))
        except UnicodeError:
            return []
    data = data.removeprefix(b"\xef\xbb\xbf")
    if b"\0" in data and (data.endswith(b"\0") or b"\n" not in data):
        return [os.fsdecode(n) for n in data.split(b"\0") if n]
    out = []
    for line in data.splitlines():
        trimmed = line.strip()
        if not trimmed:
            continue
        name = os.fsdecode(line)
        out.append(name if trimmed != line and _lexists(name) else os.fsdecode(trimmed))
    return out


def _lexists(path: str) -> bool:
    try:
        return os.path.lexists(path)
    except ValueError:  # a NUL byte: reported when the path is used
        return False


def _ident(path: str | os.PathLike) -> tuple | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def walk_folder(folder: Path, recursive: bool, report: Callable[[str], None],
                exclude: tuple | None = None, passed: Passed | None = None) -> list[tuple[Path, os.stat_result]]:
    """``(path, stat)`` of the image files (by extension) in ``folder``, sorted; hidden entries skipped, as are
    sub-folders whose ``(st_dev, st_ino)`` is ``exclude`` (the output folder), symbolic links to folders and
    files smartcrop wrote (both counted in ``passed`` when given).

    Unreadable folders and image-named entries that are not regular files (FIFOs, devices, dangling links)
    are reported, one line each, and skipped."""
    def onerror(e: OSError) -> None:
        report(f"{safe_name(e.filename or folder)}: cannot read folder ({_stat_problem(e, str(e.filename))})")

    found = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=onerror):
        base = Path(dirpath)
        if recursive:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and (exclude is None or _ident(base / d) != exclude))
            if passed is not None:  # os.walk does not go into them
                passed.folder_links += [base / d for d in dirnames if os.path.islink(base / d)]
        else:
            dirnames[:] = []
        for f in filenames:
            if f.startswith(".") or not is_image_path(f):
                continue
            p = base / f
            try:
                st = os.stat(p)
            except (OSError, ValueError) as e:
                report(f"{safe_name(p)}: {_stat_problem(e, str(p))}")
                continue
            if not stat.S_ISREG(st.st_mode):
                report(f"{safe_name(p)}: {_kind(st.st_mode)}, not a photo: skipped")
                continue
            if written_by_smartcrop(p):  # an output of an earlier run
                if passed is not None:
                    passed.crops.append(p)
                continue
            found.append((p, st))
    found.sort(key=lambda t: t[0])
    return found


def collect_inputs(paths: Sequence[str], recursive: bool, stdin=None, list_file: str | None = None,
                   on_error: Callable[[str], None] | None = None, exclude: Path | None = None,
                   passed: Passed | None = None) -> list[InputItem]:
    """Input items from paths (``-`` = stdin: one image, or a list of paths one per line or NUL-separated) and a
    list file.

    Every path that cannot be used is reported through ``on_error`` (one line naming it) and skipped; without
    ``on_error`` the first one raises :class:`UsageError`.  Data on stdin that is neither an image nor a list
    naming any existing path is one such line; empty data (or only blanks) is an empty list.  ``exclude`` (the
    output folder) is never walked into, and the files smartcrop wrote there are not collected even when named.  The same file reached twice for the same
    output sub-folder is collected once.  Files in the folders walked that smartcrop wrote are not collected
    either; ``passed`` (when given) counts what was passed over so.
    """
    def report(line: str) -> None:
        if on_error is None:
            raise UsageError(line)
        on_error(line)

    items: list[InputItem] = []
    names: list[str] = list(paths)
    if list_file is not None:
        if list_file == "-":
            data = (stdin or sys.stdin.buffer).read()
        else:
            try:
                with open(list_file, "rb") as f:  # may be a pipe: --from-file <(find ...)
                    data = f.read()
            except (OSError, ValueError) as e:
                raise UsageError(f"{shown(list_file)}: cannot read file list "
                                 f"({_stat_problem(e, list_file)})") from None
        if looks_like_image(data):
            raise UsageError(f"--from-file {shown(list_file)}: " + (
                "standard input holds an image, not a list of paths (crop it with `smartcrop run -`)"
                if list_file == "-" else "an image, not a list of paths (crop it by naming it)"))
        names += list_lines(data)
        if list_file == "-" and not data.strip() and passed is not None:
            passed.empty_stdin = True
    if "-" in names and list_file == "-":
        raise UsageError("stdin cannot be both a file list and an input")
    expanded: list[str] = []
    for n in names:
        if n != "-":
            expanded.append(n)
            continue
        data = (stdin or sys.stdin.buffer).read()
        if not data.strip():  # `find … | smartcrop run -` that found nothing: an empty list
            if passed is not None:
                passed.empty_stdin = True
            continue
        if looks_like_image(data):
            items.append(InputItem("<stdin>", None, Path(), "stdin", "", data))
            continue
        listed = list_lines(data)
        # "." alone proves nothing: binary data split at its NUL bytes holds one often, and it would crop the
        # whole current folder
        if any(_lexists(x) for x in listed if x not in (".", "..")):  # a list of paths
            expanded += listed
        else:  # random bytes, an SVG, a list from another folder: one line, not one per "line" of it
            first = f" (its first line: '{listed[0]}')" if listed and listed[0] == shown(listed[0]) else ""
            report(f"<stdin>: neither an image smartcrop reads nor a list of existing paths{first}")
    exclude_id = _ident(exclude) if exclude is not None else None
    out_root = os.path.realpath(exclude) if exclude_id is not None else None
    seen: set = set()

    def add(p: Path, rel_dir: Path, st: os.stat_result) -> None:
        key = (os.path.realpath(p), rel_dir)
        if key in seen:
            return
        seen.add(key)
        items.append(InputItem(str(p), p, rel_dir, p.stem, p.suffix, ident=(st.st_dev, st.st_ino)))

    for n in expanded:
        try:
            st = os.stat(n)
        except (OSError, ValueError) as e:
            report(f"{shown(n)}: {_stat_problem(e, n)}")
            continue
        p = Path(n)
        if stat.S_ISDIR(st.st_mode):
            for f, fst in walk_folder(p, recursive, report, exclude_id, passed):
                add(f, f.parent.relative_to(p), fst)
            if passed is not None and out_root is not None:  # the output folder itself walked: its own crops
                passed.own += [f for f in passed.crops if _inside(f, out_root)]
                passed.crops = [f for f in passed.crops if not _inside(f, out_root)]
        elif stat.S_ISREG(st.st_mode):
            if out_root is not None and _inside(p, out_root) and written_by_smartcrop(p):
                if passed is not None:
                    passed.own.append(p)
                continue
            add(p, Path(), st)
        else:
            report(f"{shown(n)}: {_kind(st.st_mode)}, not a photo: skipped")
    return items


def _inside(path: Path, folder: str) -> bool:
    """Whether the entry ``path`` (its folder resolved, the name as is) lies in ``folder`` (a resolved path)."""
    try:
        entry = os.path.join(os.path.realpath(path.parent), path.name)
        return os.path.commonpath([entry, folder]) == folder
    except (OSError, ValueError):
        return False
