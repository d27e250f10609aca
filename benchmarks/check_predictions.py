"""Recompute GAICD metrics from `smartcrop eval gaicd --predictions` output, independently of smartcrop.metrics.

Reads the annotation files directly and uses SciPy's spearmanr/pearsonr, so a bug in smartcrop's own readers
or metrics would show up as a disagreement with `smartcrop eval --json`.

    smartcrop eval gaicd ../shared/data/gaicd --split dev --json --predictions /tmp/pred.jsonl > /tmp/eval.json
    python benchmarks/check_predictions.py ../shared/data/gaicd dev /tmp/pred.jsonl --compare /tmp/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr


def read_mos(path: Path) -> np.ndarray:
    mos = []
    for line in path.read_text().split("\n"):
        parts = line.split()
        if len(parts) == 5 and float(parts[4]) != -2:
            mos.append(float(parts[4]))
    return np.array(mos)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("split")
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--compare", type=Path, help="the JSON printed by `smartcrop eval gaicd --json`")
    args = ap.parse_args(argv)

    srcc, pcc = [], []
    acc = {(k, n): [] for k in range(1, 5) for n in (5, 10)}
    for line in args.predictions.read_text().splitlines():
        rec = json.loads(line)
        stem = Path(rec["image"]).stem
        gt = read_mos(args.root / "annotations" / args.split / f"{stem}.txt")
        pred = np.array(rec["scores"], dtype=float)
        assert len(gt) == len(pred), stem
        srcc.append(spearmanr(gt, pred).statistic)
        pcc.append(pearsonr(gt, pred).statistic)
        order = np.argsort(-pred, kind="stable")
        gt_sorted = np.sort(gt)[::-1]
        for k in range(1, 5):
            for n in (5, 10):
                acc[k, n].append(np.mean([gt[i] >= gt_sorted[n - 1] for i in order[:k]]))
    out = {"n_images": len(srcc), "srcc": float(np.mean(srcc)), "pcc": float(np.mean(pcc))}
    for (k, n), v in acc.items():
        out[f"acc{k}_{n}"] = 100 * float(np.mean(v))
    out["acc5"] = float(np.mean([out[f"acc{k}_5"] for k in range(1, 5)]))
    out["acc10"] = float(np.mean([out[f"acc{k}_10"] for k in range(1, 5)]))
    print(json.dumps({k: round(v, 4) for k, v in out.items()}))
    if args.compare:
        theirs = json.loads(args.compare.read_text())
        bad = [k for k in out if abs(out[k] - theirs[k]) > (0.01 if k.startswith("acc") else 1e-3)]
        print("agree" if not bad else f"DISAGREE on {bad}", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
