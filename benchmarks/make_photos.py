"""Make a folder of 12-megapixel JPEG test photos (4000×3000) from any folder of photos.

Each source photo is upscaled with Lanczos and given a little sensor-like noise so that the JPEGs have a realistic
size (~3-5 MB at quality 92). Nothing from the source folder is modified.

    python benchmarks/make_photos.py ../shared/data/unlabeled /tmp/photos12mp --count 30
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--size", default="4000x3000")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    args.dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    srcs = sorted(p for p in args.source.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    made = 0
    for p in srcs:
        if made >= args.count:
            break
        im = Image.open(p).convert("RGB")
        if im.width < im.height:  # keep a mix: portrait sources become portrait photos
            size = (h, w)
        else:
            size = (w, h)
        big = np.asarray(im.resize(size, Image.LANCZOS), dtype=np.int16)
        big = big + rng.normal(0, 3, big.shape).astype(np.int16)
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(args.dest / f"{p.stem}.jpg", quality=92)
        made += 1
    print(f"wrote {made} photos to {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
