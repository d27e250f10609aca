"""Make a folder of 12-megapixel JPEG test photos (4000×3000) from any folder of photos.

Each source photo is upscaled with Lanczos and given a little sensor-like noise so that the JPEGs have a realistic
size (~3-5 MB at quality 92). Nothing from the source folder is modified.

    python benchmarks/make_photos.py ../shared/data/unlabeled /tmp/photos12mp --count 30 [--jobs 8]

The same photos whatever ``--jobs`` is (each photo's noise is drawn from its own seed: its index).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def make(job: tuple[int, Path, Path, int, int]) -> None:
    k, src, dest, w, h = job
    rng = np.random.default_rng(k)
    im = Image.open(src).convert("RGB")
    size = (h, w) if im.width < im.height else (w, h)  # keep a mix: portrait sources become portrait photos
    big = np.asarray(im.resize(size, Image.LANCZOS), dtype=np.int16)
    big = big + rng.normal(0, 3, big.shape).astype(np.int16)
    Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(dest / f"{src.stem}.jpg", quality=92)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--jobs", type=int, default=1, help="processes")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    args.dest.mkdir(parents=True, exist_ok=True)
    srcs = sorted(p for p in args.source.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    jobs = [(k, p, args.dest, w, h) for k, p in enumerate(srcs[: args.count])]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            list(ex.map(make, jobs))
    else:
        for job in jobs:
            make(job)
    made = len(jobs)
    print(f"wrote {made} photos to {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
