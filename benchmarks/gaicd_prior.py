"""Would a geometric prior fitted on GAICD's human scores re-rank a protocol model's crops better? Computed from
the per-image predictions the validation protocol keeps (no model is run).

    python benchmarks/gaicd_prior.py --work docs/validation --run ref11:0 --run ref11:1 --run lite0half:0

For each run (VARIANT:SEED, all five folds) and each fold k, a ridge regression (λ = 1) from a crop's features to
its MOS, both z-scored per image, is fitted on the other four folds' held-out images — their predictions came
from models that never saw them, so the fit sees out-of-sample scores, as it would at inference — and applied to
fold k's images. Features: the model's score, and the crop's log area, |centre offset| in x and y, vertical
centre, and log aspect against the photo's (each z-scored per image); ``--features score,area`` etc. picks a
subset. Printed: SRCC / Acc5 / Acc10 of the re-ranked crops minus the model's own, mean ± sd over the five
folds (folds won), and the weights fitted on folds 1-4.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FEATURES = ("score", "area", "dx", "dy", "cy", "aspect")


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9)


def crop_features(scores, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, len(FEATURES)) per-image z-scored features of an image's annotated crops."""
    bw = (boxes[:, 2] - boxes[:, 0]) / width
    bh = (boxes[:, 3] - boxes[:, 1]) / height
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / width - 0.5
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / height - 0.5
    cols = (np.asarray(scores, float), np.log(bw * bh), np.abs(cx), np.abs(cy), cy, np.log(bw / bh))
    return np.stack([_z(np.asarray(c, float)) for c in cols], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "validate")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--run", action="append", required=True, help="VARIANT:SEED (repeatable)")
    ap.add_argument("--features", default=",".join(FEATURES), help=f"a subset of {','.join(FEATURES)}")
    ap.add_argument("--ridge", type=float, default=1.0)
    args = ap.parse_args(argv)
    cols = [FEATURES.index(f) for f in args.features.split(",")]

    from PIL import Image

    from smartcrop.data import read_gaicd
    from smartcrop.metrics import gaicd_metrics

    items = {it.name: it for it in read_gaicd(args.data / "gaicd", "dev")}
    sizes = {n: Image.open(it.image_path).size for n, it in items.items()}

    def fold_preds(run: str, fold: int) -> list[tuple[str, np.ndarray]]:
        variant, seed = run.split(":")
        path = args.work / "results" / variant / f"fold{fold}_seed{seed}.gaicd_pred.jsonl"
        if not path.is_file():
            sys.exit(f"gaicd_prior.py: no predictions {path}")
        return [(d["image"], np.asarray(d["scores"], float)) for d in map(json.loads, path.read_text().splitlines())]

    def design(name: str, scores: np.ndarray) -> np.ndarray:
        return crop_features(scores, items[name].boxes, *sizes[name])[:, cols]

    print(f"features {','.join(FEATURES[c] for c in cols)}, ridge {args.ridge:g}")
    for run in args.run:
        preds = {k: fold_preds(run, k) for k in range(5)}
        gains, weights = [], None
        for k in range(5):
            x = np.concatenate([design(n, s) for j in range(5) if j != k for n, s in preds[j]])
            y = np.concatenate([_z(items[n].mos.astype(float)) for j in range(5) if j != k for n, _ in preds[j]])
            w = np.linalg.solve(x.T @ x + args.ridge * np.eye(x.shape[1]), x.T @ y)
            weights = w if k == 0 else weights
            before = gaicd_metrics([(s, items[n].mos) for n, s in preds[k]])
            after = gaicd_metrics([(design(n, s) @ w, items[n].mos) for n, s in preds[k]])
            gains.append([after[m] - before[m] for m in ("srcc", "acc5", "acc10")])
        g = np.array(gains)
        cells = [f"{g[:, i].mean():+.{p}f} ± {g[:, i].std(ddof=1):.{p}f} ({int((g[:, i] > 0).sum())}/5)"
                 for i, p in ((0, 4), (1, 1), (2, 1))]
        print(f"{run}: SRCC {cells[0]}, Acc5 {cells[1]}, Acc10 {cells[2]}; weights (fold 0 held out) "
              + " ".join(f"{FEATURES[c]}={v:+.3f}" for c, v in zip(cols, weights)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
