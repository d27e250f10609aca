"""Does the model pick FCDB crops that are systematically too large or too small?

On every 5th FCDB *training* photo: the top-1 IoU among the free GAIC anchors, the oracle (best anchor) IoU,
the mean area of the chosen vs the expert crop, and the top-1 IoU after adding beta * log(area) to the scores.

    python benchmarks/fcdb_area_bias.py ../shared/data/fcdb [--weights FILE]
"""

from __future__ import annotations

import sys

import numpy as np

from smartcrop.anchors import box_iou_matrix, gaic_anchors
from smartcrop.cropper import Cropper
from smartcrop.data import read_fcdb
from smartcrop.imageio import load_image


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = argv[0] if argv else "../shared/data/fcdb"
    weights = argv[argv.index("--weights") + 1] if "--weights" in argv else None
    c = Cropper(weights=weights, device="cpu")
    res = []
    for it in read_fcdb(root, "train")[::5]:
        li = load_image(it.image_path, target_short_side=c.config.short_side)
        w, h = li.full_size
        b = gaic_anchors(w, h)
        s = c.score_boxes(li.image, (w, h), {"a": b})["a"]
        iou = box_iou_matrix(b, np.array([it.box], np.float32))[:, 0]
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
        x1, y1, x2, y2 = it.box
        res.append((s, iou, area, (x2 - x1) * (y2 - y1) / (w * h)))
    print(f"photos {len(res)}: top-1 IoU {np.mean([r[1][np.argmax(r[0])] for r in res]):.3f}, "
          f"oracle {np.mean([r[1].max() for r in res]):.3f}")
    print(f"mean area: chosen {np.mean([r[2][np.argmax(r[0])] for r in res]):.3f}, "
          f"expert {np.mean([r[3] for r in res]):.3f}")
    for beta in (-0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5):
        print(f"beta {beta:+.2f}: top-1 IoU {np.mean([r[1][np.argmax(r[0] + beta * np.log(r[2]))] for r in res]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
