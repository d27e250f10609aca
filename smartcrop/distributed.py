"""``smartcrop run --engine ray``: the stages of :mod:`smartcrop.stages` on Ray Data, for millions of photos.

One streamed Ray Data dataset, three operators::

    rows {path[, rel_dir, bytes]}
      → map_batches(_prepare_batch)        Ray tasks (CPU): read, decode at the network's size (stages.prepare)
      → map_batches(_Scorer)               actor pool: Cropper.best_crops_batch on batches of photos
                                           (one GPU per actor where the cluster has GPUs, CPU actors otherwise)
      → map_batches(_finish_batch)         Ray tasks (CPU): output names, then stages.finish (lossless JPEG crop
                                           or re-encode, atomic write) → one row per crop, or one error row

The stage functions are the local engine's (:func:`~smartcrop.stages.prepare`, :func:`~smartcrop.stages.finish`,
:class:`~smartcrop.cropper.Cropper`, :class:`~smartcrop.naming.OutputNamer`), so crops, names and JSON lines are
the same as ``--engine local``.  Every task holds one photo's decode at a time, so memory per worker is one
full-resolution image plus its encoded crops, whatever the size of the collection.

Faults: a photo that cannot be read, decoded, scored or written is one error row (one stderr line in the
CLI), never a failed job; a worker that dies is restarted and its batch retried by Ray (actors: unlimited
restarts and task retries, Ray Data's defaults; tasks: Ray's 3 retries).  ``SMARTCROP_RAY_FAULT`` injects
such a death for tests: ``score:/path/marker,finish:/other`` kills the process running the first batch of
each named stage (prepare, score, finish) once — the marker file, created atomically, says it happened.

Paths may be local or any URI pyarrow's file systems read and write (``s3://``, ``gs://``, ``hdfs://``,
``file://``).  Ray is imported only by the functions that need it: ``pip install 'ray[data]>=2.40'`` (the ``ray``
extra).

Python entry point::

    import ray, smartcrop.distributed as sd
    ds = ray.data.from_items([{"path": "s3://bucket/a.jpg"}, ...])
    out = sd.crop(ds, ["16:9", "1:1"], output="s3://bucket/cropped")   # lazy ray.data.Dataset
    for row in out.iter_rows(): ...   # {path, ratio, box, score, size, output, skipped, lossless, error, note,
                                      #  refused, fewer}

A local file name that is not valid UTF-8 crosses Arrow escaped (:func:`wire`); the CLI undoes it, and
:func:`unwire` gives a row's ``path``, ``input`` or ``output`` back as Python's ``os`` functions take it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from .anchors import FREE_GRID
from .cropper import FUSE_K, Choice
from .errors import SmartcropError, UsageError, one_line
from .naming import suffixed

INSTALL_HINT = "the Ray engine needs Ray Data: pip install 'ray[data]>=2.40' (smartcrop's ray extra)"
FAULT_ENV = "SMARTCROP_RAY_FAULT"
STAGES = ("prepare", "score", "finish")

#: Photos per prepare / finish task (a task holds one decode at a time; more photos per task = fewer tasks)
TASK_BATCH = 4
#: Memory Ray reserves for a prepare task (a draft-size decode; a non-JPEG is decoded whole, then shrunk) and a
#: finish task (one full-resolution decode plus its encoded crops): the scheduler never packs more decodes
#: on a node than its memory holds.  (Being different from the scorer's, they also keep Ray Data from fusing
#: the decode into the model's actors: decoding stays on CPU tasks while the actors score.)
PREPARE_MEMORY = 512 << 20
FINISH_MEMORY = 1 << 30


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray: {INSTALL_HINT}") from None
    return ray


# ------------------------------------------------------------------------------------------------------------
# paths and URIs

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)")
_FS_CACHE: dict = {}


def is_uri(text) -> bool:
    """``s3://…``, ``gs://…``, ``hdfs://…``, ``file://…``: anything with a scheme (a local path has none)."""
    return isinstance(text, str) and bool(_URI.match(text))


def restore_uri(text: str) -> str:
    """An URI that went through :class:`pathlib.Path` (``s3://b/k`` → ``s3:/b/k``) given back its ``//``."""
    if _URI.match(text):
        return text
    m = _COLLAPSED.match(text)
    if m is None:
        return text
    return f"{m.group(1)}://{'/' if m.group(1).lower() == 'file' else ''}{text[m.end():]}"


def _filesystem(uri: str):
    """``(pyarrow FileSystem, path)`` of an URI; file systems are cached per scheme, host and options."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri, allow_fragments=False)
    key = (parts.scheme.lower(), parts.netloc, parts.query)
    hit = _FS_CACHE.get(key)
    if hit is None:
        from pyarrow import fs as pafs

        if key[0] == "file":
            hit = (pafs.LocalFileSystem(), "")
        else:
            base = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
            fs, prefix = pafs.FileSystem.from_uri(base)
            hit = (fs, prefix.rstrip("/"))
        _FS_CACHE[key] = hit
    fs, prefix = hit
    return fs, prefix + unquote(parts.path)


def _strip_query(uri: str) -> str:
    return uri.split("?", 1)[0].rstrip("/")


def read_uri(uri: str) -> bytes:
    """The bytes of a file given by URI."""
    fs, path = _filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_uri(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` complete or not at all: object stores (S3, GCS) publish an object only when
    its upload completes; other file systems get a temporary name in the same folder, then a rename."""
    import secrets

    fs, path = _filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if fs.type_name in ("s3", "gcs"):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = posixpath.join(parent, f".smartcrop-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: BLE001 - best effort: the temporary may not exist
            pass
        raise


def uri_exists(uri: str) -> bool:
    from pyarrow import fs as pafs

    fs, path = _filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_uri(uri: str, recursive: bool, exclude: str | None = None,
             on_error: Callable[[str], None] | None = None) -> list[dict]:
    """Input rows of the image files at ``uri`` (a file, or a folder / prefix: sorted like a local walk,
    hidden files and folders skipped, nothing under ``exclude``)."""
    from urllib.parse import quote

    from pyarrow import fs as pafs

    from .imageio import is_image_path

    fs, path = _filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [_input_row(uri, "")]
        if info.type != pafs.FileType.Directory:
            raise FileNotFoundError("no such file or folder")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except OSError as e:
        if on_error is None:
            raise UsageError(f"{uri}: {one_line(e)}") from None
        on_error(f"{uri}: {one_line(e)}")
        return []
    base = path.rstrip("/")
    root = _strip_query(uri)
    query = f"?{uri.split('?', 1)[1]}" if "?" in uri else ""  # e.g. ?endpoint_override=…: every file keeps it
    skip = _strip_query(exclude) + "/" if exclude else None
    rows = []
    for rel in sorted((f.path[len(base) + 1:] for f in found if f.type == pafs.FileType.File),
                      key=lambda r: r.split("/")):
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or not is_image_path(parts[-1]):
            continue
        child = f"{root}/{quote(rel)}"  # URI paths are percent-encoded (_filesystem decodes them)
        if skip and child.startswith(skip):
            continue
        rows.append(_input_row(child + query, "/".join(parts[:-1])))
    return rows


def _input_row(path: str, rel_dir: str, display: str | None = None, stem: str | None = None,
               suffix: str | None = None) -> dict:
    if stem is None or suffix is None:
        from urllib.parse import unquote

        name = PurePosixPath(unquote(_strip_query(path)) if is_uri(path) else Path(path).as_posix()).name
        p = PurePosixPath(name)
        stem, suffix = p.stem, p.suffix
    return {"path": path, "display": display or path, "rel_dir": rel_dir, "stem": stem, "suffix": suffix,
            "group": "", "gpos": 0}


def _item(row: dict):
    """The :class:`~smartcrop.inputs.InputItem` of a dataset row."""
    from .inputs import InputItem

    path = row["path"]
    local = not is_uri(path)
    rel = row.get("rel_dir") or ""
    if row.get("stem") is None or row.get("suffix") is None:
        row = {**row, **_input_row(path, rel, row.get("display"))}
    return InputItem(row.get("display") or path, Path(path) if local else None, Path(rel), row["stem"],
                     row["suffix"])


# ------------------------------------------------------------------------------------------------------------
# output names: the local engine's OutputNamer, given the inputs its names can collide with


def _masked_name(item, opts, ratio: str, rank: int) -> str | None:
    """The name of one crop before the crop is known (width and height 0, the extension predicted from the
    input's name), relative to the output folder: what makes names collide between inputs."""
    from .naming import OutputError, output_ext, render_name

    try:
        return render_name(opts.template(), item, ratio, rank, output_ext(item, opts.out_format, None), (0, 0))
    except OutputError:  # the crop's own claim says why, in its error line
        return None


def mark_collisions(rows: list[dict], opts) -> None:
    """Give every row whose output names collide with other inputs' the rows of those inputs (``group``, in
    input order, and its position ``gpos``): the worker's :class:`OutputNamer` then hands out the same
    ``-1``, ``-2`` … suffixes as the local engine's, which sees the whole input list."""
    seen: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        item = _item(row)
        for ratio in opts.ratios:
            for rank in range(1, opts.top_k + 1):
                key = _masked_name(item, opts, ratio, rank)
                if key is not None:
                    seen.setdefault(key, []).append(i)
    peers: dict[int, set] = {}
    for idx in seen.values():
        if len(idx) > 1:
            for i in idx:
                peers.setdefault(i, set()).update(idx)
    for i, ps in peers.items():
        order = sorted(ps)
        rows[i]["group"] = json.dumps([{k: rows[j][k] for k in ("path", "display", "rel_dir", "stem", "suffix")}
                                       for j in order])
        rows[i]["gpos"] = order.index(i)


class _UriNamer:
    """:class:`~smartcrop.naming.OutputNamer`'s rules for an output folder given by URI."""

    def __init__(self, root: str, template: str, overwrite: bool, skip_existing: bool, items, out_format=None):
        self.root = _strip_query(root)
        self.query = root.split("?", 1)[1] if "?" in root else None
        self.template = template
        self.overwrite = overwrite
        self.skip_existing = skip_existing
        self.items = list(items)
        self.out_format = out_format
        self.reserved: set[str] = set()

    def _uri(self, rel: str) -> str:
        return f"{self.root}/{rel}" + (f"?{self.query}" if self.query else "")

    def _render(self, item, ratio, rank, ext, size) -> str:
        from .naming import render_name

        return render_name(self.template, item, ratio, rank, ext, size)

    def _slot(self, item, ratio, rank) -> tuple[int, set]:
        from .naming import output_ext

        taken: set[str] = set()
        mine = 0
        for it in self.items:
            rel = self._render(it, ratio, rank, output_ext(it, self.out_format, None), (0, 0))
            j, cand = 0, rel
            while cand in taken:
                j += 1
                cand = suffixed(rel, j)
            taken.add(cand)
            if it is item:
                mine = j
        return mine, taken

    def target(self, item, ratio, rank, ext, size=(0, 0)) -> str:
        j, _ = self._slot(item, ratio, rank)
        return self._uri(suffixed(self._render(item, ratio, rank, ext, size), j))

    def earlier(self, item, ratio, rank, ext, size=(0, 0)) -> str | None:
        """With --skip-existing: this crop's URI when an object is there (by name: no marker is read there)."""
        uri = self.target(item, ratio, rank, ext, size)
        return uri if uri_exists(uri) else None

    def claim(self, item, ratio, rank, ext, size):
        from .naming import Claim, OutputError

        rel = self._render(item, ratio, rank, ext, size)
        j, planned = self._slot(item, ratio, rank)
        uri = self._uri(suffixed(rel, j))
        if uri not in self.reserved:
            if self.overwrite or not uri_exists(uri):
                self.reserved.add(uri)
                return Claim(uri)
            if self.skip_existing:
                self.reserved.add(uri)
                return Claim(uri, "exists")
        for n in range(j + 1, j + 100_000):
            cand = suffixed(rel, n)
            if cand in planned or self._uri(cand) in self.reserved or uri_exists(self._uri(cand)):
                continue
            self.reserved.add(self._uri(cand))
            return Claim(self._uri(cand))
        raise OutputError(f"no free output name next to {uri}")


def _namer(row: dict, item, opts, out_root: str):
    """The output namer of one photo: the local engine's for a folder, :class:`_UriNamer` for an URI."""
    items, me = [item], item
    if row.get("group"):
        items = [_item(g) for g in json.loads(row["group"])]
        me = items[row["gpos"]]
    if is_uri(out_root):
        return _UriNamer(out_root, opts.template(), opts.overwrite, opts.skip_existing, items,
                         opts.out_format), me
    from .naming import OutputNamer

    return OutputNamer.for_run(Path(out_root), opts, items), me


def _already_done(row: dict, opts, out_root: str | None) -> list[str] | None:
    """With --skip-existing: the outputs of a photo whose every crop exists already (it is then neither
    decoded nor scored: a re-run of an interrupted job costs a listing and a marker read a crop), else None.
    A dry run looks too, as the local engine's does (it only reads the output folder)."""
    from .naming import names_known

    if not (opts.skip_existing and out_root and names_known(opts.template(), opts.size)):
        return None
    from .plan import earlier_crops

    namer, me = _namer(row, _item(row), opts, out_root)
    found = earlier_crops(namer, me, opts)
    return None if found is None else [str(p) for _, p in found]


# ------------------------------------------------------------------------------------------------------------
# the stages as Ray Data batch functions (pyarrow tables in and out)

_ID_COLUMNS = ("path", "display", "rel_dir", "stem", "suffix", "group", "gpos")


def _schemas(return_bytes: bool):
    import pyarrow as pa

    ident = [("path", pa.string()), ("display", pa.string()), ("rel_dir", pa.string()), ("stem", pa.string()),
             ("suffix", pa.string()), ("group", pa.string()), ("gpos", pa.int32())]
    photo = pa.schema(ident + [
        ("format", pa.string()), ("full_w", pa.int32()), ("full_h", pa.int32()), ("reduced_depth", pa.int32()),
        ("gray_depth", pa.int32()), ("has_alpha", pa.bool_()),
        ("done", pa.list_(pa.string())), ("error", pa.string()), ("data", pa.binary())])
    prepared = photo.append(pa.field("image", pa.binary())).append(pa.field("width", pa.int32())) \
        .append(pa.field("height", pa.int32()))
    crop_t = pa.struct([("ratio", pa.string()), ("box", pa.list_(pa.int64())), ("score", pa.float64())])
    scored = photo.append(pa.field("crops", pa.list_(crop_t)))
    result = pa.schema([
        ("path", pa.string()), ("input", pa.string()), ("ratio", pa.string()), ("box", pa.list_(pa.int64())),
        ("score", pa.float64()), ("size", pa.list_(pa.int64())), ("output", pa.string()),
        ("skipped", pa.string()), ("lossless", pa.bool_()), ("error", pa.string()), ("note", pa.string()),
        ("refused", pa.list_(pa.string())), ("fewer", pa.bool_())]
        + ([("data", pa.binary())] if return_bytes else []))
    return prepared, scored, result


def _inject_fault(stage: str, faults: dict) -> None:
    """Test hook (``SMARTCROP_RAY_FAULT``): the first batch of ``stage`` kills its process, once."""
    marker = faults.get(stage)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    os._exit(17)  # a worker dying mid-batch, as if killed for memory


def _faults_from_env() -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in os.environ.get(FAULT_ENV, "").split(","))):
        stage, _, marker = part.partition(":")
        if stage in STAGES and marker:
            out[stage] = marker
    return out


def _describe(e: BaseException) -> str:
    from .runner import describe_error as describe

    return describe(e)


def _per_file_errors() -> tuple:
    from .stages import PER_FILE_ERRORS as _PER_FILE

    return _PER_FILE


# Arrow strings must be valid UTF-8, and a local file name need not be: Python holds its undecodable bytes as
# lone surrogates (U+DC80..U+DCFF), which Arrow refuses (one such photo failed the whole Ray job).  Rows cross
# every Arrow table boundary "wired": each NUL or lone surrogate escaped behind a NUL, which no path and no
# valid UTF-8 name holds otherwise, so every other string crosses unchanged and the escape is undone exactly.
_WIRE_RE = re.compile("[\x00\ud800-\udfff]")
_UNWIRE_RE = re.compile("\x00(\x00|u[0-9a-f]{4}|[\x80-\xff])")


def _wire_char(m) -> str:
    o = ord(m.group())
    if o == 0:
        return "\x00\x00"
    return "\x00" + (chr(o - 0xDC00) if 0xDC80 <= o <= 0xDCFF else f"u{o:04x}")


def _unwire_char(m) -> str:
    g = m.group(1)
    if g == "\x00":
        return g
    return chr(int(g[1:], 16)) if g[0] == "u" else chr(0xDC00 + ord(g))


def wire(text: str) -> str:
    """``text`` as an Arrow string can hold it (see :func:`unwire`); unchanged unless it holds a NUL or a lone
    surrogate (a name that is not UTF-8, as Python decodes it)."""
    return _WIRE_RE.sub(_wire_char, text)


def unwire(text: str) -> str:
    """The inverse of :func:`wire`: the name as Python's ``os`` functions take it (``os.fsencode`` gives its
    bytes).  Output rows of :func:`crop` hold wired names."""
    return _UNWIRE_RE.sub(_unwire_char, text)


def _wired(row: dict, f=wire) -> dict:
    """``row`` with :func:`wire` (or ``f``) applied to each string and each list of strings in it."""
    out = {}
    for k, v in row.items():
        if isinstance(v, str):
            v = f(v)
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            v = [f(x) for x in v]
        out[k] = v
    return out


def _unwired(row: dict) -> dict:
    return _wired(row, unwire)


def _source(row: dict):
    """What the stages decode: the row's bytes, the bytes behind an URI, or a local path."""
    if row.get("data") is not None:
        return row["data"]
    path = row["path"]
    return read_uri(path) if is_uri(path) else path


def _prepare_batch(table, *, short_side: int, max_long_side: int, opts, out_root, faults, return_bytes):
    """Stage 1 (Ray task): one row per photo with its pixels at the network's size, or its error."""
    import pyarrow as pa

    from .stages import prepare

    _inject_fault("prepare", faults)
    schema = _schemas(return_bytes)[0]
    per_file = _per_file_errors()
    rows = []
    for r in map(_unwired, table.to_pylist()):
        row = {k: r.get(k) for k in _ID_COLUMNS}
        if row["display"] is None:
            row["display"] = row["path"]
        if row["stem"] is None or row["suffix"] is None:
            row.update(_input_row(row["path"], row["rel_dir"] or "", row["display"]))
        row["rel_dir"] = row["rel_dir"] or ""
        row["data"] = r.get("bytes")
        try:
            done = _already_done(row, opts, out_root)
            if done is not None:
                row["done"] = done
            else:
                p = prepare(_source(row), short_side, max_long_side)
                img = p.image if p.image.mode == "RGB" else p.image.convert("RGB")
                row.update(image=img.tobytes(), width=img.width, height=img.height, full_w=p.full_size[0],
                           full_h=p.full_size[1], format=p.format, reduced_depth=int(p.reduced_depth),
                           gray_depth=int(p.gray_depth), has_alpha=bool(p.has_alpha))
        except per_file as e:
            row["error"] = _describe(e)
        rows.append(_wired(row))
    return pa.Table.from_pylist(rows, schema=schema)


class _Scorer:
    """Stage 2 (Ray actor): the model, loaded once per actor, scores batches of prepared photos."""

    def __init__(self, model, device: str, ratios, top_k: int, faults: dict, return_bytes: bool,
                 choice: Choice = Choice()):
        import tempfile

        import ray
        import torch

        from .cropper import Cropper, resolve_device

        blob = ray.get(model[0])  # the driver's model file, through the object store
        gpu = bool(ray.get_gpu_ids())
        if device == "auto":
            device = resolve_device("auto")
            if device.startswith("cuda") and not gpu:
                device = "cpu"
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1
        torch.set_num_threads(max(1, int(round(cpus))))
        with tempfile.TemporaryDirectory(prefix="smartcrop-model-") as d:
            path = Path(d) / "model.safetensors"
            path.write_bytes(blob)
            self.cropper = Cropper(weights=path, device=device)
        self.cropper.choice = choice
        self.ratios, self.top_k = list(ratios), top_k
        self.faults = faults
        self.schema = _schemas(return_bytes)[1]

    def _score(self, batch: list) -> list:
        """Crops of each ``(row, image)``, or the error string of a photo whose scoring failed (a failing batch
        is retried photo by photo, like the local engine)."""
        try:
            return self.cropper.best_crops_batch([(img, (r["full_w"], r["full_h"])) for r, img in batch],
                                                 self.ratios, self.top_k)
        except (RuntimeError, MemoryError) as e:
            if len(batch) == 1:
                from .stages import scoring_failure

                return [scoring_failure(e)]
            return [self._score([b])[0] for b in batch]

    def __call__(self, table):
        import pyarrow as pa
        from PIL import Image

        _inject_fault("score", self.faults)
        rows = table.to_pylist()
        todo = [(r, Image.frombytes("RGB", (r["width"], r["height"]), r["image"])) for r in rows
                if r["error"] is None and r["done"] is None]
        for (r, _), crops in zip(todo, self._score(todo) if todo else []):
            if isinstance(crops, str):
                r["error"] = crops
            else:
                r["crops"] = [{"ratio": c.ratio, "box": list(c.box), "score": c.score} for c in crops]
        for r in rows:
            for k in ("image", "width", "height"):
                r.pop(k, None)
        return pa.Table.from_pylist(rows, schema=self.schema)


def _finish_batch(table, *, opts, out_root, faults, return_bytes):
    """Stage 3 (Ray task): name and write the crops of each photo → one row per crop (or one error row)."""
    import pyarrow as pa

    _inject_fault("finish", faults)
    schema = _schemas(return_bytes)[2]
    per_file = _per_file_errors()
    out = []
    for r in map(_unwired, table.to_pylist()):
        base = {"path": r["path"], "input": r["display"]}
        if r["error"] is not None:
            out.append({**base, "error": r["error"]})
            continue
        if r["done"] is not None:  # --skip-existing found every output: not decoded, not scored
            out += [{**base, "ratio": ratio, "output": t, "skipped": "exists"}
                    for (ratio, _), t in zip(((x, k) for x in opts.ratios for k in range(1, opts.top_k + 1)),
                                             r["done"])]
            continue
        try:
            out += _finish_photo(r, base, opts, out_root, return_bytes)
        except per_file as e:
            out.append({**base, "error": _describe(e)})
    return pa.Table.from_pylist([_wired(r) for r in out], schema=schema)


def _finish_photo(r: dict, base: dict, opts, out_root: str | None, return_bytes: bool) -> list[dict]:
    """One scored photo through the stage shared with the local engine (:func:`smartcrop.stages.crop_job`),
    then :func:`~smartcrop.stages.finish`; a remote output is written here from the returned bytes."""
    from .naming import output_ext, source_of
    from .runner import fewer_than_asked
    from .stages import crop_job, depth_lost, finish

    item = _item(r)
    ext = output_ext(item, opts.out_format, r["format"], bool(r.get("has_alpha")))
    claim = None
    if out_root is not None and not opts.dry_run:
        namer, me = _namer(r, item, opts, out_root)
        claim = lambda *a: namer.claim(me, *a)  # noqa: E731
    remote = out_root is not None and is_uri(out_root)
    crops = [(c["ratio"], c["box"], c["score"]) for c in r["crops"] or []]
    refused: list[str] = []
    decisions, job = crop_job(item.display, _source(r), crops, ext, opts, claim,
                              write=claim is not None or return_bytes, on_refused=refused.append,
                              mark=source_of(item), full_size=(r["full_w"], r["full_h"]))
    recs = [{**base, "ratio": d.ratio, "box": list(d.box), "score": d.score, "size": list(d.size),
             **({"output": d.output, "skipped": d.skipped} if d.skipped else {})} for d in decisions]
    if refused:  # the crops left out, said once with the photo's first record (the driver counts it incomplete)
        recs[0]["refused"] = refused
    if recs and fewer_than_asked([c[0] for c in crops], opts):
        recs[0]["fewer"] = True
    if job is None:
        return recs
    bits = depth_lost(r["reduced_depth"] or 0, r.get("gray_depth") or 0, ext)
    if bits:
        from .imageio import depth_note

        recs[0]["note"] = depth_note(bits)
    targets = [s.target for s in job.crops]
    if remote:  # finish returns the bytes; they go to the URI from here
        for s in job.crops:
            s.target = None
    written = finish(job)
    for d, rec in zip(decisions, recs):
        if d.spec is None:
            continue
        w, target = written[d.spec], targets[d.spec]
        rec["box"], rec["lossless"] = list(w.box), w.lossless
        if remote:
            from .imageio import mark_output

            write_uri(target, mark_output(w.data, job.mark))
            rec["output"] = target
        elif w.data is not None:
            rec["data"] = w.data
        else:
            rec["output"], rec["skipped"] = w.output, w.skipped
            if w.skipped:
                rec["lossless"] = None
    return recs


# ------------------------------------------------------------------------------------------------------------
# the pipeline


def load_model_blob(weights=None, model: str | None = None) -> tuple[bytes, int, int]:
    """The model file's bytes (validated by loading it here, so a bad file is one error before any work) and
    its input size ``(short_side, max_long_side)``."""
    from .weights import load_model, resolve_model

    path = resolve_model(weights, model)
    net = load_model(path)
    return path.read_bytes(), net.config.short_side, net.config.max_long_side


def build(ds, opts, *, model: tuple, out_root: str | None, device: str = "auto", return_bytes: bool = False,
          scorers=None, num_gpus: float | None = None, cpus_per_scorer: float = 1.0):
    """The three operators on ``ds`` (rows with ``path``), for validated :class:`~smartcrop.plan.RunOptions`."""
    ray = _import_ray()
    from ray.data import ActorPoolStrategy

    if device not in {"auto", "cpu", "cuda", "mps"} and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r} (auto, cpu, cuda, mps)")
    blob, short_side, max_long_side = model
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
    if num_gpus is None:
        num_gpus = 1 if gpus >= 1 and (device == "auto" or device.startswith("cuda")) else 0
    if num_gpus and not gpus:
        raise UsageError(f"device {device!r}: the Ray cluster has no GPU")
    if device.startswith("cuda") and not num_gpus:
        raise UsageError(f"device {device!r}: the Ray cluster has no GPU")
    if scorers is None:
        scorers = (1, max(1, int(gpus // num_gpus))) if num_gpus else (1, max(1, int(cpus // (2 * cpus_per_scorer))))
    lo, hi = (scorers, scorers) if isinstance(scorers, int) else scorers
    faults = _faults_from_env()
    ref = ray.put(blob)
    common = dict(opts=opts, out_root=out_root, faults=faults, return_bytes=return_bytes)
    ds = ds.map_batches(_prepare_batch, batch_format="pyarrow", batch_size=TASK_BATCH, num_cpus=1,
                        memory=PREPARE_MEMORY, fn_kwargs=dict(short_side=short_side, max_long_side=max_long_side, **common))
    ds = ds.map_batches(_Scorer, batch_format="pyarrow", batch_size=max(1, opts.batch),
                        compute=ActorPoolStrategy(min_size=lo, max_size=hi), num_cpus=cpus_per_scorer,
                        num_gpus=num_gpus or None,
                        fn_constructor_kwargs=dict(model=[ref], device="cuda" if num_gpus and device == "auto"
                                                   else device, ratios=opts.ratios, top_k=opts.top_k,
                                                   faults=faults, return_bytes=return_bytes,
                                                   choice=opts.choice))
    return ds.map_batches(_finish_batch, batch_format="pyarrow", batch_size=TASK_BATCH, num_cpus=1,
                          memory=FINISH_MEMORY, fn_kwargs=common)


def crop(ds, ratios: Sequence[str] = ("any",), *, output: str | os.PathLike | None = None, weights=None,
         model: str | None = None, device: str = "auto", name_template: str | None = None, size=None,
         max_side: int | None = None, top_k: int = 1, quality: int | None = None, reencode: bool = False,
         upscale: bool = False, out_format: str | None = None, strip: bool = False, overwrite: bool = False,
         skip_existing: bool = False, return_bytes: bool = False, batch_size: int = 8, scorers=None,
         num_gpus: float | None = None, cpus_per_scorer: float = 1.0, fuse: int = FUSE_K, refine: bool = False,
         faces: bool = False, free_grid: str = FREE_GRID):
    """Crop every photo of a Ray dataset: a lazy :class:`ray.data.Dataset` of one row per crop.

    ``ds`` has a ``path`` column (local paths or URIs), optionally ``rel_dir`` (a sub-folder mirrored under
    ``output``) and ``bytes`` (the file's content, e.g. from ``ray.data.read_binary_files(...,
    include_paths=True)``: then it is not read again).  ``output``: a folder or URI to write the crops to,
    named by ``name_template`` as ``smartcrop run --name`` does; None writes nothing (boxes only, or the
    encoded crops in a ``data`` column with ``return_bytes``).  The other options are ``smartcrop run``'s.

    Rows: ``path, input, ratio, box [x1, y1, x2, y2], score, size [w, h], output, skipped ("exists"),
    lossless, error, note, refused, fewer`` (+ ``data``).  A photo that fails is one row with ``error`` set (the
    rest null); ``refused`` lists, on a photo's first row, the crops left out because they could not be written
    as asked (a ratio too thin for the photo, say), one line each; ``fewer`` is true there when the photo has
    fewer than ``top_k`` distinct crops for a ratio.
    ``scorers``: actors of the model (an int, or ``(min, max)`` for an autoscaling pool; default one per GPU,
    or half the CPUs); ``num_gpus`` per actor (default 1 where the cluster has GPUs); ``batch_size`` photos
    per model pass.

    Output names are deterministic, except that inputs whose names collide (``a.jpg`` and ``a.jpeg``) are
    told apart in input order only when they are listed in one call of :func:`run_command`; here each
    row is named on its own (a collision then gets the next free ``-N`` suffix).
    """
    from .naming import check_template
    from .plan import RunOptions, normalize_ratios, parse_format, parse_size

    if overwrite and skip_existing:
        raise UsageError("overwriting and skipping existing outputs exclude each other")
    try:  # before any actor is made
        choice = Choice(fuse, refine, faces, free_grid)
    except ValueError as e:
        raise UsageError(str(e)) from None
    sz = parse_size(size) if isinstance(size, str) else (tuple(size) if size else None)
    opts = RunOptions(ratios=normalize_ratios(list(ratios), sz), size=sz, out_format=parse_format(out_format),
                      name_template=name_template, max_side=max_side, top_k=top_k, quality=quality,
                      reencode=reencode, upscale=upscale, strip=strip, overwrite=overwrite,
                      skip_existing=skip_existing, dry_run=output is None and not return_bytes, batch=batch_size,
                      choice=choice)
    check_template(opts.template(), opts.ratios, opts.top_k)
    out_root = None if output is None else (restore_uri(str(output)) if is_uri(restore_uri(str(output)))
                                            else str(output))
    opts.out_dir = None if out_root is None or is_uri(out_root) else Path(out_root)
    if opts.out_dir is not None:
        from .plan import prepare_output_dir

        prepare_output_dir(opts.out_dir)
    return build(ds, opts, model=load_model_blob(weights, model), out_root=out_root, device=device,
                 return_bytes=return_bytes and output is None, scorers=scorers, num_gpus=num_gpus,
                 cpus_per_scorer=cpus_per_scorer)


# ------------------------------------------------------------------------------------------------------------
# the command line (`smartcrop run --engine ray`)


#: seconds a cluster address is given to answer before Ray is asked to join it (:func:`_check_answers`)
CONNECT_TIMEOUT = 10.0


def _check_answers(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A one-line :class:`UsageError` when nothing answers at a ``HOST:PORT`` (or ``ray://HOST:PORT``) cluster
    address: Ray itself retries such an address for minutes, deaf to Ctrl-C.  ``auto`` and other forms are left
    to Ray."""
    import socket

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:  # refused, timed out, no such host, a port out of range
        reason = "timed out" if isinstance(e, socket.timeout) else one_line(getattr(e, "strerror", None) or e)
        raise UsageError(f"cannot join the Ray cluster at {address}: nothing answers there ({reason})") from None


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine belongs to; None: ``$RAY_ADDRESS``,
    as Ray's own jobs set it), or start a local Ray of its own with ``num_cpus`` CPUs (default: every usable
    core; at least 2, as the scoring actor holds one while the decoding tasks need another).  True when this
    call started or joined it (the caller then shuts it down); an already initialised Ray is used as it is."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    import signal
    import threading

    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    # ray.init makes SIGTERM a bare exit (status 15, no word, no clean-up): the caller's handling is kept
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            _check_answers(address)
            ray.init(address=address, **kwargs)
        else:
            from .pool import usable_cores

            # "local": a Ray of its own even when a cluster runs on this machine (Ray would join that one, and
            # refuse the CPU count); 2 CPUs at least: with one, the decoding tasks waited for ever
            ray.init(address="local", num_cpus=max(2, num_cpus or usable_cores()), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise UsageError(f"cannot start or join {where}: {one_line(e)}") from None
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    return True


def _quiet_ray_data(progress: bool) -> None:
    """Ray Data's progress bars only on a terminal, and no execution chatter on stderr: stderr is one line
    per failed photo, as with the local engine."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    for name, value in (("print_on_execution_start", False), ("enable_auto_log_stats", False)):
        if hasattr(ctx, name):
            setattr(ctx, name, value)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray").setLevel(logging.ERROR)


@contextmanager
def _ray_output_to(log_path: str):
    """Keep Ray's own messages out of smartcrop's output while Ray runs; yields the stream for the JSON lines.

    Ray prints worker deaths and other cluster events to ``sys.stdout`` (where they would corrupt ``--json``
    lines) and its C++ core logs to file descriptor 2 (e.g. a note on every actor pool Ray Data starts; the
    local Ray's own processes inherit it).  Both go to ``log_path`` here; smartcrop's lines still reach the
    real stdout (the yielded stream) and stderr (``sys.stderr``).  File descriptor 2 is left alone when
    stderr is not it (e.g. captured by a test runner)."""
    import io

    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        stream.flush()
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    try:
        redirect = err.fileno() == 2
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        redirect = False
    saved = None
    if redirect:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        sys.stderr = open(saved, "w", buffering=1, encoding=getattr(err, "encoding", None) or "utf-8",
                          errors="backslashreplace", closefd=False)
    sys.stdout = log
    try:
        yield out
    finally:
        sys.stdout = out
        if saved is not None:
            sys.stderr.flush()
            sys.stderr = err
            os.dup2(saved, 2)
            os.close(saved)
        log.close()


def _read_list(from_file: str, stdin=None) -> bytes:
    """The file list's bytes (its lines: :func:`smartcrop.inputs.list_lines`, names that are not UTF-8 kept)."""
    try:
        if from_file == "-":
            return (stdin or sys.stdin.buffer).read()
        if is_uri(from_file):
            return read_uri(from_file)
        return Path(from_file).read_bytes()
    except OSError as e:
        raise UsageError(f"{from_file}: cannot read file list ({getattr(e, 'strerror', None) or e})") from None


def plan_rows(inputs: Sequence[str], *, from_file: str | None, output, stdin=None,
              on_error: Callable[[str], None], **plan_kwargs) -> tuple[list[dict], object, str, list[str]]:
    """``(rows, options, output root, input errors)`` of a run: the local engine's :func:`plan_run` for local
    paths (the same checks and inputs), the same checks on a listing for URIs."""
    import io

    from .inputs import list_lines
    from .plan import plan_run

    out = restore_uri(str(output)) if output is not None else None
    listed = _read_list(from_file, stdin) if from_file is not None else None
    names = list(inputs) + (list_lines(listed) if listed else [])
    errors: list[str] = []

    def report(line: str) -> None:
        errors.append(line)
        on_error(line)

    if not (is_uri(out) or any(is_uri(n) for n in names)):
        plan = plan_run(list(inputs), from_file=None if from_file is None else "-", output=output,
                        stdin=io.BytesIO(listed) if listed is not None else None, on_error=report,
                        on_note=on_error, **plan_kwargs)
        if any(it.path is None for it in plan.items):
            raise UsageError("--engine ray reads files, folders and URIs, not an image on stdin")
        rows = [_input_row(str(it.path), Path(it.rel_dir).as_posix() if str(it.rel_dir) != "." else "",
                           it.display, it.stem, it.suffix) for it in plan.items]
        return rows, plan.opts, str(plan.opts.out_dir), plan.input_errors

    return _plan_uris(inputs, names, out, report, errors, **plan_kwargs)


def _plan_uris(inputs, names, out, report, errors, *, recursive=False, ratios=(), size=None, out_format=None,
               preview=None, dry_run=False, as_json=False, overwrite=False, skip_existing=False, **options):
    from .inputs import collect_inputs
    from .naming import InputCollision, check_template
    from .plan import RunOptions, normalize_ratios, parse_format, parse_size, prepare_output_dir

    if overwrite and skip_existing:
        raise UsageError("overwriting and skipping existing outputs exclude each other")
    if not names:
        raise UsageError("no input: give photos, folders or URIs, or a file list")
    sz = parse_size(size)
    opts = RunOptions(ratios=normalize_ratios(ratios, sz), size=sz, out_format=parse_format(out_format),
                      dry_run=dry_run, overwrite=overwrite, skip_existing=skip_existing, **options)
    check_template(opts.template(), opts.ratios, opts.top_k)
    root = out or "cropped"
    rows: list[dict] = []
    for k, n in enumerate(names):
        if is_uri(n):
            rows += list_uri(n, recursive, exclude=root if is_uri(root) else None,
                             on_error=report if k >= len(inputs) else None)
            continue
        if k < len(inputs) and not os.path.lexists(n):
            raise UsageError(f"{n}: no such file or folder")
        for it in collect_inputs([n], recursive, on_error=report,
                                 exclude=None if is_uri(root) else Path(root)):
            rows.append(_input_row(str(it.path), Path(it.rel_dir).as_posix() if str(it.rel_dir) != "." else "",
                                   it.display, it.stem, it.suffix))
    if not rows and not errors:
        raise UsageError("no image files found in the inputs" + ("" if recursive else " (use -r for sub-folders)"))
    if not dry_run and rows:
        if is_uri(root):
            inputs_set = {r["path"] for r in rows}
            namer = _UriNamer(root, opts.template(), overwrite, skip_existing, [], opts.out_format)
            from .naming import names_known, output_ext

            if names_known(opts.template(), opts.size):

                for r in rows:
                    it = _item(r)
                    for ratio in opts.ratios:
                        for rank in range(1, opts.top_k + 1):
                            t = namer._uri(namer._render(it, ratio, rank, output_ext(it, opts.out_format, None),
                                                         opts.size or (0, 0)))
                            if t in inputs_set:
                                raise InputCollision(f"output {t} would replace an input: originals are never "
                                                     "written (choose another -o or --name)")
            try:
                fs, path = _filesystem(root)
                fs.create_dir(path, recursive=True)
            except OSError as e:
                raise UsageError(f"{root}: output folder cannot be created ({one_line(e)})") from None
        else:
            opts.made_dirs = prepare_output_dir(Path(root))
    opts.out_dir = None if is_uri(root) else Path(root)
    return rows, opts, root, errors


def _count_and_print(row: dict, summary, opts, as_json: bool, out) -> None:
    """One crop row of the CLI: counted, and printed as the local engine prints its records."""
    from .runner import CropRecord

    rec = CropRecord(row["input"], row["output"], row["ratio"], row["box"], row["score"], row["size"],
                     row["skipped"], row["lossless"])  # box, score and size None: skipped before decoding
    if rec.skipped:
        summary.skipped += 1
    elif not opts.dry_run:
        summary.written += 1
    rec.print(as_json=as_json, dry_run=opts.dry_run, out=out)


def run_command(engine: str, inputs: Sequence[str], *, address: str | None = None, from_file: str | None = None,
                output=None, preview=None, adapt: bool = False, weights=None, model: str | None = None,
                device: str = "auto", as_json: bool = False, dry_run: bool = False, stdin=None,
                on_error: Callable[[str], None] | None = None, **plan_kwargs) -> int:
    """``smartcrop run --engine ray``: plan like the local engine, crop on Ray, print the same JSON lines
    (in completion order) and stderr lines; returns the exit code (0 all done, 1 some photos failed;
    usage errors raise :class:`UsageError`, exit 2).  Ctrl-C or SIGTERM (as the caller turns it into
    ``KeyboardInterrupt``) stops Ray and raises ``KeyboardInterrupt`` again: finished files are complete, but
    crops written since the last record printed may have none."""
    from .progress import stderr_is_tty
    from .runner import RunSummary

    on_error = on_error or (lambda s: print(f"smartcrop: {s}", file=sys.stderr, flush=True))
    if engine != "ray":
        raise UsageError(f"--engine must be local or ray, not {engine!r}")
    if adapt:
        raise UsageError("--adapt runs on the local engine only: fine-tune first (smartcrop finetune), then "
                         "--engine ray --model NAME")
    if preview is not None:
        raise UsageError("--preview is made by the local engine only (drop --engine ray, or --preview)")
    if "-" in inputs:
        raise UsageError("--engine ray reads files, folders and URIs, not stdin (a list of paths: --from-file -)")
    _import_ray()
    rows, opts, out_root, input_errors = plan_rows(inputs, from_file=from_file, output=output, stdin=stdin,
                                                   on_error=on_error, dry_run=dry_run, as_json=as_json,
                                                   **plan_kwargs)
    if not rows:
        return 1
    mark_collisions(rows, opts)
    blob = load_model_blob(weights, model)
    import tempfile

    log_path = os.path.join(tempfile.gettempdir(), f"smartcrop-ray-{os.getpid()}.log")
    progress = stderr_is_tty()
    summary = RunSummary(images=len(rows))
    crops, failure = 0, None
    started, interrupted = False, False
    with _ray_output_to(log_path) as out:
        try:
            started = connect(address, opts.workers or None)
            import ray

            _quiet_ray_data(progress)
            # a dry run writes nothing under out_root (_finish_photo) but looks there for --skip-existing
            ds = build(ray.data.from_items([_wired(r) for r in rows]), opts, model=blob, out_root=out_root,
                       device=device)
            for row in map(_unwired, ds.iter_rows()):
                if row["error"] is not None:
                    summary.failed += 1
                    on_error(f"{row['input']}: {row['error']}")
                    continue
                if row.get("note"):
                    on_error(f"{row['input']}: {row['note']}")
                for line in row.get("refused") or ():
                    on_error(f"{row['input']}: {line}")
                summary.incomplete += bool(row.get("refused"))
                summary.fewer += bool(row.get("fewer"))
                crops += 1
                _count_and_print(row, summary, opts, as_json, out)
        except KeyboardInterrupt:  # raised again once Ray is stopped: the caller says it (exit 130 or 143)
            interrupted = True
        except SmartcropError:  # e.g. no cluster to join: its one line, and no log of a Ray that never ran
            if not started and os.path.exists(log_path):
                os.unlink(log_path)
            raise
        except Exception as e:  # noqa: BLE001 - a Ray failure that retries did not cure: one line, no traceback
            failure = f"the Ray job failed: {one_line(e)} (Ray's messages: {log_path})"
        finally:
            if started:
                ray.shutdown()
            from .plan import remove_if_empty

            remove_if_empty(opts.made_dirs)  # the output folders the plan made, if nothing was written there
    if failure is None and os.path.exists(log_path):
        os.unlink(log_path)
    if interrupted:
        raise KeyboardInterrupt
    if failure is not None:
        on_error(failure)
        return 1
    summary.boxes = crops  # the records are printed as they come: millions are not kept
    return summary.close(replace(opts, out_dir=out_root) if not opts.dry_run else opts, len(input_errors), on_error)
