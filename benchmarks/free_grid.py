"""Which free-ratio candidate set gives crops closest to FCDB's expert crops?

For each model and FCDB set, every photo's free crop is chosen (the best anchor fused with its next best
overlapping two, as ``run``; and the best anchor alone) among

* ``gaic``: GAIC's 12×12-grid anchors, corners at the cells' centres (the paper's) — no edge nearer the border
  than half a cell;
* ``border``: :func:`~smartcrop.anchors.border_anchors`, corners on the grid's lines so that an edge can lie on
  the photo's border, none over 90 % of the photo;
* ``border_all``: the same without the 90 % cap (up to the whole frame);
* ``union``: ``gaic`` and ``border`` together;
* ``border_refined``: ``border`` and the best one's neighbours (``refine_anchors``, as ``run --refine``),

and the mean IoU with the expert's crop, each set's change against ``gaic``, the anchors a photo, the chosen
crops' mean share of the photo and how often an edge lies on the border (the experts' too) are reported::

    python benchmarks/free_grid.py --fcdb heldout=runs/validate/data/fcdb_heldout:test \\
        --fcdb dev=../shared/data/fcdb:test --out docs/validation/inference/free_grid.json \\
        runs/validate/runs/ref11/fold*_seed0/model.safetensors
    python benchmarks/free_grid.py --summary A.json B.json     # the summary over several --out files

A set is NAME=ROOT:SPLIT (an FCDB layout).  All sets of a photo are scored from one backbone pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from box_fusion import fcdb_sets  # benchmarks/ is on the path when run as a script

SETS = ("gaic", "border", "border_all", "union", "border_refined")


def on_border(box, w: float, h: float, tol: float = 0.01) -> float:
    """Share of the box's four edges lying within ``tol`` of the photo's side from the border."""
    x1, y1, x2, y2 = box
    return float(np.mean([x1 <= tol * w, y1 <= tol * h, x2 >= (1 - tol) * w, y2 >= (1 - tol) * h]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--fcdb", action="append", default=[], help="NAME=ROOT:SPLIT")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summary", type=Path, nargs="+", help="print the summary of these --out files and exit")
    args = ap.parse_args(argv)
    if args.summary:
        summary([r for f in args.summary for r in json.loads(f.read_text())])
        return 0
    if not args.models or not args.fcdb:
        ap.error("models and --fcdb are needed (or --summary)")

    import torch

    from smartcrop import Cropper
    from smartcrop.anchors import BORDER_MAX_SHARE, border_anchors, gaic_anchors
    from smartcrop.cropper import FUSE_K, fuse_box
    from smartcrop.evaluate import decoded_items
    from smartcrop.metrics import iou

    torch.set_num_threads(1)
    sets = fcdb_sets(args.fcdb)
    rows = []
    for m in args.models:
        c = Cropper(m, device="cpu")
        for name, items in sets.items():
            res = {f"{k}/{f}": [] for k in SETS for f in (FUSE_K, 1)}
            area = {k: [] for k in res}
            edge = {k: [] for k in res}
            n = {k: [] for k in SETS}
            expert_area, expert_edge = [], []
            for item, li in decoded_items(c, items, name, False, None):
                w, h = li.full_size
                expert_area.append((item.box[2] - item.box[0]) * (item.box[3] - item.box[1]) / (w * h))
                expert_edge.append(on_border(item.box, w, h))
                g, b, ba = gaic_anchors(w, h), border_anchors(w, h), border_anchors(w, h, max_share=1.0)
                over = ba[(ba[:, 2] - ba[:, 0]) * (ba[:, 3] - ba[:, 1]) > BORDER_MAX_SHARE * w * h * (1 + 1e-6)]
                assert len(b) + len(over) == len(ba)
                # one backbone pass; "b" is extended in place by the best border anchor's neighbours (--refine)
                boxes_of = {"g": g, "b": b, "x": over}
                sc = c.score_boxes_batch([(li.image, (w, h))], [boxes_of], refine=["b"])[0]
                sb = sc["b"][: len(b)]
                cand = {"gaic": (g, sc["g"]), "border": (b, sb),
                        "border_all": (np.concatenate([b, over]), np.concatenate([sb, sc["x"]])),
                        "union": (np.concatenate([g, b]), np.concatenate([sc["g"], sb])),
                        "border_refined": (boxes_of["b"], sc["b"])}
                for k, (boxes, s) in cand.items():
                    n[k].append(len(boxes))
                    for f in (FUSE_K, 1):
                        box = fuse_box(boxes, s, int(np.argmax(s)), f)
                        key = f"{k}/{f}"
                        res[key].append(iou(box, item.box))
                        area[key].append((box[2] - box[0]) * (box[3] - box[1]) / (w * h))
                        edge[key].append(on_border(box, w, h))
            row = {"model": str(m), "set": name, "n_photos": len(expert_area),
                   "expert_area": round(statistics.mean(expert_area), 4),
                   "expert_on_border": round(statistics.mean(expert_edge), 4),
                   "anchors": {k: round(statistics.mean(v), 1) for k, v in n.items()}}
            for key in res:
                row[key] = {"iou": round(statistics.mean(res[key]), 4), "area": round(statistics.mean(area[key]), 4),
                            "on_border": round(statistics.mean(edge[key]), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    summary(rows)
    return 0


def summary(rows: list[dict]) -> None:
    """Each candidate set's mean change against ``gaic`` (same fuse) over the models, per photo set."""
    print("\nmean change against gaic (same fuse), sd over models, models won; mean IoU; chosen crops' share of the photo:")
    for name in dict.fromkeys(r["set"] for r in rows):
        sel = [r for r in rows if r["set"] == name]
        print(f"{name:10s} experts' crops: area {statistics.mean(r['expert_area'] for r in sel):.3f}"
              f"  on border {statistics.mean(r['expert_on_border'] for r in sel):.3f}  ({len(sel)} models)")
        for key in (k for k in sel[0] if "/" in k):
            ref = "gaic/" + key.split("/")[1]
            d = [r[key]["iou"] - r[ref]["iou"] for r in sel]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            print(f"{name:10s} {key:18s} {statistics.mean(d):+.4f} ± {sd:.4f} ({sum(x > 0 for x in d)}/{len(d)})"
                  f"  IoU {statistics.mean(r[key]['iou'] for r in sel):.4f}"
                  f"  area {statistics.mean(r[key]['area'] for r in sel):.3f}"
                  f"  on border {statistics.mean(r[key]['on_border'] for r in sel):.3f}")


if __name__ == "__main__":
    sys.exit(main())
