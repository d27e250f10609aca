"""``smartcrop run``'s local engine: every core busy on the stages of :mod:`smartcrop.stages`.

Worker processes decode each photo at the network's size (:func:`~smartcrop.stages.prepare`) and write its
crops (:func:`~smartcrop.stages.finish`: lossless JPEG crops, or one full decode and re-encode); the main
process holds the model and scores photos in batches across files while the workers go on — or, on a CPU with
many cores (``--scoring``), each worker loads the model and scores its own photos
(:func:`~smartcrop.stages.prepare_and_score`) while the main process only hands out work and names outputs.
Work in flight is bounded (a window of photos and a pixel budget for decodes), so memory stays flat over any
folder; results are reported in input order.  With one worker (``-j 1``) everything runs in the main process.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections import deque
from concurrent.futures import BrokenExecutor, Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import StreamError, UsageError, one_line, out_of_memory
from .imageio import safe_name
from .inputs import InputItem
from .naming import OutputNamer, forget_run, output_ext, source_of
from .plan import RunOptions
from .pool import WorkerPool, import_torch, keep_freed_memory, open_files_note, usable_cores
from .progress import stderr_is_tty
from .stages import (PER_FILE_ERRORS, PRELOAD_ENV, WorkerModel, crop_job, depth_lost, finish, prepare,
                     prepare_and_score, may_crop_losslessly, scoring_failure, warm_lossless)


def write_all(stream, data: bytes) -> None:
    """Write every byte of ``data`` to ``stream`` and flush it: a write that takes only part of it (a pipe whose
    reader stopped, e.g. ``| head -c 10``) is continued, and one that takes nothing is an ``OSError`` — never a
    short image passed on as complete."""
    view = memoryview(data)
    while view:
        n = stream.write(view)
        if not n:
            raise OSError(errno.EPIPE, "the reader took no more")
        view = view[n:]
    stream.flush()


class _NoBar:
    """A progress bar that shows nothing (after the real one has closed)."""

    def advance(self) -> None:
        pass


@dataclass
class CropRecord:
    """One crop of a run.  ``box``, ``score`` and ``size`` are None for a crop skipped before its photo was
    decoded (--skip-existing found every crop of that photo)."""

    input: str
    output: str | None
    ratio: str
    box: list | None
    score: float | None
    size: list | None
    skipped: str | None = None  # "exists": --skip-existing found the output already there
    lossless: bool | None = None  # a DCT-domain JPEG crop (None: nothing written)

    def to_json(self) -> dict:
        out = {"input": self.input, "output": self.output, "ratio": self.ratio, "box": self.box,
               "score": None if self.score is None else round(self.score, 4), "size": self.size}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.lossless is not None:
            out["lossless"] = self.lossless
        return out

    def print(self, *, as_json: bool, dry_run: bool, out=None) -> None:
        """This crop's line on ``out`` (default stdout), as every engine prints it: its JSON with ``--json``,
        tab-separated input, ratio, box and score with ``--dry-run``, nothing otherwise.  A stream that cannot
        take it raises :class:`StreamError` (the run stops: e.g. ``| head -1`` closed the pipe, or a full disk
        behind ``> file``)."""
        out = sys.stdout if out is None else out
        try:
            if as_json:
                print(json.dumps(self.to_json()), file=out, flush=True)
            elif dry_run:
                box = "-" if self.box is None else " ".join(map(str, self.box))
                score = "-" if self.score is None else f"{self.score:.3f}"
                print(f"{safe_name(self.input)}\t{self.ratio}\t{box}\t{score}", file=out, flush=True)
        except OSError as e:
            raise StreamError(e) from None


# --------------------------------------------------------------------------------------------------------------
# the run


_EXISTS = object()  # what a photo found done "prepares" to


def _completed(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def fewer_than_asked(ratios_found: list, opts: RunOptions) -> bool:
    """Whether a photo's crops (their ratios, one per crop) hold fewer than ``--top-k`` for some ratio."""
    return opts.top_k > 1 and any(ratios_found.count(r) < opts.top_k for r in opts.ratios)


@dataclass
class RunSummary:
    images: int = 0
    failed: int = 0
    incomplete: int = 0  # photos written without some of their crops (too small for a ratio, say), each said
    fewer: int = 0  # photos with fewer than --top-k distinct crops for some ratio
    written: int = 0
    skipped: int = 0
    boxes: int = 0  # crops chosen, whether written, skipped or (a dry run) only computed
    records: list = field(default_factory=list)

    def close(self, opts: RunOptions, input_errors: int, say: Callable[[str], None]) -> int:
        """The run's closing lines, said to ``say`` — a note when some photos had fewer than ``--top-k``
        distinct crops for a ratio, and on a terminal the summary (:meth:`describe`) — and its exit code: 1 when
        a photo failed or was written without some of its crops, or an input could not be collected."""
        if self.fewer:
            say(f"note: {self.fewer} photo{'s' if self.fewer > 1 else ''} had fewer than {opts.top_k} distinct "
                "crops for a ratio (a crop overlapping a better one by more than 60 % is not another)")
        if stderr_is_tty():
            say(self.describe(opts, input_errors))
        return 1 if self.failed or self.incomplete or input_errors else 0

    def describe(self, opts: RunOptions, input_errors: int = 0) -> str:
        """The one-line summary shown on a terminal."""
        failed = self.failed + input_errors
        done = self.boxes if opts.dry_run else self.written
        what = ("box computed" if done == 1 else "boxes computed") if opts.dry_run else \
            ("crop written" if done == 1 else "crops written")
        return (f"{self.images} photo{'' if self.images == 1 else 's'}, {done} {what}"
                + (f", {self.skipped} skipped (exist)" if self.skipped else "")
                + (f", {failed} failed" if failed else "")
                + (f", {self.incomplete} incomplete" if self.incomplete else "")
                + ("" if opts.dry_run or opts.out_dir is None else f" → {opts.out_dir}"))


class Runner:
    """Runs a plan's photos through the stages; ``on_record`` gets each crop's record, in input order."""

    def __init__(self, cropper, opts: RunOptions, on_record: Callable[[CropRecord], None] | None = None,
                 on_error: Callable[[str], None] | None = None, progress: bool | None = None,
                 pool: WorkerPool | None = None, worker_model: WorkerModel | None = None):
        """``cropper`` scores in this process; or ``worker_model`` (then ``cropper`` is None): the workers
        score; neither when every photo is done (:attr:`RunPlan.done`)."""
        self.cropper = cropper
        self.worker_model = worker_model
        self.opts = opts
        self.on_record = on_record or (lambda r: None)
        self.on_error = on_error or (lambda s: print(s, file=sys.stderr))
        self.progress = progress
        self.pool = pool
        self.thumbs: list = []

    def run(self, items: Sequence[InputItem], prepared: dict | None = None, done: dict | None = None) -> RunSummary:
        """Crop ``items``.  ``prepared`` maps item indices to futures of :func:`~smartcrop.stages.prepare`
        submitted before the model was loaded (see :func:`crop_photos`); ``done`` (:attr:`RunPlan.done`) the
        items whose every crop exists: reported skipped, never decoded."""
        from .progress import progress_bar

        opts = self.opts
        self._items = items
        if opts.out_dir is None and (len(items) != 1 or len(opts.ratios) * opts.top_k != 1) and not opts.dry_run:
            raise UsageError("writing to stdout needs exactly one input image and one crop (give an output folder)")
        namer = None
        if opts.out_dir is not None and not opts.dry_run:
            namer = OutputNamer.for_run(opts.out_dir, opts, list(items))
        own_pool = self.pool is None
        pool = self.pool or WorkerPool(opts.workers, start_method=_start_method(opts))
        if (note := open_files_note(pool)) is not None:
            self.on_error(note)
        summary = RunSummary()
        wm = self.worker_model
        if wm is not None:
            size = (wm.short_side, wm.max_long_side)
            batch = 1
        elif self.cropper is None:  # every photo is done: nothing is decoded
            size, batch = None, 1
        else:
            size = (self.cropper.config.short_side, self.cropper.config.max_long_side)
            batch = opts.batch or (1 if str(getattr(self.cropper, "device", "cpu")) == "cpu" else 16)
        window = _window(pool.workers, batch)
        early = dict(prepared or {})
        done = done or {}
        queue = iter(range(len(items)))
        preps: deque = deque()  # (index, future of prepare)
        retried: set = set()  # photos whose decode was resubmitted after a worker died
        writes: deque = deque()  # (index, records without output yet, future of finish, the job)

        def fail(i: int, e: BaseException, bar) -> None:
            summary.failed += 1
            self.on_error(f"{items[i].display}: {describe_error(e)}")
            bar.advance()

        def submit_prep(i: int):
            if wm is not None:
                return pool.submit(prepare_and_score, _source(items[i]), wm)
            return pool.submit(prepare, _source(items[i]), *size, opts.choice.faces)

        def fill() -> None:
            while len(preps) + len(writes) < window:
                i = next(queue, None)
                if i is None:
                    return
                preps.append((i, early.pop(i, None) or (_completed(_EXISTS) if i in done else submit_prep(i))))

        def drain(block: bool, bar) -> None:
            while writes and (block or writes[0][2] is None or writes[0][2].done() or len(writes) > window // 2):
                i, recs, fut, job = writes.popleft()
                try:
                    done = fut.result() if fut is not None else []
                except BrokenExecutor as e:  # the worker died: once more in a fresh one, then it is this photo's
                    if job is not None and not job.retried:
                        # its outputs were claimed by this run: a crop written before the death may be replaced
                        job = replace(job, overwrite=True, retried=True)
                        writes.appendleft((i, recs, pool.submit(finish, job), job))
                    else:
                        fail(i, e, bar)
                    continue
                except _PER_FILE as e:
                    fail(i, e, bar)
                    continue
                report(recs, done, bar)

        def report(recs: list, done: list, bar) -> None:
            """The records of one photo whose crops were written (``done``: :func:`finish`'s results)."""
            for rec, w in zip([r for r in recs if r.skipped is None], done):
                rec.box, rec.output, rec.skipped = list(w.box), w.output, w.skipped
                rec.lossless = None if w.skipped else w.lossless
                if w.data is not None:
                    try:
                        write_all(sys.stdout.buffer, w.data)
                    except OSError as e:
                        raise StreamError(e) from None
                    rec.output = "-"
            for rec in recs:
                if rec.skipped:
                    summary.skipped += 1
                elif not opts.dry_run:
                    summary.written += 1
                summary.boxes += 1
                summary.records.append(rec)
                self.on_record(rec)
            bar.advance()

        def report_finished() -> None:
            """Interrupted: the writes not started are cancelled and the running ones end (the pool waits for
            them), so each of those photos' crops is on disk: report them too, or --json would miss files."""
            for _i, _recs, fut, _job in writes:
                if fut is not None:
                    fut.cancel()
            for _i, recs, fut, _job in writes:
                if fut is not None and not fut.cancelled():
                    try:
                        done = fut.result()
                    except Exception:  # noqa: BLE001 - a failed or dead write: nothing on disk to report
                        continue
                    report(recs, done, _NoBar())

        try:
            with progress_bar(len(items), "cropping", self.progress) as bar:
                fill()
                while preps:
                    todo = []
                    while preps and len(todo) < batch and (not todo or preps[0][1].done()):
                        i, fut = preps.popleft()
                        try:
                            got = fut.result()
                            if got is _EXISTS:
                                summary.images += 1
                                writes.append((i, [CropRecord(items[i].display, str(path), ratio, None, None, None,
                                                              "exists") for ratio, path in done[i]], None, None))
                                continue
                            todo.append((i, got))
                        except BrokenExecutor as e:  # the worker died: once more in a fresh one
                            if i not in retried:
                                retried.add(i)
                                preps.appendleft((i, submit_prep(i)))
                            else:
                                summary.images += 1
                                fail(i, e, bar)
                        except _PER_FILE as e:
                            summary.images += 1
                            fail(i, e, bar)
                    if todo:
                        scored = ([(i, p, crops) for i, (p, crops) in todo] if wm is not None else
                                  [(i, p, crops) for (i, p), crops in zip(todo, self._score(todo, bar, summary))])
                        for i, p, crops in scored:
                            summary.images += 1
                            if crops is None:
                                continue
                            try:
                                writes.append(self._submit_finish(pool, namer, items[i], i, p, crops, summary))
                            except UsageError:
                                raise  # e.g. an output that would replace an input: the whole run stops
                            except _PER_FILE as e:
                                fail(i, e, bar)
                    drain(False, bar)
                    fill()
                drain(True, bar)
        except KeyboardInterrupt:
            report_finished()
            raise
        finally:
            forget_run(opts.run_id)
            if own_pool:
                pool.close()
        self._write_preview(summary)
        return summary

    # -- scoring -----------------------------------------------------------------------------------------------

    def _score(self, batch: list, bar, summary: RunSummary) -> list:
        """Crops of every photo of the batch (None for a photo whose scoring failed, already reported)."""
        opts = self.opts
        try:
            return self.cropper.best_crops_batch([(p.image, p.full_size) for _, p in batch], opts.ratios, opts.top_k,
                                                 faces=[p.faces for _, p in batch] if opts.choice.faces else None)
        except (RuntimeError, MemoryError) as e:  # e.g. an allocation failure: retry alone, fail alone
            if len(batch) == 1:
                summary.failed += 1
                i = batch[0][0]
                self.on_error(f"{self._items[i].display}: {scoring_failure(e)}")
                bar.advance()
                return [None]
            return [self._score([b], bar, summary)[0] for b in batch]

    # -- writing -----------------------------------------------------------------------------------------------

    def _submit_finish(self, pool, namer, item: InputItem, index: int, p, crops, summary: RunSummary) -> tuple:
        """Records of the photo's crops and the future that writes them (None when nothing is to be written); a
        crop that cannot be written as asked is said in one line and counted in ``summary.incomplete``."""
        opts = self.opts
        if opts.preview is not None:
            from .preview import thumbnail_with_boxes

            self.thumbs.append(thumbnail_with_boxes(p.image, p.full_size, crops, Path(item.display).name))
        claim = None if namer is None else (lambda *a: namer.claim(item, *a))
        refused: list[str] = []
        ext = output_ext(item, opts.out_format, p.format, p.has_alpha)
        decisions, job = crop_job(item.display, _source(item), [(c.ratio, c.box, c.score) for c in crops],
                                  ext, opts, claim, on_refused=refused.append, mark=source_of(item),
                                  full_size=p.full_size)
        for line in refused:
            self.on_error(f"{item.display}: {line}")
        summary.incomplete += bool(refused)
        summary.fewer += fewer_than_asked([c.ratio for c in crops], opts)
        recs = [CropRecord(item.display, d.output if d.skipped else None, d.ratio, list(d.box), d.score,
                           list(d.size), d.skipped) for d in decisions]
        bits = depth_lost(p.reduced_depth, p.gray_depth, ext)
        if bits and job is not None:
            from .imageio import depth_note

            self.on_error(f"{item.display}: {depth_note(bits)}")
        return index, recs, None if job is None else pool.submit(finish, job), job

    def _write_preview(self, summary: RunSummary) -> None:
        opts = self.opts
        if opts.preview is None:
            return
        if not self.thumbs:
            self.on_error(f"{safe_name(opts.preview)}: note: no photo was cropped, so no preview was written")
            return
        from .imageio import save_image
        from .preview import contact_sheet

        try:
            opts.preview.parent.mkdir(parents=True, exist_ok=True)
            save_image(contact_sheet(self.thumbs), opts.preview, overwrite=opts.overwrite)
        except _PER_FILE as e:
            summary.failed += 1
            why = e.strerror if isinstance(e, OSError) and e.strerror else describe_error(e)
            self.on_error(f"{safe_name(opts.preview)}: cannot write the preview: {why}")


def crop_photos(plan, *, weights=None, model: str | None = None, device: str = "auto", adapt_epochs: int = 0,
                on_record: Callable[[CropRecord], None] | None = None, on_error: Callable[[str], None] | None = None,
                progress: bool | None = None, own_process: bool = False) -> RunSummary:
    """Run a :class:`~smartcrop.plan.RunPlan` end to end.

    The worker processes start first and begin decoding while torch is imported and the model loaded, so a
    short run does not pay for start-up twice.  ``adapt_epochs > 0`` first fine-tunes a copy of the model on
    the plan's photos (``--adapt``).  ``own_process``: the caller owns this process and leaves it after the run
    (the command line), so the objects made by importing torch are frozen out of the garbage collector's view
    (:func:`~smartcrop.pool.import_torch`).

    Interrupted (KeyboardInterrupt, which the command line also raises for SIGTERM), or after a worker died, it
    removes, once its workers are stopped, the temporary files that dead processes left in the output folder
    (:func:`_tidied`).
    """
    from .weights import input_size, resolve_model

    opts = plan.opts
    path = resolve_model(weights, model)
    size = input_size(path)
    if plan.items and len(plan.done) == len(plan.items):  # nothing to decode: no model (nor --adapt)
        return Runner(None, opts, on_record=on_record, on_error=on_error, progress=progress,
                      pool=WorkerPool(1)).run(plan.items, done=plan.done)
    if scoring_in_workers(opts.scoring, device, max(1, opts.workers or usable_cores()), adapt=bool(adapt_epochs),
                          known_size=size):
        # every worker scores; on Linux they are forked from a server that imported torch and loaded the model
        # once (smartcrop.preload), so they share it instead of each holding a copy
        with _preload_model(path), _tidied(WorkerPool(opts.workers, **_SCORING_POOL), opts) as pool:
            wm = WorkerModel(str(path), tuple(opts.ratios), opts.top_k, *size, choice=opts.choice)
            runner = Runner(None, opts, on_record=on_record, on_error=on_error, progress=progress, pool=pool,
                            worker_model=wm)
            return runner.run(plan.items, done=plan.done)
    with _tidied(WorkerPool(opts.workers, start_method=_start_method(opts),
                            warm=warm_lossless if may_crop_losslessly(opts) else None), opts) as pool:
        early = {}
        if size is not None and not adapt_epochs:
            n = min(len(plan.items), max(_window(pool.workers, opts.batch or 1),
                                         min(EARLY_MAX, EARLY_PER_WORKER * pool.workers)))
            early = {i: pool.submit(prepare, _source(plan.items[i]), *size, opts.choice.faces) for i in range(n)
                     if i not in plan.done}
        import_torch(freeze=own_process)
        from .cropper import Cropper, resolve_device

        device = resolve_device(device)
        threads = scoring_threads(device, pool.workers)
        if threads:  # before the model is loaded, whose float16 → float32 conversion alone took 48-100 ms with
            import torch  # two threads, 10 ms with one

            torch.set_num_threads(threads)
        # like the workers, the scoring process reuses freed memory; without it, whether each photo's activations
        # are mapped afresh and faulted in depends on glibc's moving threshold (one version of the heads measured
        # 554,000 page faults and 0.9 s of kernel time in 120 scorings, 32 instead of 38 ms a photo with it)
        keep_freed_memory()
        cropper = Cropper(weights=path, device=device)
        cropper.choice = opts.choice
        if (cropper.config.short_side, cropper.config.max_long_side) != size:
            early = {}  # decoded for another input size
        if adapt_epochs:
            from .finetune import adapt_cropper

            cropper = adapt_cropper(cropper, [it.path for it in plan.items if it.path is not None], adapt_epochs,
                                    log=on_error or print)
        runner = Runner(cropper, opts, on_record=on_record, on_error=on_error, progress=progress, pool=pool)
        return runner.run(plan.items, early, plan.done)


@contextmanager
def _tidied(pool: WorkerPool, opts) -> Iterator[WorkerPool]:
    """``pool``, entered.  Once it is closed, if the run was interrupted (a worker that the same signal reached —
    timeout, docker stop signal a whole process group — ends mid-write) or a worker died (its fellow workers are
    stopped with it, one maybe mid-write), the temporary files dead processes left in the output folder are
    removed; and the output folders the plan created are removed again if nothing was written into them (every
    photo failed)."""
    interrupted = False
    try:
        with pool:
            yield pool
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if (interrupted or pool.restarts) and opts.out_dir is not None and not opts.dry_run:
            from .imageio import remove_stale_temps

            remove_stale_temps(opts.out_dir)
        from .plan import remove_if_empty

        remove_if_empty(opts.made_dirs)


# smartcrop.preload imports torch and the worker code and loads the model, once, in the fork server
_SCORING_POOL = ({"start_method": "forkserver", "preload": ("smartcrop.preload",)}
                 if sys.platform.startswith("linux") else {})


@contextmanager
def _preload_model(path) -> Iterator[None]:
    """Names the model for :mod:`smartcrop.preload` while the scoring pool starts its fork server (which reads
    its environment then; a server already running from an earlier run in this process keeps what it loaded,
    and its workers load another model themselves)."""
    old = os.environ.get(PRELOAD_ENV)
    os.environ[PRELOAD_ENV] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PRELOAD_ENV, None)
        else:
            os.environ[PRELOAD_ENV] = old


#: Photos the workers decode (at the network's size) while the main process imports torch and loads the model:
#: this many per worker, at most EARLY_MAX in all.  On 2 cores a worker core is otherwise idle for most of the
#: ~0.8 s start-up, time to decode ~70 12-MP JPEGs at 1/8 scale; each decoded photo held is ~0.3 MB.
EARLY_PER_WORKER = 32
EARLY_MAX = 256

#: ``--scoring auto`` scores in the workers on a CPU with at least this many worker processes
WORKER_SCORING_MIN_WORKERS = 8


def scoring_in_workers(scoring: str, device: str, workers: int, *, adapt: bool = False,
                       known_size: tuple | None = (0, 0)) -> bool:
    """Whether the workers score (each with its own model copy) instead of the main process.

    ``scoring``: ``main``, ``workers`` or ``auto`` — the workers when the run is on a CPU (``--device cpu``, or
    ``auto`` on a machine without a GPU) with at least :data:`WORKER_SCORING_MIN_WORKERS` workers: there one
    scoring process (~30 ms a photo) would cap the run while the workers wait.  Decided before torch is
    imported (``auto`` looks for GPU device files), so the main process need not import it at all.
    ``--scoring workers`` refuses a GPU device, ``--adapt`` (the adapted model lives in the main process) and
    ``-j 1`` is allowed (everything then runs in this process)."""
    if scoring not in ("auto", "main", "workers"):
        raise UsageError(f"--scoring must be auto, main or workers, not {scoring!r}")
    device = (device or "auto").lower()
    if scoring == "workers":
        if device not in ("auto", "cpu"):
            raise UsageError("--scoring workers runs the model on the CPU: it cannot be combined with "
                             f"--device {device}")
        if adapt:
            raise UsageError("--scoring workers cannot be combined with --adapt (the adapted model stays in the "
                             "main process): use --scoring main")
        if known_size is None:
            raise UsageError("--scoring workers needs a model file whose input size can be read")
        return True
    if scoring == "main" or adapt or known_size is None or workers < WORKER_SCORING_MIN_WORKERS:
        return False
    return device == "cpu" or (device == "auto" and not _accelerator_present())


def scoring_threads(device: str, workers: int, cores: int | None = None) -> int | None:
    """torch threads for the main process of a run with ``workers`` worker processes (None: torch's default).

    The workers keep every core busy, and torch's own threads would only fight them (measured on 2 cores: 16
    photos in 2.9 s with one scoring thread, 12.5 s with two): on a CPU the main process scores with a third of
    the cores; on a GPU, which does the arithmetic, with one thread.  (An H200 run of 512 photos, its main
    process at torch's default of 16 threads beside 16 workers, used 0.23 CPU-seconds a photo where the CPU path,
    scoring included, used 0.18, and took 11.9 s against the CPU path's 7.6 s: docs/performance.md.)
    ``OMP_NUM_THREADS`` in the environment wins."""
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    if device == "cpu":
        return max(1, (cores or usable_cores()) // 3)
    return 1


def _accelerator_present() -> bool:
    """A GPU torch might use (NVIDIA, AMD ROCm, WSL, Apple): then ``--device auto`` scores in the main process,
    which resolves the device with torch."""
    if sys.platform == "darwin":
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def _window(workers: int, batch: int) -> int:
    """Photos in flight (being decoded, waiting to be scored, being written): enough to keep every worker busy
    while a batch is scored, few enough to keep memory flat."""
    return max(8, 2 * workers + batch)


def _source(item: InputItem):
    return item.data if item.path is None else str(item.path)


# a worker process that died (e.g. killed for memory) fails the photos it held; the pool starts afresh
_PER_FILE = PER_FILE_ERRORS + (BrokenExecutor,)


def _start_method(opts) -> str | None:
    """How the decoding workers start: from a fork server when they will search faces and this process has
    searched some with OpenCV's threads (a worker forked from it deadlocks in its first OpenCV call); None: the
    pool's default (``fork`` on Linux)."""
    faces = sys.modules.get("smartcrop.faces")
    if opts.choice.faces and faces is not None and faces.fork_unsafe() and sys.platform.startswith("linux"):
        return "forkserver"
    return None


def describe_error(e: BaseException) -> str:
    """One line for a photo's failure (shown after its name)."""
    if out_of_memory(e):
        return "out of memory while processing this photo"
    if isinstance(e, BrokenExecutor):
        return "the worker process handling this photo died (killed for memory?)"
    if isinstance(e, OSError) and e.strerror:  # "No such file or directory: out/a.jpg", not "[Errno 2] …"
        return one_line(f"{e.strerror}: {safe_name(e.filename)}" if e.filename else e.strerror)
    return one_line(str(e) or type(e).__name__)
