"""Does averaging the best few overlapping crops ("box voting") beat the single best crop on FCDB?

The FCDB metric is the IoU of one chosen box with the expert's.  Instead of the top-scoring anchor, average the
``k`` best anchors whose IoU with the best one is at least ``tau`` (``smartcrop.cropper.fuse_box``; same-ratio
anchors average to the same ratio).  Anchor scores are computed once per (model, photo, ratio mode); every (k, tau) is then evaluated on
them, and reported as the mean IoU and the change against the single best anchor, per model and set::

    python benchmarks/box_fusion.py --fcdb heldout=runs/validate/data/fcdb_heldout:test \
        --fcdb dev=../shared/data/fcdb:test --out runs/box_fusion.json \
        runs/validate/runs/fcdbhalf/fold*_seed1/model.safetensors

A set is NAME=ROOT:SPLIT (an FCDB layout).  Choose (k, tau) on one set, confirm on the other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KS = (1, 2, 3, 5, 8)
TAUS = (0.0, 0.5, 0.7)


def fcdb_sets(specs) -> dict:
    """FCDB photo sets from NAME=ROOT:SPLIT arguments: name → items."""
    from smartcrop.data import read_fcdb

    sets = {}
    for spec in specs:
        name, rest = spec.split("=", 1)
        root, split = rest.rsplit(":", 1)
        sets[name] = read_fcdb(root, split)
    return sets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--fcdb", action="append", required=True, help="NAME=ROOT:SPLIT")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from smartcrop import Cropper
    from smartcrop.cropper import fuse_box
    from smartcrop.evaluate import fcdb_eval_candidates
    from smartcrop.imageio import load_image
    from smartcrop.metrics import iou

    torch.set_num_threads(1)
    sets = fcdb_sets(args.fcdb)
    rows = []
    for mp in args.models:
        cropper = Cropper(weights=mp, device="cpu")
        for set_name, items in sets.items():
            ious: dict = {}
            for item in items:
                li = load_image(item.image_path, target_short_side=cropper.config.short_side)
                w, h = li.full_size
                cands = {m: fcdb_eval_candidates(w, h, item.box, m) for m in ("any", "gt")}
                scores = cropper.score_boxes(li.image, (w, h), cands)
                for mode, boxes in cands.items():
                    b = np.asarray(boxes, dtype=np.float64)
                    for k in KS:
                        for tau in TAUS if k > 1 else (1.0,):
                            best = int(np.argmax(scores[mode]))
                            ious.setdefault((mode, k, tau), []).append(
                                iou(tuple(fuse_box(b, scores[mode], best, k, tau)), item.box))
            for (mode, k, tau), v in ious.items():
                base = np.mean(ious[(mode, 1, 1.0)])
                row = {"model": str(mp), "set": set_name, "mode": mode, "k": k, "tau": tau, "n": len(v),
                       "iou": round(float(np.mean(v)), 4), "gain": round(float(np.mean(v) - base), 4)}
                rows.append(row)
            print(f"{mp} {set_name}: " + " ".join(
                f"{m}:k{k}/t{t}={r['gain']:+.4f}" for r in rows[-len(ious):]
                for m, k, t in [(r["mode"], r["k"], r["tau"])] if k > 1), file=sys.stderr, flush=True)
    summary = {}
    for r in rows:
        summary.setdefault((r["set"], r["mode"], r["k"], r["tau"]), []).append(r["gain"])
    print("set mode k tau: mean gain ± sd over models (models improved)")
    for (s, m, k, t), g in sorted(summary.items()):
        if k == 1:
            continue
        g = np.asarray(g)
        sd = g.std(ddof=1) if len(g) > 1 else float("nan")
        print(f"{s:8s} {m:3s} k={k} tau={t}: {g.mean():+.4f} ± {sd:.4f} ({int((g > 0).sum())}/{len(g)})")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
