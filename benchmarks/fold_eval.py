"""Re-evaluate a validation variant's kept fold models, paired fold by fold against a reference variant.

``benchmarks/validate.py --keep-models`` leaves each run's model in ``runs/validate/runs/VARIANT/foldK_seedS/``.
For each fold this scores, once per image, the fold's 20 held-out GAICD images (SRCC, PCC, Acc5, Acc10) and
FCDB's dev half and held-out train slice, free (``any``) and at the expert's ratio (``gt``), and reports FCDB
IoU with the best anchor alone (fuse 1) and with box voting (fuse 3) — exactly as ``smartcrop eval`` computes
them.  The reference's figures come from its result files; its runs predate box voting, so FCDB pairs use
fuse 1.

A model trained with ``smartcrop train --fcdb-head`` scores a crop ``mos + m · fcdb``: it is scored at m = 0
(the MOS head alone) and m = 1, which gives both heads' scores, and every m of ``--mix`` is evaluated (for
other models ``--mix`` is ignored)::

    python benchmarks/fold_eval.py --variant fcdbhead --seed 0 --reference fcdbhalf \
        --mix 0,0.25,0.5,1,2 --out runs/fold_eval_fcdbhead.jsonl
    python benchmarks/fold_eval.py --variant gaicdrank --seed 0 --reference fcdbhalf

Data: ``runs/validate`` as ``benchmarks/validate.py`` left it (fold roots, the FCDB held-out root, the kept
models) and the FCDB dev half (``--fcdb-dev``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GAICD_KEYS = ("srcc", "pcc", "acc5", "acc10")


def _mean_sd(v) -> str:
    v = np.asarray(v, dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():+.4f} ± {sd:.4f} ({int((v > 0).sum())}/{len(v)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/validate"))
    ap.add_argument("--variant", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--reference", default="fcdbhalf")
    ap.add_argument("--mix", default="0,0.25,0.5,1,2")
    ap.add_argument("--fcdb-dev", type=Path, default=Path("../shared/data/fcdb"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from smartcrop import Cropper
    from smartcrop.cropper import FUSE_K, fuse_box
    from smartcrop.data import read_fcdb, read_gaicd
    from smartcrop.evaluate import fcdb_eval_candidates
    from smartcrop.imageio import load_image
    from smartcrop.metrics import fcdb_metrics, gaicd_metrics

    torch.set_num_threads(1)
    mixes = [float(m) for m in args.mix.split(",")]
    folds = [int(f) for f in args.folds.split(",")]
    sets = {"dev": read_fcdb(args.fcdb_dev, "test"), "heldout": read_fcdb(args.work / "data" / "fcdb_heldout", "test")}
    rows = []
    for fold in folds:
        run = f"fold{fold}_seed{args.seed}"
        mp = args.work / "runs" / args.variant / run / "model.safetensors"
        cropper = Cropper(weights=mp, device="cpu")
        net = cropper.net
        two_heads = net.config.fcdb_head
        fold_mixes = mixes if two_heads else [None]

        def both(image, size, box_sets):
            """(MOS head, FCDB head) scores of every box set; (scores, 0) for a model with one head."""
            if not two_heads:
                a = cropper.score_boxes(image, size, box_sets)
                return {k: (a[k], np.zeros_like(a[k])) for k in box_sets}
            net.config.fcdb_mix = 0.0
            a = cropper.score_boxes(image, size, box_sets)
            net.config.fcdb_mix = 1.0
            b = cropper.score_boxes(image, size, box_sets)
            return {k: (a[k], b[k] - a[k]) for k in box_sets}

        gaicd = []
        for item in read_gaicd(args.work / "data" / f"gaicd_fold{fold}", "val"):
            li = load_image(item.image_path, target_short_side=cropper.config.short_side)
            gaicd.append((item, both(li.image, li.full_size, {"gt": item.boxes})["gt"]))
        fcdb = {}
        for name, items in sets.items():
            for item in items:
                li = load_image(item.image_path, target_short_side=cropper.config.short_side)
                w, h = li.full_size
                cands = {m: fcdb_eval_candidates(w, h, item.box, m) for m in ("any", "gt")}
                fcdb.setdefault(name, []).append((item, (w, h), cands, both(li.image, (w, h), cands)))
        for mix in fold_mixes:
            m = mix or 0.0
            row = {"variant": args.variant, "fold": fold, "seed": args.seed, "mix": mix,
                   "gaicd": {k: gaicd_metrics((mos + m * fc, item.mos) for item, (mos, fc) in gaicd)[k]
                             for k in GAICD_KEYS}}
            for name, recs in fcdb.items():
                for mode in ("any", "gt"):
                    for k in (1, FUSE_K):
                        chosen = []
                        for item, (w, h), cands, sc in recs:
                            s = sc[mode][0] + m * sc[mode][1]
                            b = fuse_box(np.asarray(cands[mode], np.float64), s, int(np.argmax(s)), k)
                            chosen.append((tuple(b), item.box, w, h))
                        row[f"{name}_{mode}_fuse{k}"] = fcdb_metrics(chosen)["iou"]
            rows.append(row)
            g = row["gaicd"]
            print(f"fold {fold} mix {mix}: SRCC {g['srcc']:.3f} Acc5 {g['acc5']:.1f} Acc10 {g['acc10']:.1f} | "
                  + " ".join(f"{k}={v:.3f}" for k, v in row.items() if "_fuse" in k), file=sys.stderr, flush=True)

    print(f"\n{args.variant} (seed {args.seed}) minus {args.reference} (seed {args.seed}), paired by fold: "
          "mean ± sd (folds won); FCDB at fuse 1 (the reference runs have no box voting)")
    ref = {f: json.loads((args.work / "results" / args.reference / f"fold{f}_seed{args.seed}.json").read_text())
           for f in folds}
    mixes = sorted({r["mix"] for r in rows}, key=lambda v: -1 if v is None else v)
    for m in mixes:
        rs = [r for r in rows if r["mix"] == m]
        parts = [f"{k} {_mean_sd([r['gaicd'][k] - ref[r['fold']]['gaicd_val'][k] for r in rs])}" for k in GAICD_KEYS]
        for name in sets:
            for mode in ("any", "gt"):
                d = [r[f"{name}_{mode}_fuse1"] - ref[r["fold"]][f"fcdb_{name}_{mode}"]["iou"] for r in rs]
                parts.append(f"{name}/{mode} {_mean_sd(d)}")
        print(f"mix {m}: " + "; ".join(parts))
    print("\nmeans over folds (fuse 1 / fuse 3):")
    for m in mixes:
        rs = [r for r in rows if r["mix"] == m]
        g = {k: np.mean([r["gaicd"][k] for r in rs]) for k in GAICD_KEYS}
        f = {f"{n}/{mo}": (np.mean([r[f"{n}_{mo}_fuse1"] for r in rs]), np.mean([r[f"{n}_{mo}_fuse{FUSE_K}"] for r in rs]))
             for n in sets for mo in ("any", "gt")}
        print(f"mix {m}: SRCC {g['srcc']:.3f} Acc5 {g['acc5']:.1f} Acc10 {g['acc10']:.1f} | "
              + " ".join(f"{k} {a:.3f}/{b:.3f}" for k, (a, b) in f.items()))
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
