"""Output names of ``run``: the ``--name`` template, its checks, and the assignment of one file per crop.

Fields: ``{stem} {ratio} {ext} {rank} {w} {h} {name}``.  A template is checked before any work: unknown
fields, format specs that do not apply, names leaving the output folder or longer than a file name may be are
usage errors.

Names are deterministic: :class:`OutputNamer` gives inputs whose names collide (same sub-folder, same rendered
name apart from the crop's width and height) ``-1``, ``-2`` … suffixes by their position in the input list,
so the same inputs get the same names on every run (``--skip-existing`` decides per input).  No output is
ever written to the path of an input (:class:`InputCollision`).
"""

from __future__ import annotations

import functools
import os
import re
import stat
import string
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from .anchors import ratio_label
from .errors import SmartcropError, UsageError
from .imageio import (OUTPUT_FORMATS, default_output_format, marker_source, output_marker, output_source, safe_name,
                      source_tag)
from .inputs import InputItem

TEMPLATE_FIELDS = {"stem", "ratio", "ext", "rank", "w", "h", "name"}

#: Longest file name (bytes, one path component) on the usual file systems
NAME_MAX = 255

_FORMAT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, MemoryError)


class OutputError(SmartcropError):
    """No output name can be made for one input (e.g. its name would leave the output folder or be too long):
    that input fails, the others go on."""


class InputCollision(UsageError):
    """An output would be written to the path of an input: the request is refused (exit code 2)."""


@dataclass(frozen=True)
class Claim:
    """Where one crop goes: ``path``, or nothing to write when ``skip`` is set (``"exists"``: --skip-existing
    found ``path`` there already)."""

    path: Path
    skip: str | None = None


def check_template(template: str, ratios: Sequence[str] | None = None, top_k: int = 1) -> None:
    """Refuse (:class:`UsageError`) templates with unknown fields, format specs that fail, names that could leave
    the output folder, lack an image extension or exceed 255 bytes, and — when several ``ratios`` or
    ``top_k > 1`` are asked for — templates that would give those crops one name."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UsageError(f"bad name template {template!r}: {e}") from None
    unknown = set(fields) - TEMPLATE_FIELDS
    if "" in unknown or any(f.isdigit() for f in unknown):
        raise UsageError(f"bad name template {template!r}: every {{}} needs a field name "
                         f"({', '.join(sorted(TEMPLATE_FIELDS))})")
    if unknown:
        raise UsageError(f"bad name template {template!r}: unknown field(s) {', '.join(sorted(unknown))} "
                         f"(available: {', '.join(sorted(TEMPLATE_FIELDS))})")
    samples = [dict(stem="x", ratio="16x9", ext="jpg", rank=1, w=1, h=1, name="x.jpg"),
               dict(stem="IMG_0001", ratio="any", ext="png", rank=20, w=65535, h=65535, name="IMG_0001.png")]
    for sample in samples:
        try:
            rendered = template.format(**sample)
        except _FORMAT_ERRORS as e:
            raise UsageError(f"bad name template {template!r}: {type(e).__name__}: {e}") from None
        _check_relative(rendered, template)
        too_long = [p for p in Path(rendered).parts if len(os.fsencode(p)) > NAME_MAX]
        if too_long:
            raise UsageError(f"name template {template!r} makes file names longer than {NAME_MAX} bytes")
        if Path(rendered).suffix.lower() not in OUTPUT_FORMATS:
            raise UsageError(f"name template {template!r} must end in an image extension ('.{{ext}}', '.jpg', "
                             "'.png', '.webp', '.tif')")
    # each crop of a photo its own name, as rendered: a field alone is not enough ('{ratio:.0}' is empty,
    # '{ratio:.2}' gives 16:9 and 16:10 one name); a clash would take a -1 suffix, and a --skip-existing re-run
    # would then take one crop's file for the other's
    named: dict[str, tuple[str, int]] = {}
    for ratio in ratios or ["any"]:
        for rank in range(1, min(top_k, 100) + 1):
            rendered = template.format(stem="x", ratio=ratio_label(ratio), ext="jpg", rank=rank, w=1, h=1,
                                       name="x.jpg")
            other = named.setdefault(rendered, (ratio, rank))
            if other == (ratio, rank):
                continue
            if other[0] != ratio:
                raise UsageError(f"name template {template!r} gives the crops of ratios {other[0]} and {ratio} one "
                                 "name: add {ratio}")
            raise UsageError(f"name template {template!r} gives the {top_k} best crops one name: add {{rank}}")


def _check_relative(rendered: str, template: str) -> None:
    p = Path(rendered)
    if not rendered or p.is_absolute() or rendered.startswith(("/", "\\")) or ".." in p.parts:
        raise UsageError(f"name template {template!r} would write outside the output folder")
    if rendered.replace("\\", "/").split("/")[-1] in {"", "."}:  # "{stem}/", "{stem}/."
        raise UsageError(f"name template {template!r} names a folder, not a file: end it in a file name such as "
                         "'{stem}/{ratio}.{ext}'")


def names_known(template: str, size: tuple | None) -> bool:
    """Whether every output name is known before the crops are chosen: the template uses neither ``{w}`` nor
    ``{h}``, or the run fixes the output size (``--size``)."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError:
        fields = set()
    return size is not None or not ({"w", "h"} & fields)


def _suffixes(names, stem: str, suffix: str) -> list[int]:
    """The clash suffixes (0 for none) of those ``names`` that are ``stem + suffix`` or ``stem-k + suffix``."""
    pattern = re.compile(re.escape(stem) + r"(?:-([1-9][0-9]*))?" + re.escape(suffix))
    found = (pattern.fullmatch(name) for name in names)
    return [int(m.group(1) or 0) for m in found if m]


def suffixed(rel: str, k: int) -> str:
    """``a/b_16x9.jpg`` → ``a/b_16x9-k.jpg`` (k > 0): the name of an input whose output name clashes."""
    p = PurePosixPath(rel)
    return str(p.with_name(f"{p.stem}-{k}{p.suffix}")) if k else rel


def render_name(template: str, item: InputItem, ratio: str, rank: int, ext: str, size: tuple) -> str:
    """``template`` rendered for one crop, relative to the output folder (POSIX separators); one that cannot
    be rendered or would leave the output folder is an :class:`OutputError`.  The one naming rule of both
    engines' outputs, to a folder (:class:`OutputNamer`) or to an URI (``smartcrop.distributed``)."""
    try:
        name = template.format(stem=item.stem, ratio=ratio_label(ratio), ext=ext, rank=rank, w=size[0], h=size[1],
                               name=f"{item.stem}{item.suffix}")
    except _FORMAT_ERRORS as e:
        raise OutputError(f"cannot make an output name ({type(e).__name__}: {e})") from None
    rel = PurePosixPath(*Path(item.rel_dir).parts, *Path(name).parts) if name else PurePosixPath()
    parts = rel.parts
    if not name or Path(name).is_absolute() or ".." in parts or not parts or parts[-1] in {"", "."} \
            or name.endswith(("/", os.sep)):
        raise OutputError(f"its output name '{safe_name(name)}' would leave the output folder")
    return str(rel)


class OutputNamer:
    """Assigns each crop its output path.

    ``items`` is the run's full input list, in order: inputs whose names collide get ``-1``, ``-2`` …
    suffixes by their position in it, the same on every run.  An existing file is never replaced unless
    ``overwrite``: with ``skip_existing`` the crop is skipped (:class:`Claim` ``skip="exists"``), else it
    takes the next free suffix.  Thread-safe.
    """

    def __init__(self, out_dir: Path, template: str, overwrite: bool = False, skip_existing: bool = False,
                 items: Sequence[InputItem] = (), *, out_format: str | None = None, size: tuple | None = None,
                 run_id: str | None = None):
        """``size``: every crop's output size when the run fixes it (``--size``), so that names with ``{w}``
        and ``{h}`` are planned too; ``run_id``: namers of one run share what earlier runs left in the output
        folders (:func:`earlier_outputs`)."""
        self.out_dir = Path(out_dir)
        self.root = self.out_dir.resolve()
        self.template = template
        self.overwrite = overwrite
        self.skip_existing = skip_existing
        self.items = list(items)
        self.out_format = out_format
        self._index = {id(it): k for k, it in enumerate(self.items)}
        self._size = size
        self._masked = names_known(template, size)
        self._slots: dict[tuple[str, int], dict[int, int]] = {}  # (ratio, rank) → item index → suffix
        self._planned: dict[tuple[str, int], dict[str, int]] = {}  # (ratio, rank) → deterministic name → item
        self.reserved: set[Path] = set()
        self._avoided: set[str] = set()  # entries (folder resolved) no crop may take: the run's preview
        self.lock = threading.RLock()
        self._dirs: dict[str, Path] = {}  # folder → its resolution (symlinks followed)
        self._by_tag: dict[str, dict] = earlier_outputs(run_id)  # output folder → :meth:`_tagged`
        self._inputs: dict = {}  # resolved path / entry path / (st_dev, st_ino) → the input
        for it in self.items:
            if it.path is None:
                continue
            for key in self._identities(Path(it.path), getattr(it, "ident", None)):
                self._inputs.setdefault(key, it)

    @classmethod
    def for_run(cls, out_dir: Path, opts, items: Sequence[InputItem]) -> "OutputNamer":
        """The namer of a run's options (a :class:`smartcrop.plan.RunOptions`): template, overwrite/skip and the
        forced format, which every input's deterministic name must be planned with."""
        namer = cls(out_dir, opts.template(), opts.overwrite, opts.skip_existing, items, out_format=opts.out_format,
                    size=opts.size, run_id=getattr(opts, "run_id", None))
        if getattr(opts, "preview", None) is not None:  # written last: no crop may take its name meanwhile
            namer.avoid(Path(opts.preview))
        return namer

    # -- names ----------------------------------------------------------------------------------------------

    def _render(self, item: InputItem, ratio: str, rank: int, ext: str, size: tuple) -> str:
        return render_name(self.template, item, ratio, rank, ext, size)

    def _path(self, rel: str) -> Path:
        """Output path of a relative name, checked: every component fits, and it stays in the output folder."""
        for part in PurePosixPath(rel).parts:
            n = len(os.fsencode(part))
            if n > NAME_MAX:
                raise OutputError(f"its output name would be {n} bytes long, more than the {NAME_MAX} a file "
                                  f"name may have ('{safe_name(part[:60])}…')")
        path = self.out_dir / rel
        try:
            self._resolve_dir(path.parent).relative_to(self.root)
        except ValueError:
            raise OutputError(f"its output {safe_name(path)} would be outside the output folder "
                              "(a symlinked sub-folder?)") from None
        except OSError as e:
            raise OutputError(f"cannot use output folder {safe_name(path.parent)} ({e.strerror or e})") from None
        return path

    def _assign(self, ratio: str, rank: int) -> None:
        """Deterministic collision suffixes of every input for one (ratio, rank), by input position."""
        key = (ratio, rank)
        if key in self._slots:
            return
        taken: dict[str, int] = {}
        slots: dict[int, int] = {}
        for k, it in enumerate(self.items):
            try:
                rel = self._render(it, ratio, rank, output_ext(it, self.out_format, None), self._size or (0, 0))
            except OutputError:
                continue
            j, cand = 0, rel
            while cand in taken:
                j += 1
                cand = suffixed(rel, j)
            taken[cand] = k
            slots[k] = j
        self._slots[key] = slots
        self._planned[key] = taken

    def _locate(self, item: InputItem, ratio: str, rank: int, ext: str, size: tuple) -> tuple[str, int]:
        """(rendered relative name, deterministic collision suffix) of one crop."""
        rel = self._render(item, ratio, rank, ext, size)
        with self.lock:
            k = self._index.get(id(item))
            if k is None:
                return rel, 0
            self._assign(ratio, rank)
            return rel, self._slots[(ratio, rank)].get(k, 0)

    def _suffixed_path(self, rel: str, j: int) -> Path:
        """:meth:`_path` of ``rel`` with its clash suffix ``j``, saying so when the suffix made it too long."""
        try:
            return self._path(suffixed(rel, j))
        except OutputError as e:
            if not j:
                raise
            raise OutputError(f"its name is another input's too, and with the suffix -{j} {e}") from None

    def target(self, item: InputItem, ratio: str, rank: int, ext: str, size: tuple = (0, 0)) -> Path:
        """The deterministic output path of one crop (nothing on disk looked at but the inputs).

        Raises :class:`OutputError` when no name can be made for this input, :class:`InputCollision` when the
        path is that of an input."""
        rel, j = self._locate(item, ratio, rank, ext, size)
        path = self._suffixed_path(rel, j)
        self.check_not_input(path)
        return path

    def claim(self, item: InputItem, ratio: str, rank: int, ext: str, size: tuple) -> Claim:
        """Claim the output of one crop (see the class doc); the path is reserved for this run."""
        rel, j = self._locate(item, ratio, rank, ext, size)
        path = self._suffixed_path(rel, j)
        self.check_not_input(path)
        with self.lock:
            free = path not in self.reserved and not self._avoids(path)
            if self.skip_existing:  # this input's crop from an earlier run, wherever a clash put it
                own = self._earlier_crop(item, rel, j, ratio, rank, path if free else None)
                if own is not None:
                    self.reserved.add(own)
                    return Claim(own, "exists")
            if free and (self.overwrite or not os.path.lexists(path)):
                self.reserved.add(path)
                return Claim(path)
            # taken on disk (or by another crop of this run, whose name could not be planned: a transparent GIF
            # written as PNG, say): the next free suffix that is no other input's deterministic name.  Taken by
            # this run, a crop smartcrop wrote under that suffix whose marker names this input or none (earlier
            # versions) is this crop's from an earlier run: skipped with --skip-existing, replaced with
            # --overwrite (a re-run must not add a copy each time)
            clash = not free
            planned = self._planned.get((ratio, rank), {}) if self._masked else {}
            for n in range(j + 1, j + 100_000):
                cand_rel = suffixed(rel, n)
                if cand_rel in planned:
                    continue
                try:
                    cand = self._path(cand_rel)
                except OutputError as e:  # the suffix made the name too long
                    raise OutputError(f"its name is taken, and with the suffix -{n} {e}") from None
                if cand in self.reserved or self.input_at(cand) is not None or self._avoids(cand):
                    continue
                if os.path.lexists(cand):
                    if not clash or not (self.skip_existing or self.overwrite) or not _ours(cand, item):
                        continue  # another file there (the user's own): never taken over
                    self.reserved.add(cand)
                    return Claim(cand, "exists" if self.skip_existing else None)
                self.reserved.add(cand)
                return Claim(cand)
        raise OutputError(f"no free output name next to {safe_name(path)}")

    def earlier(self, item: InputItem, ratio: str, rank: int, ext: str, size: tuple = (0, 0)) -> Path | None:
        """With --skip-existing: where an earlier run wrote this crop (its name, or a clash suffix whose marker
        names this input; see :meth:`claim`), None if it did not."""
        rel, j = self._locate(item, ratio, rank, ext, size)
        path = self._suffixed_path(rel, j)
        with self.lock:
            return self._earlier_crop(item, rel, j, ratio, rank, path)

    def _earlier_crop(self, item: InputItem, rel: str, j: int, ratio: str, rank: int,
                      path: Path | None) -> Path | None:
        """:meth:`earlier`, ``rel``/``j``/``path`` located (``path`` None: this run took that name already).

        Its own name when the file there names this input; else the first of the name's clash suffixes whose
        marker names this input (its name was taken: by a photo added since that sorts before this one, or by a
        file of the user's) — unless it is the name of another input that the marker names as well (two copies
        of one photo in two folders given), whose crop it is as much; else its own name when the file there
        names no input (a crop of an earlier version, or any other file: --skip-existing skips it by name)."""
        mine = source_of(item)
        there = path is not None and os.path.lexists(path)
        tag = output_source(path) if there else None
        if there and tag == mine:
            return path
        full = self._path(rel)
        planned = self._planned.get((ratio, rank), {}) if self._masked else {}
        for n in sorted(_suffixes(self._tagged(full.parent).get(mine, ()), full.stem, full.suffix)):
            cand_rel = suffixed(rel, n)
            owner = planned.get(cand_rel)
            if n == j or (owner is not None and source_of(self.items[owner]) == mine):
                continue
            cand = self._path(cand_rel)
            if cand not in self.reserved:
                return cand
        return path if there and tag is None else None  # a file naming no input: taken by name, as always

    def _tagged(self, folder: Path) -> dict:
        """The files smartcrop wrote in ``folder`` by the tag of the input each names (tag → names), read once
        a run (a few KiB a file; :func:`earlier_outputs`): what earlier runs left there."""
        key = str(folder)
        got = self._by_tag.get(key)
        if got is None:
            got = {}
            try:
                names = os.listdir(folder)
            except OSError:
                names = []
            for name in names:
                tag = output_source(folder / name)
                if tag is not None:
                    got.setdefault(tag, []).append(name)
            got = self._by_tag.setdefault(key, got)
        return got

    def avoid(self, path: Path) -> None:
        """No crop is given ``path`` (another file this run writes)."""
        with self.lock:
            self._avoided.add(self._entry(path))

    def _avoids(self, path: Path) -> bool:
        return bool(self._avoided) and self._entry(path) in self._avoided

    def _entry(self, path: Path) -> str:
        try:
            return str(self._resolve_dir(path.parent) / path.name)
        except (OSError, RuntimeError):
            return str(path)

    # -- inputs ---------------------------------------------------------------------------------------------

    def _resolve_dir(self, folder: Path) -> Path:
        key = str(folder)
        got = self._dirs.get(key)
        if got is None:
            got = self._dirs[key] = folder.resolve()
        return got

    def _identities(self, path: Path, ident: tuple | None) -> list:
        """Keys under which a path is an input: its entry (folder resolved, name as is), its full resolution
        (a symlink followed) and the (st_dev, st_ino) of what it points to and of the entry itself."""
        try:
            entry = self._resolve_dir(path.parent) / path.name
        except (OSError, RuntimeError):
            return [("ino", tuple(ident))] if ident is not None else []
        out: list = [("entry", str(entry))]
        if ident is not None:
            out.append(("ino", tuple(ident)))
        try:
            lst = os.lstat(path)
        except (OSError, ValueError):
            return out  # nothing there: its full resolution is its entry
        out.append(("ino", (lst.st_dev, lst.st_ino)))
        if stat.S_ISLNK(lst.st_mode):
            try:
                out.append(("entry", str(path.resolve())))
                st = os.stat(path)
                out.append(("ino", (st.st_dev, st.st_ino)))
            except (OSError, RuntimeError, ValueError):
                pass
        return out

    def input_at(self, path: Path) -> InputItem | None:
        """The input whose file ``path`` is (same entry, same target or same inode), or None."""
        for key in self._identities(path, None):
            it = self._inputs.get(key)
            if it is not None:
                return it
        return None

    def check_not_input(self, path: Path) -> None:
        """:class:`InputCollision` if writing ``path`` would replace (or write through to) an input."""
        it = self.input_at(path)
        if it is not None:
            raise InputCollision(f"output {safe_name(path)} would replace the input {safe_name(it.display)}: "
                                 "originals are never written (choose another -o or --name)")


def source_of(item: InputItem) -> bytes:
    """The tag by which the marker of a crop names ``item``: :func:`smartcrop.imageio.source_tag` of its content
    (:func:`_fingerprint`), so a later ``--skip-existing`` run tells this input's crop from another's that took
    its name (another card's ``IMG_0001.jpg``), and from its own before an edit; a photo renamed but for its
    extension keeps its crop.  An input that cannot be read here (an URI) is named by its file name."""
    if item.data is not None:
        data = bytes(item.data)
        return source_tag(_fingerprint(len(data), lambda pos, n: data[pos:pos + n]))
    try:
        st = os.stat(item.path)
        if stat.S_ISREG(st.st_mode):
            return _content_tag(os.fspath(item.path), st.st_size, st.st_mtime_ns, st.st_ino)
    except (OSError, TypeError, ValueError):  # an URI, or unreadable (that photo fails when it is decoded)
        pass
    return source_tag(f"{item.stem}{item.suffix}")


#: a file up to this size is hashed whole; a larger one by its first and last 4 KiB and 32 samples between
_WHOLE_MAX = 256 * 1024


def _fingerprint(size: int, read) -> bytes:
    """What identifies a file's content (``read(pos, n)`` reads it): all of it up to :data:`_WHOLE_MAX`, else its
    size, first and last 4 KiB and 32 evenly spaced 256-byte samples (two scans with the same white margins, or
    two uncompressed photos with the same sky, differ in the samples) — 40 KiB read at most."""
    if size <= _WHOLE_MAX:
        return read(0, size)
    step = (size - 8192) // 33
    parts = [b"%d" % size, read(0, 4096), read(size - 4096, 4096)]
    parts += [read(4096 + k * step, 256) for k in range(1, 33)]
    return b":".join(parts)


@functools.lru_cache(maxsize=4096)
def _content_tag(path: str, size: int, mtime_ns: int, ino: int) -> bytes:
    """:func:`source_of` of a file (read once while it stays the same file, unchanged); OSError if it cannot
    be read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        return source_tag(_fingerprint(size, lambda pos, n: os.pread(fd, n, pos)))
    finally:
        os.close(fd)


#: run id → output folder → :meth:`OutputNamer._tagged` (a Ray worker serving runs one after another keeps the
#: latest few)
_EARLIER: dict[str, dict] = {}
_EARLIER_RUNS = 4
_EARLIER_LOCK = threading.Lock()


def forget_run(run_id: str | None) -> None:
    """Drop what :func:`earlier_outputs` holds for a run that ended (run again with the same options, it reads
    the folders afresh: they now hold its crops)."""
    with _EARLIER_LOCK:
        _EARLIER.pop(run_id, None)


def earlier_outputs(run_id: str | None) -> dict:
    """What earlier runs left in the output folders, as the namers of one run share it: each folder is read
    once a run (and process), before or while it writes there."""
    if run_id is None:
        return {}
    with _EARLIER_LOCK:
        got = _EARLIER.get(run_id)
        if got is None:
            while len(_EARLIER) >= _EARLIER_RUNS:
                _EARLIER.pop(next(iter(_EARLIER)))
            got = _EARLIER[run_id] = {}
        return got


def _ours(path: Path, item: InputItem) -> bool:
    """Whether smartcrop wrote ``path`` from ``item``, or from an input its marker does not name (earlier
    versions)."""
    marker = output_marker(path)
    return marker is not None and marker_source(marker) in (None, source_of(item))


def output_ext(item: InputItem, out_format: str | None, loaded_format: str | None, has_alpha: bool = False) -> str:
    """Output extension (no dot): ``out_format``, else :func:`smartcrop.imageio.default_output_format` -- the
    input's own if writable (``jpeg`` → ``jpg``), else that of its decoded format if writable, else ``jpg``
    (``png`` when the source has transparency).  ``loaded_format`` is None before the photo is decoded."""
    if out_format:
        return out_format
    return default_output_format(item.suffix, loaded_format, has_alpha=has_alpha)
