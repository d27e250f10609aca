"""Does averaging the best few overlapping crops ("box voting") beat the single best crop on FCDB?

The FCDB metric is the IoU of one chosen box with the expert's.  Instead of the top-scoring anchor, average the
``k`` best anchors whose IoU with the best one is at least ``tau`` (``smartcrop.cropper.fuse_box``; same-ratio
anchors average to the same ratio).  Anchor scores are computed once per (model, photo, ratio mode); every (k, tau) is then evaluated on
them, and reported as the mean IoU and the change against the single best anchor, per model and set::

    python benchmarks/box_fusion.py --fcdb heldout=runs/validate/data/fcdb_heldout:test \
        --fcdb dev=../shared/data/fcdb:test --out runs/box_fusion.json \
        runs/validate/runs/fcdbhalf/fold*_seed1/model.safetensors

A set is NAME=ROOT:SPLIT (an FCDB layout).  Choose (k, tau) on one set, confirm on the other.

``--temperatures T …`` adds the score-weighted vote (``fuse_box(..., temperature=T)``: every anchor overlapping
the best by IoU >= 0.5, weights exp((s_j - s_best) / T); reported as ``k=vote``), each also paired against the
plain mean of 3 (``vs k3``), which is what ``run`` did before the vote.
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
    ap.add_argument("--temperatures", type=float, nargs="*", default=[])
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
                    for t in args.temperatures:
                        ious.setdefault((mode, f"vote{t:g}", 0.5), []).append(
                            iou(tuple(fuse_box(b, scores[mode], best, 2, 0.5, temperature=t)), item.box))
            for (mode, k, tau), v in ious.items():
                base = np.mean(ious[(mode, 1, 1.0)])
                row = {"model": str(mp), "set": set_name, "mode": mode, "k": k, "tau": tau, "n": len(v),
                       "iou": round(float(np.mean(v)), 4), "gain": round(float(np.mean(v) - base), 4)}
                if str(k).startswith("vote"):
                    row["vs_k3"] = round(float(np.mean(v) - np.mean(ious[(mode, 3, 0.5)])), 4)
                rows.append(row)
            print(f"{mp} {set_name}: " + " ".join(
                f"{m}:k{k}/t{t}={r['gain']:+.4f}" for r in rows[-len(ious):]
                for m, k, t in [(r["mode"], r["k"], r["tau"])] if k != 1), file=sys.stderr, flush=True)
    summary = {}
    for r in rows:
        summary.setdefault((r["set"], r["mode"], str(r["k"]), r["tau"]), []).append((r["gain"], r.get("vs_k3")))

    def stat(g):
        g = np.asarray(g)
        sd = g.std(ddof=1) if len(g) > 1 else float("nan")
        return f"{g.mean():+.4f} ± {sd:.4f} ({int((g > 0).sum())}/{len(g)})"

    print("set mode k tau: mean gain over the best anchor ± sd over models (models improved) [the vote: vs k3]")
    for (s, m, k, t), g in sorted(summary.items()):
        if k == "1":
            continue
        vs = f"   vs k3 {stat([v for _, v in g])}" if k.startswith("vote") else ""
        print(f"{s:8s} {m:3s} k={k} tau={t}: {stat([v for v, _ in g])}{vs}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
