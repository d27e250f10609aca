"""Where one scoring's time goes: milliseconds a photo in the backbone pass (``image_features``), in
``score_boxes`` and in each of its parts, on one CPU thread, as ``smartcrop run`` scores (folded model, freed
memory kept, 16:9 anchors): the first COUNT JPEGs of PHOTOS prepared, scored once to warm up, then 3 passes.

    python benchmarks/scoring_parts.py /tmp/photos12mp --weights weights/sacnet_mobilenetv2.safetensors

(The parts are wrapped in timers, which add a few microseconds a call.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PARTS = ("roi_align", "rod_align", "crop_mask_axes", "conv_crop_masks_pool", "max_pool")  # smartcrop.model's
MODULES = ("region_fc", "saf_fc", "saf_conv2", "score_head")  # the scoring copy's sub-modules


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", type=Path)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--ratio", default="16:9")
    args = ap.parse_args(argv)

    import torch

    from smartcrop import model as M
    from smartcrop.cropper import Cropper
    from smartcrop.pool import keep_freed_memory
    from smartcrop.stages import prepare

    keep_freed_memory()
    torch.set_num_threads(1)
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            return r
        return wrapper

    for name in PARTS:
        setattr(M, name, timed(name, getattr(M, name)))
    cropper = Cropper(weights=args.weights, device="cpu")
    net = cropper.scorer
    for name in MODULES:
        mod = getattr(net, name)
        mod.forward = timed(name, mod.forward)
    net.score_boxes = timed("score_boxes", net.score_boxes)
    net.image_features = timed("image_features", net.image_features)
    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})[: args.count]
    prepared = [prepare(str(f), cropper.config.short_side, cropper.config.max_long_side) for f in files]
    for p in prepared:
        cropper.best_crops_batch([(p.image, p.full_size)], [args.ratio])
    spent.clear()
    passes = 3
    for _ in range(passes):
        for p in prepared:
            cropper.best_crops_batch([(p.image, p.full_size)], [args.ratio])
    n = passes * len(prepared)
    print(" ".join(f"{k} {v * 1e3 / n:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])),
          "ms a photo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
