"""Time of one scoring (`Cropper.best_crops_batch`, one ratio) per photo: on one CPU thread, or on a GPU.

    python benchmarks/scoring_time.py /tmp/photos12mp --count 24 --passes 5 --ratio 16:9
    python benchmarks/scoring_time.py /tmp/photos12mp --count 64 --device cuda --batch 32 [--amp]

On a GPU, ``--batch`` photos go into each `best_crops_batch` call (as `smartcrop run --batch` does) and each
pass ends with a device synchronisation; ``--amp`` scores under bfloat16 autocast (`Cropper(amp=True)`).

Prepares the first COUNT JPEGs as `smartcrop run` does (`stages.prepare`), scores each batch once to warm up
(one photo only before the fourth session: the CPU figures did not move, 31 → 31.8 ms), then times PASSES
passes over all of them and prints the per-photo time of each pass and their median.  With
`--keep-freed-memory` the process first applies `pool.keep_freed_memory()`, as `smartcrop run` now does.
With `--parts`, also where the time goes: milliseconds a photo in the backbone pass (``image_features``), in
``score_boxes`` and in each of its parts (wrapped in timers, which add a few microseconds a call)::

    python benchmarks/scoring_time.py /tmp/photos12mp --keep-freed-memory --passes 3 --parts
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", type=Path)
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--ratio", default="16:9")
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--keep-freed-memory", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    ap.add_argument("--batch", type=int, default=1, help="photos per scoring call")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--parts", action="store_true", help="also time the parts of a scoring")
    ap.add_argument("--free-grid", default=None, help="free-ratio candidates with --ratio any (border, gaic; default: "
                    "the library's, Cropper's)")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.keep_freed_memory:
        from smartcrop.pool import keep_freed_memory

        keep_freed_memory()
    from smartcrop.cropper import Cropper
    from smartcrop.stages import prepare

    spent: dict[str, float] = {}
    if args.parts:
        from smartcrop import model

        for name in PARTS:
            setattr(model, name, _timed(spent, name, getattr(model, name)))
    grid = {} if args.free_grid is None else {"free_grid": args.free_grid}
    cropper = Cropper(weights=args.weights, device=args.device, amp=args.amp, **grid)
    if args.parts:
        net = cropper.scorer
        for name in MODULES:
            getattr(net, name).forward = _timed(spent, name, getattr(net, name).forward)
        for name in ("score_boxes", "image_features"):
            setattr(net, name, _timed(spent, name, getattr(net, name)))
    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})[: args.count]
    prepared = [prepare(str(f), cropper.config.short_side, cropper.config.max_long_side) for f in files]
    batches = [[(p.image, p.full_size) for p in prepared[i: i + args.batch]]
               for i in range(0, len(prepared), args.batch)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for b in batches:  # warm-up: every network size once (the GPU's kernels, the CPU's caches)
        cropper.best_crops_batch(b, [args.ratio])
    sync()
    spent.clear()
    per_photo = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        for b in batches:
            cropper.best_crops_batch(b, [args.ratio])
        sync()
        per_photo.append((time.perf_counter() - t0) / len(prepared) * 1e3)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(" ".join(f"{v:.1f}" for v in per_photo), f"ms; median {statistics.median(per_photo):.1f} ms a photo;",
          f"minor page faults {ru.ru_minflt}, kernel {ru.ru_stime:.2f} s")
    if args.parts:
        n = args.passes * len(prepared)
        print(" ".join(f"{k} {v * 1e3 / n:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])),
              "ms a photo")
    return 0


PARTS = ("roi_align", "rod_align", "crop_mask_axes", "conv_crop_masks_pool", "max_pool")  # smartcrop.model's
MODULES = ("region_fc", "saf_fc", "saf_conv2", "score_head")  # the scoring copy's sub-modules


def _timed(spent: dict, name: str, fn):
    """``fn``, adding the seconds of each call to ``spent[name]``."""
    def wrapper(*a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return r
    return wrapper


if __name__ == "__main__":
    sys.exit(main())
