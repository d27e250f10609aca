"""Worker processes for the CPU stages of a run, and the pixel budget that keeps their memory bounded.

:class:`WorkerPool` is a process pool (``fork`` on Linux, so workers start in milliseconds; ``spawn``
elsewhere) whose workers ignore SIGINT — the main process decides how a run stops — and exit when that process
is gone (killed outright), or, with one worker, a stand-in that runs each task at once in the calling process.
Create it before torch is imported so the workers never carry torch's threads.

The pixel budget is shared by all workers: a decode of ``n`` pixels waits while other decodes hold more than
``budget − n`` pixels (a decode larger than the whole budget runs alone), so a folder of huge images is
decoded one at a time instead of all at once.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

#: Pixels all workers may hold decoded at once (3 bytes each in RGB, plus a copy or two while converting).
DEFAULT_PIXEL_BUDGET = 120_000_000

_budget = None  # (Condition, Value) in a worker; None: no budget (in-process runs)


def usable_cores() -> int:
    """Cores this process may run on (respects ``taskset`` and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: Open files a run of worker processes holds besides them, and per worker (its pipes and process handle; a
#: forked worker starts with the parent's files): `run -j 2` worked at `ulimit -n` 20, `-j 4` at 23, `-j 8` at 36
#: (2-core VM, 2026-11-28), and with less the pool failed to start — a traceback, then a hang.
FILES_BASE, FILES_PER_WORKER = 32, 4


def workers_for_open_files(workers: int) -> int:
    """``workers``, or as many as this process's open-files limit (``RLIMIT_NOFILE``) can hold, at least 1 (no
    worker process).  A soft limit too low is first raised as far as the hard limit allows."""
    try:
        import resource
    except ImportError:  # not POSIX
        return workers
    need = FILES_BASE + FILES_PER_WORKER * workers
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return workers
    return max(1, (soft - FILES_BASE) // FILES_PER_WORKER)


def open_files_note(pool: "WorkerPool") -> str | None:
    """The note for a pool given fewer workers than asked by :func:`workers_for_open_files`, else None."""
    if pool.workers == pool.asked:
        return None
    return (f"note: -j {pool.workers} instead of {pool.asked}: the open-files limit (ulimit -n) holds no more; "
            f"raise it to {FILES_BASE + FILES_PER_WORKER * pool.asked} for -j {pool.asked}")


#: Pools of more workers than this do not keep freed memory for the next photo (:func:`keep_freed_memory`): the
#: memory budget of 1.5 GB for a whole run.  Measured on 64 × 12 MP, scoring in the workers (docs/performance.md):
#: 8 workers keeping it peak at 1.06 / 1.28 GB PSS (lossless / re-encoded), 16 at 1.76 / 2.13 GB; 16 not
#: keeping it at 1.27 / 1.37 GB.
KEEP_FREED_MAX_WORKERS = 8


#: seconds between a worker's checks that the process that started it is still there
PARENT_CHECK_S = 0.5


def _exit_with_parent(parent: int) -> None:
    """A worker's watch: once the process that started it is gone (SIGKILLed, killed for memory), exit — else
    the orphan would wait forever on its task queue, holding the run's stdout and stderr open (a pipeline
    reading them would hang).  A file it was writing stays a temporary file, removed by the next run."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(budget, warm=None, keep: bool = True) -> None:
    global _budget
    # the main process decides how a run stops: Ctrl-C (SIGINT to the whole process group) is ignored here and
    # the main process finishes or cancels the tasks.  SIGTERM keeps its default, so that the pool can still
    # stop a worker, and a worker reached by one (timeout, docker stop, systemd signal the whole group) ends
    # quietly — not with the main process's handler, which printed a traceback per worker.  A file it was
    # writing stays a temporary file, which the main process removes (runner.crop_photos).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                     name="smartcrop-parent-watch").start()
    _budget = budget
    if keep:
        keep_freed_memory()
    if warm is not None:
        try:
            warm()
        except Exception:  # noqa: BLE001 - only a head start: the task that needs it will report any failure
            pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Let glibc reuse the memory of one photo for the next instead of unmapping and mapping it again.

    By default glibc serves every allocation above its mmap threshold (128 KiB at first, then moving with what
    was freed, at most 32 MiB) with a fresh mapping and unmaps it when freed, so each 12 MP photo's coefficient
    arrays (lossless crop) or pixels (re-encode) are faulted in page by page again: ~9,000 page faults, measured at 23 ms of kernel time in a 47 ms
    lossless crop (23.5 ms with this setting).  Allocations up to ``mmap_threshold`` now come from the heap,
    which is given back only when more than ``trim_threshold`` of it is free (and after huge decodes, see
    :func:`pixel_budget`).  Not done when the user tuned malloc through its environment variables, nor on
    other C libraries; returns whether it was applied."""
    libc = _glibc()
    if libc is None or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def import_torch(freeze: bool = False):
    """``import torch`` with Python's cyclic garbage collector paused for the import, and with ``freeze`` every
    object made so far then moved out of the collector's view (:func:`gc.freeze`).

    The import makes ~165,000 objects and, with the collector on, paid for three full collections on the way
    (19 + 42 + 78 ms, measured on 2 cores, freeing nothing) — 0.14 s of a one-photo run.  Pausing alone only
    defers that work to the next collections; freezing is what saves it, and is for a caller that owns the
    process and keeps those objects until it exits (``smartcrop run`` from the command line): objects frozen
    are never freed by the cycle collector, which a long-lived application importing smartcrop would not want.
    Idempotent; nothing changes when torch is already imported."""
    import gc
    import sys

    if "torch" in sys.modules:
        return sys.modules["torch"]
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()
    return torch


def _glibc():
    """glibc through ctypes, or None on another C library."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist in glibc only
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def pixel_budget(pixels: int):
    """Hold ``pixels`` of the shared budget while decoding (no-op outside a pool)."""
    if _budget is None or pixels <= 0:
        yield
        return
    cond, used, limit = _budget
    with cond:
        while used.value > 0 and used.value + pixels > limit:
            cond.wait()
        used.value += pixels
    try:
        yield
    finally:
        if pixels >= _TRIM_ABOVE:
            _release_free_memory()
        with cond:
            used.value -= pixels
            cond.notify_all()


_TRIM_ABOVE = 20_000_000  # pixels: after a decode this large, hand the freed memory back to the system


def _release_free_memory() -> None:
    """glibc keeps freed heap memory mapped (its mmap threshold grows after large frees), so a worker that
    decoded one huge image would keep its peak for the rest of the run: ``malloc_trim`` returns it."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class WorkerPool:
    def __init__(self, workers: int | None = None, pixel_budget: int = DEFAULT_PIXEL_BUDGET,
                 start_method: str | None = None, preload: tuple = (), warm=None):
        """``start_method``: multiprocessing's (default ``fork`` on Linux, else ``spawn``); a pool made after
        torch started its threads (training) asks for ``forkserver``, so no worker is forked from them; so does a
        run whose workers search faces in a process that searched some with OpenCV's threads
        (:func:`smartcrop.faces.fork_unsafe`).
        ``preload``: with ``forkserver``, modules the server imports once before forking every worker, so the
        workers share their memory (copy-on-write) instead of each importing them.  ``warm``: a picklable
        function each worker process calls when it starts, before its first task (e.g. loading a library it
        will need, while the caller is busy starting up)."""
        self.asked = max(1, workers or usable_cores())
        self.workers = workers_for_open_files(self.asked)  # fewer when the open-files limit cannot hold them
        self._warm = warm
        self._executor = None
        self.restarts = 0  # pools started afresh because a worker died (its fellow workers are stopped with it)
        if self.workers > 1:
            self._ctx = multiprocessing.get_context(start_method or ("fork" if sys.platform.startswith("linux")
                                                                     else "spawn"))
            if preload and self._ctx.get_start_method() == "forkserver":
                self._ctx.set_forkserver_preload(list(preload))
            self._budget = (self._ctx.Condition(), self._ctx.Value("q", 0, lock=False), pixel_budget)
            self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._ctx, initializer=_init_worker,
                                   initargs=(self._budget, self._warm, self.workers <= KEEP_FREED_MAX_WORKERS))

    def submit(self, fn, *args) -> Future:
        if self._executor is None:
            fut: Future = Future()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - delivered through the future, like a process pool
                if isinstance(e, KeyboardInterrupt):
                    raise
                fut.set_exception(e)
            return fut
        try:
            return self._executor.submit(fn, *args)
        except BrokenProcessPool:
            self._restart()
            return self._executor.submit(fn, *args)

    def _restart(self) -> None:
        """A worker died (e.g. killed for memory): the tasks it held fail; start a fresh pool for the rest, with
        a fresh pixel budget — a worker killed while decoding never gave its share back, and the retry of its
        photo would wait for it for ever."""
        old = self._executor
        self._budget = (self._ctx.Condition(), self._ctx.Value("q", 0, lock=False), self._budget[2])
        self._executor = self._new_executor()
        self.restarts += 1
        old.shutdown(wait=False, cancel_futures=True)

    def close(self, cancel: bool = False) -> None:
        """Wait for the running tasks (so every file being written is finished) and stop the workers.  The pool
        lets go of its shared objects too: a fork-server pool's semaphores are named, and one still held when the
        CLI leaves with ``os._exit`` (e.g. by an interrupt's traceback) is reported leaked by multiprocessing."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None
            self._budget = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)
