"""Cost of the face-aware choice (`run --faces`): face detection time per photo, on one thread, at the size
`run` searches (the model's input size × faces.SEARCH_SCALE), and how many photos have a face found.

    python benchmarks/face_time.py /tmp/photos12mp [--limit 64] [--passes 3]

Photos are prepared as `run` prepares them (decoded at reduced size, resized to the model's input size) before
the clock starts; each pass times `Cropper.find_faces` on every photo and the median pass is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("photos", type=Path)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args(argv)

    import cv2
    import torch

    from smartcrop.cropper import Cropper
    from smartcrop.imageio import IMAGE_EXTENSIONS
    from smartcrop.stages import prepare

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cropper = Cropper(device="cpu", faces=True)
    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = files[: args.limit] if args.limit else files
    prepared = [prepare(str(p), cropper.config.short_side, cropper.config.max_long_side) for p in files]
    passes, found = [], 0
    for _ in range(args.passes):
        t0 = time.perf_counter()
        found = sum(1 for p in prepared if len(cropper.find_faces(p.image, p.full_size)))
        passes.append((time.perf_counter() - t0) / len(prepared))
    print(json.dumps({"photos": len(prepared), "with_a_face": found, "ms_per_photo": round(1000 * statistics.median(passes), 2),
                      "ms_per_photo_all": [round(1000 * t, 2) for t in passes],
                      "input_size_example": list(prepared[0].image.size)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
