"""What an ensemble of validation-protocol models would score on the GAICD folds — the most a distilled single
model could hope for — computed from the per-image predictions the protocol keeps (no model is run).

    python benchmarks/ensemble_ceiling.py --reference fcdbhalf:0 \
        --ensemble fcdbhalf:0+fcdbhalf:1 --ensemble fcdbhalf:1+rconly:0+safonly:0

For each fold, each member's scores of an image are z-scored per image (members differ in offset and scale) and
averaged; SRCC / Acc5 / Acc10 (``smartcrop.metrics.gaicd_metrics``) of that average over the fold's 20 held-out
images, then mean over folds and the paired difference against the reference run (mean ± sd over folds, folds
won).  Reads ``WORK/results/VARIANT/foldK_seedS.gaicd_pred.jsonl`` and the GAICD dev annotations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "validate")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--reference", default="fcdbhalf:0", help="VARIANT:SEED")
    ap.add_argument("--ensemble", action="append", required=True, help="VARIANT:SEED+VARIANT:SEED+...")
    ap.add_argument("--folds", default="0,1,2,3,4", help="the folds to pair on (default all five)")
    args = ap.parse_args(argv)
    folds = [int(f) for f in args.folds.split(",")]

    from smartcrop.data import read_gaicd
    from smartcrop.metrics import gaicd_metrics

    gt = {it.name: it.mos for it in read_gaicd(args.data / "gaicd", "dev")}

    def preds(member: str, fold: int):
        variant, seed = member.split(":")
        path = args.work / "results" / variant / f"fold{fold}_seed{seed}.gaicd_pred.jsonl"
        if not path.is_file():
            sys.exit(f"ensemble_ceiling.py: no predictions {path}")
        return {d["image"]: np.asarray(d["scores"], float) for d in map(json.loads, path.read_text().splitlines())}

    def per_fold(members: list[str]) -> np.ndarray:
        rows = []
        for fold in folds:
            ps = [preds(m, fold) for m in members]
            pairs = [(np.mean([(p[n] - p[n].mean()) / p[n].std() for p in ps], axis=0), gt[n]) for n in ps[0]]
            m = gaicd_metrics(pairs)
            rows.append((m["srcc"], m["acc5"], m["acc10"]))
        return np.array(rows)

    ref = per_fold([args.reference])
    print("| members | SRCC | Acc5 | Acc10 | SRCC − ref (folds won) | Acc5 − ref | Acc10 − ref |")
    print("|---|---|---|---|---|---|---|")
    for spec in [args.reference, *args.ensemble]:
        r = per_fold(spec.split("+"))
        d = r - ref
        cells = [f"{r[:, i].mean():.3f}" if i == 0 else f"{r[:, i].mean():.1f}" for i in range(3)]
        diffs = [f"{d[:, 0].mean():+.3f} ± {d[:, 0].std(ddof=1):.3f} ({int((d[:, 0] > 0).sum())}/{len(folds)})",
                 f"{d[:, 1].mean():+.1f} ± {d[:, 1].std(ddof=1):.1f}", f"{d[:, 2].mean():+.1f} ± {d[:, 2].std(ddof=1):.1f}"]
        print(f"| {spec} | " + " | ".join(cells + diffs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
