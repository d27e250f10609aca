"""Summarise one or more ablation JSON files (one per held-out fold) as a Markdown table.

GAICD metrics are pooled over all held-out images of the given folds (each fold holds out 20 images, so this is
the mean of the fold means); FCDB figures are on the FCDB test split (the same for every fold) and averaged.

    python benchmarks/ablation_summary.py runs/ablation_fold0.json runs/ablation_fold2.json runs/ablation_fold4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--per-fold", action="store_true", help="also print SRCC / Acc5 / Acc10 of each file (fold)")
    args = ap.parse_args(argv)
    rows: dict[str, list] = defaultdict(list)
    for f in args.files:
        for name, v in json.loads(f.read_text())["variants"].items():
            rows[name].append(v)
    if args.per_fold:
        print("| variant | " + " | ".join(f.stem for f in args.files) + " |")
        print("|---|" + "---|" * len(args.files))
        for name, vs in rows.items():
            cells = [f"{v['val_gaicd']['srcc']:.3f} / {v['val_gaicd']['acc5']:.1f} / {v['val_gaicd']['acc10']:.1f}"
                     for v in vs]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()
    print("| variant | folds | GAICD images | SRCC | PCC | Acc5 | Acc10 | FCDB test IoU (any) | FCDB test IoU (gt) "
          "| s/epoch (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, vs in rows.items():
        n = sum(v["val_gaicd"]["n_images"] for v in vs)

        def pooled(key):
            return sum(v["val_gaicd"][key] * v["val_gaicd"]["n_images"] for v in vs) / n

        def mean(get):
            return sum(get(v) for v in vs) / len(vs)

        secs = statistics.median(h["seconds"] for v in vs for h in v["history"])  # median: robust to a busy CPU
        print(f"| {name} | {len(vs)} | {n} | {pooled('srcc'):.3f} | {pooled('pcc'):.3f} | {pooled('acc5'):.1f} "
              f"| {pooled('acc10'):.1f} | {mean(lambda v: v['fcdb_test_any']['iou']):.3f} "
              f"| {mean(lambda v: v['fcdb_test_gt']['iou']):.3f} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
