"""``smartcrop run``'s pipeline: decode, score, crop and write every photo of a :class:`~smartcrop.plan.RunPlan`.

The pipeline per photo: decode once at full resolution with EXIF orientation applied (worker threads), score
every requested ratio's anchors in one model pass (main thread), then crop, resize, encode and write
atomically (worker threads).  At most a few photos are in flight, so memory stays flat over any folder.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import SmartcropError, UsageError, one_line
from .imageio import ImageError, crop_image, encode_image, load_image, save_image
from .inputs import InputItem
from .naming import OutputNamer, check_template, output_ext, output_size
from .plan import RunOptions


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
