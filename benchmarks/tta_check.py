"""Does flip test-time augmentation help?  Scores each model with and without averaging over the mirrored image.

Uses models trained with GAICD images held out (``benchmarks/ablation.py --save-models``) so that the GAICD
figures are on images the model never saw; FCDB figures on the 10% of FCDB train the ablation held out and on
FCDB test.

    python benchmarks/tta_check.py --split-json runs/ablation.json runs/ablation/*.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--split-json", type=Path, required=True, help="ablation JSON naming the held-out GAICD images")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from smartcrop.cropper import Cropper
    from smartcrop.data import read_fcdb, read_gaicd
    from smartcrop.evaluate import evaluate_fcdb, evaluate_gaicd
    from smartcrop.training import split_validation

    val = set(json.loads(args.split_json.read_text())["val_gaicd"])
    gaicd = [it for it in read_gaicd(args.data / "gaicd", "dev") if it.name in val]
    _, fcdb_val = split_validation(read_fcdb(args.data / "fcdb", "train"), 0.1)
    fcdb_test = read_fcdb(args.data / "fcdb", "test")
    rows = []
    for m in args.models:
        for tta in (False, True):
            c = Cropper(weights=m, device="cpu", tta=tta)
            t = time.perf_counter()
            g = evaluate_gaicd(c, gaicd, progress=False)
            row = {"model": m.name, "tta": tta, "srcc": g["srcc"], "pcc": g["pcc"], "acc5": g["acc5"],
                   "acc10": g["acc10"],
                   "fcdb_val_any": evaluate_fcdb(c, fcdb_val, "any", progress=False)["iou"],
                   "fcdb_test_any": evaluate_fcdb(c, fcdb_test, "any", progress=False)["iou"],
                   "fcdb_test_gt": evaluate_fcdb(c, fcdb_test, "gt", progress=False)["iou"],
                   "seconds": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
