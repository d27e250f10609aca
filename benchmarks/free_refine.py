"""Does refining a free crop around the best GAIC anchor raise FCDB's free-ratio IoU, and what do denser
candidate sets give?

For each model and FCDB set, every photo's free crop is chosen (box voting as `smartcrop eval`, ``fuse``) among

* ``gaic``: the 12×12-grid GAIC anchors alone (the choice before the eighth session);
* ``refined``: those plus the best anchor's neighbours (``anchors.refine_anchors``: each edge moved by half a
  grid cell) — what `smartcrop eval fcdb --ratio any` and `run` now do (``evaluate.fcdb_choices``);
* ``grid16`` / ``grid20`` (with ``--grids``): GAIC's rules on finer grids (``gaic_anchors(bins=16 or 20)``: corners
  in the top-left / bottom-right 5 of 16 or 6 of 20 cells), for comparison;
* ``clipped`` (with ``--clipped``): the refinement without the moves that bring an edge closer to the border
  than GAIC's half cell — where the gain comes from,

and the mean IoU with the expert's crop is reported per model and set, with each set's change against
``gaic``, the number of anchors scored a photo and the chosen crops' mean share of the photo (and how many
cover 95 % or more; the same for the experts' crops)::

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--fcdb", action="append", required=True, help="NAME=ROOT:SPLIT")
    ap.add_argument("--grids", action="store_true", help="also the finer grids grid16 and grid20")
    ap.add_argument("--clipped", action="store_true", help="also the refinement kept within the GAIC grid's extent "
                    "(no edge closer to the border than half a cell)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from smartcrop import Cropper
    from smartcrop.anchors import REFINE_STEP, gaic_anchors, refine_anchors
    from smartcrop.cropper import fuse_box
    from smartcrop.evaluate import decoded_items, fcdb_choices
    from smartcrop.metrics import iou

    torch.set_num_threads(1)
    sets = fcdb_sets(args.fcdb)
    grids = {"grid16": 16, "grid20": 20} if args.grids else {}
    extra = (*grids, "clipped") if args.clipped else tuple(grids)
    rows = []
    for m in args.models:
        c = Cropper(m, device="cpu", refine=True)  # fcdb_choices then refines, as `eval fcdb --refine`
        for name, items in sets.items():
            res = {k: [] for k in ("gaic", "refined", *extra)}
            n = {k: [] for k in res}
            area = {k: [] for k in res}  # the chosen box's share of the photo
            expert = []  # the expert box's
            for item, li in decoded_items(c, items, name, False, None):
                w, h = li.full_size
                expert.append((item.box[2] - item.box[0]) * (item.box[3] - item.box[1]) / (w * h))
                cands = [("gaic", gaic_anchors(w, h))] + [(g, gaic_anchors(w, h, bins)) for g, bins in grids.items()]
                for k, boxes in cands:
                    s = c.score_boxes(li.image, (w, h), {"a": boxes})["a"]
                    b = fuse_box(boxes, s, int(np.argmax(s)), c.fuse)
                    res[k].append(iou(b, item.box))
                    area[k].append((b[2] - b[0]) * (b[3] - b[1]) / (w * h))
                    n[k].append(len(boxes))
                    if k != "gaic":
                        continue
                    near = refine_anchors(boxes[int(np.argmax(s))], w, h)  # the refined set: these and near
                    n["refined"].append(len(boxes) + len(near))
                    if args.clipped:
                        lo = np.array([w, h, w, h]) * REFINE_STEP  # half a GAIC cell from the border
                        near = near[np.all((near >= lo - 1e-3) & (near <= np.array([w, h, w, h]) - lo + 1e-3), 1)]
                        sn = c.score_boxes(li.image, (w, h), {"a": near})["a"]
                        bb, ss = np.concatenate([boxes, near]), np.concatenate([s, sn])
                        b = fuse_box(bb, ss, int(np.argmax(ss)), c.fuse)
                        res["clipped"].append(iou(b, item.box))
                        area["clipped"].append((b[2] - b[0]) * (b[3] - b[1]) / (w * h))
                        n["clipped"].append(len(bb))
            # the product path, with the refinement
            for item, box, (w, h) in fcdb_choices(c, items, "any", progress=False):
                res["refined"].append(iou(box, item.box))
                area["refined"].append((box[2] - box[0]) * (box[3] - box[1]) / (w * h))
            row = {"model": str(m), "set": name, "n_images": len(res["gaic"]),
                   **{k: round(float(np.mean(v)), 4) for k, v in res.items()},
                   "anchors": {k: round(float(np.mean(v)), 1) for k, v in n.items() if v},
                   "area": {k: round(float(np.mean(v)), 3) for k, v in area.items()},
                   "area_over_95": {k: round(float(np.mean(np.asarray(v) >= 0.95)), 3) for k, v in area.items()},
                   "expert_area": round(float(np.mean(expert)), 3),
                   "expert_area_over_95": round(float(np.mean(np.asarray(expert) >= 0.95)), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for name in sets:
        for k in ("refined", *extra):
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
