"""Does bfloat16 autocast change the chosen crops?  The same model scored in float32 and under autocast.

    python benchmarks/amp_check.py --data ../shared/data --device cpu --out runs/amp_check_cpu.json

On GAICD dev: SRCC, Acc5, Acc10 both ways and how often the top-scored annotated crop differs; on FCDB test:
IoU with the expert crop (free anchors and anchors at the expert's ratio) both ways and how many photos get
another box.  On a CPU this measures bfloat16's rounding (CPU autocast); on CUDA, pass ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from smartcrop import Cropper
    from smartcrop.data import read_fcdb, read_gaicd
    from smartcrop.evaluate import fcdb_choices, gaicd_predictions
    from smartcrop.metrics import fcdb_metrics, gaicd_metrics

    gaicd = read_gaicd(args.data / "gaicd", "dev")
    fcdb = read_fcdb(args.data / "fcdb", "test")
    res: dict = {"device": args.device}
    runs = {}
    for amp in (False, True):
        c = Cropper(weights=args.weights, device=args.device, amp=amp)
        preds = gaicd_predictions(c, gaicd, progress=False)
        choices = {r: fcdb_choices(c, fcdb, r, progress=False) for r in ("any", "gt")}
        runs[amp] = (preds, choices)
        key = "bf16" if amp else "fp32"
        res[key] = {"gaicd": gaicd_metrics((s, it.mos) for it, s in preds),
                    **{f"fcdb_{r}": fcdb_metrics((tuple(b), it.box, w, h) for it, b, (w, h) in ch)
                       for r, ch in choices.items()}}
    (p32, c32), (p16, c16) = runs[False], runs[True]
    res["gaicd_top1_changed"] = int(sum(np.argmax(a) != np.argmax(b) for (_, a), (_, b) in zip(p32, p16)))
    res["gaicd_images"] = len(p32)
    res["gaicd_max_score_diff"] = float(max(np.abs(a - b).max() for (_, a), (_, b) in zip(p32, p16)))
    for r in ("any", "gt"):
        res[f"fcdb_{r}_changed"] = int(sum(tuple(a[1]) != tuple(b[1]) for a, b in zip(c32[r], c16[r])))
    res["fcdb_images"] = len(c32["any"])
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
