"""Does refining a free crop around the best GAIC anchor raise FCDB's free-ratio IoU, and what do denser
candidate sets give?

For each model and FCDB set, every photo's free crop is chosen (box voting as `smartcrop eval`, ``fuse``) among

* ``gaic``: the 12×12-grid GAIC anchors alone (the choice before the eighth session);
* ``refined``: those plus the best anchor's neighbours (``anchors.refine_anchors``: each edge moved by half a
  grid cell) — what `smartcrop eval fcdb --ratio any` and `run` now do (``evaluate.fcdb_choices``);
* ``grid16`` / ``grid20`` (with ``--grids``): GAIC's rules on finer grids (corners in the top-left / bottom-right
  5 of 16 or 6 of 20 cells), for comparison,

and the mean IoU with the expert's crop is reported per model and set, with each set's change against
``gaic`` and the number of anchors scored a photo::

    python benchmarks/free_refine.py --fcdb heldout=runs/validate/data/fcdb_heldout:test \\
        --fcdb dev=../shared/data/fcdb:test --grids --out docs/validation/inference/free_refine.json \\
        runs/validate/runs/fcdbhalf/fold*_seed1/model.safetensors

A set is NAME=ROOT:SPLIT (an FCDB layout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from box_fusion import fcdb_sets  # benchmarks/ is on the path when run as a script


def grid_anchors(width: int, height: int, bins: int, corner: int) -> np.ndarray:
    """GAIC's rules on a ``bins`` × ``bins`` grid with corners in the ``corner`` × ``corner`` corner cells."""
    sw, sh = width / bins, height / bins
    out = []
    for r1 in range(corner):
        for c1 in range(corner):
            for r2 in range(bins - corner, bins):
                for c2 in range(bins - corner, bins):
                    if (r2 - r1) * (c2 - c1) <= 0.4999 * bins * bins:
                        continue
                    if not 0.5 < (c2 - c1) * sw / ((r2 - r1) * sh) < 2.0:
                        continue
                    out.append((sw * (c1 + 0.5), sh * (r1 + 0.5), sw * (c2 + 0.5), sh * (r2 + 0.5)))
    return np.asarray(out, dtype=np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--fcdb", action="append", required=True, help="NAME=ROOT:SPLIT")
    ap.add_argument("--grids", action="store_true", help="also the finer grids grid16 and grid20")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from smartcrop import Cropper
    from smartcrop.anchors import gaic_anchors, refine_anchors
    from smartcrop.cropper import fuse_box
    from smartcrop.evaluate import _decoded, fcdb_choices
    from smartcrop.metrics import iou

    torch.set_num_threads(1)
    sets = fcdb_sets(args.fcdb)
    grids = {"grid16": (16, 5), "grid20": (20, 6)} if args.grids else {}
    rows = []
    for m in args.models:
        c = Cropper(m, device="cpu")
        for name, items in sets.items():
            res = {k: [] for k in ("gaic", "refined", *grids)}
            n = {k: [] for k in res}
            for item, li in _decoded(c, items, name, False, None):
                w, h = li.full_size
                cands = [("gaic", gaic_anchors(w, h))] + [(g, grid_anchors(w, h, *a)) for g, a in grids.items()]
                for k, boxes in cands:
                    s = c.score_boxes(li.image, (w, h), {"a": boxes})["a"]
                    res[k].append(iou(fuse_box(boxes, s, int(np.argmax(s)), c.fuse), item.box))
                    n[k].append(len(boxes))
                    if k == "gaic":  # the refined set: these and the best one's neighbours
                        n["refined"].append(len(boxes) + len(refine_anchors(boxes[int(np.argmax(s))], w, h)))
            # the product path, with the refinement
            for item, box, _ in fcdb_choices(c, items, "any", progress=False):
                res["refined"].append(iou(box, item.box))
            row = {"model": str(m), "set": name, "n_images": len(res["gaic"]),
                   **{k: round(float(np.mean(v)), 4) for k, v in res.items()},
                   "anchors": {k: round(float(np.mean(v)), 1) for k, v in n.items() if v}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for name in sets:
        for k in ("refined", *grids):
            d = [r[k] - r["gaic"] for r in rows if r["set"] == name]
            summary[f"{name}:{k}"] = {"mean": round(statistics.mean(d), 4),
                                     "sd": round(statistics.stdev(d), 4) if len(d) > 1 else None,
                                     "better": sum(x > 0 for x in d), "of": len(d)}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
