"""Time of one scoring (`Cropper.best_crops_batch`, one photo, one ratio) on one CPU thread.

    python benchmarks/scoring_time.py /tmp/photos12mp --count 24 --passes 5 --ratio 16:9

Prepares the first COUNT JPEGs as `smartcrop run` does (`stages.prepare`), scores one of them once to warm up,
then times PASSES passes over all of them and prints the per-photo time of each pass and their median.  With
`--keep-freed-memory` the process first applies `pool.keep_freed_memory()`, as `smartcrop run` now does.
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
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    if args.keep_freed_memory:
        from smartcrop.pool import keep_freed_memory

        keep_freed_memory()
    from smartcrop.cropper import Cropper
    from smartcrop.stages import prepare

    cropper = Cropper(weights=args.weights, device="cpu")
    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})[: args.count]
    prepared = [prepare(str(f), cropper.config.short_side, cropper.config.max_long_side) for f in files]
    cropper.best_crops_batch([(prepared[0].image, prepared[0].full_size)], [args.ratio])
    per_photo = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        for p in prepared:
            cropper.best_crops_batch([(p.image, p.full_size)], [args.ratio])
        per_photo.append((time.perf_counter() - t0) / len(prepared) * 1e3)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(" ".join(f"{v:.1f}" for v in per_photo), f"ms; median {statistics.median(per_photo):.1f} ms a photo;",
          f"minor page faults {ru.ru_minflt}, kernel {ru.ru_stime:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
