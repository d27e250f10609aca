"""The face-aware choice (`run --faces`) on the validation protocol's fold models: GAICD Acc on each fold's 20
held-out images and FCDB IoU on the held-out FCDB train slice (and the FCDB test half), with and without it.

The face term changes which crop is *chosen*, not the model's scores: on GAICD the Acc K/N of the choice
scores (the model's less the face penalty) is compared with the model's own; SRCC/PCC are the scores' and do
not move.

    python benchmarks/face_folds.py --variant fcdbhalf --seed 1 [--work runs/validate] \\
        [--fcdb-dev ../shared/data/fcdb] [--out docs/validation/inference/faces_fold_eval.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="fcdbhalf")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("runs/validate"))
    ap.add_argument("--fcdb-dev", type=Path, default=None, help="also the FCDB test half (FCDB root)")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import numpy as np

    from smartcrop.cropper import Cropper
    from smartcrop.data import read_fcdb, read_gaicd
    from smartcrop.evaluate import decoded_items, evaluate_fcdb
    from smartcrop.metrics import gaicd_metrics

    rows = []
    for fold in (int(f) for f in args.folds.split(",")):
        model = args.work / "runs" / args.variant / f"fold{fold}_seed{args.seed}" / "model.safetensors"
        cropper = Cropper(weights=model, device="cpu", faces=True)
        items = read_gaicd(args.work / "data" / f"gaicd_fold{fold}", "val")
        plain, chosen, with_face = [], [], 0
        for item, li in decoded_items(cropper, items, "GAICD", False, print):
            s = cropper.score_boxes(li.image, li.full_size, {"gt": item.boxes})["gt"]
            faces = cropper.find_faces(li.image, li.full_size)
            with_face += bool(len(faces))
            plain.append((s, item.mos))
            chosen.append((cropper.choice_scores(item.boxes, s, faces), item.mos))
        g0, g1 = gaicd_metrics(plain), gaicd_metrics(chosen)
        row = {"fold": fold, "model": str(model), "gaicd_images": len(plain), "gaicd_with_a_face": with_face,
               "acc5": [g0["acc5"], g1["acc5"]], "acc10": [g0["acc10"], g1["acc10"]]}
        sets = [("heldout", read_fcdb(args.work / "data" / "fcdb_heldout", "test"))]
        if args.fcdb_dev:
            sets.append(("dev", read_fcdb(args.fcdb_dev, "test")))
        for name, fitems in sets:
            for ratio in ("any", "gt"):
                got = []
                for faces in (False, True):
                    cropper.faces = faces
                    got.append(evaluate_fcdb(cropper, fitems, ratio, progress=False)["iou"])
                row[f"fcdb_{name}_{ratio}"] = got
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = [k for k in rows[0] if isinstance(rows[0][k], list) and k != "model"]
    summary = {}
    for k in keys:
        d = np.array([r[k][1] - r[k][0] for r in rows])
        summary[k] = {"without": float(np.mean([r[k][0] for r in rows])), "with": float(np.mean([r[k][1] for r in rows])),
                      "diff_mean": float(d.mean()), "diff_sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                      "pairs_won": int((d > 0).sum()), "pairs_lost": int((d < 0).sum())}
    out = {"variant": args.variant, "seed": args.seed, "folds": rows, "summary": summary}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
