"""GAICD figures of kept validation models scored at other input sizes than the one they were trained at.

Each model of ``--variant`` (``WORK/runs/VARIANT/foldK_seedS/model.safetensors``) scores its fold's 20 held-out
GAICD images with the short side at every ``--sizes`` value (the model's own, 256, among them: the reference),
one size at a time and not averaged; prints, per size, the paired difference from the model's own size over
the models, mean ± sd (pairs won), and writes every figure to ``--out``::

    OMP_NUM_THREADS=1 python benchmarks/input_size.py --variant ref11 --seeds 0,1 --sizes 224,256,288,320 \\
        --out docs/validation/inference/input_size_ref11.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

KEYS = ("srcc", "pcc", "acc5", "acc10")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/validate"))
    ap.add_argument("--variant", default="ref11")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--sizes", default="224,256,288,320")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    from smartcrop.cropper import Cropper
    from smartcrop.data import read_gaicd
    from smartcrop.evaluate import gaicd_predictions
    from smartcrop.metrics import gaicd_metrics

    torch.set_num_threads(1)
    sizes = [int(v) for v in args.sizes.split(",")]
    rows = []
    for seed in (int(v) for v in args.seeds.split(",")):
        for fold in (int(v) for v in args.folds.split(",")):
            items = read_gaicd(args.work / "data" / f"gaicd_fold{fold}", "val")
            model = args.work / "runs" / args.variant / f"fold{fold}_seed{seed}" / "model.safetensors"
            cropper = Cropper(model, device="cpu")
            own = cropper.config.short_side
            for size in sizes:
                cropper.config.short_side = size
                m = gaicd_metrics((s, it.mos) for it, s in gaicd_predictions(cropper, items, progress=False))
                rows.append({"model": str(model), "fold": fold, "seed": seed, "trained_at": own, "size": size,
                             **{k: m[k] for k in KEYS}})
                print(f"fold {fold} seed {seed} size {size}: " + " ".join(f"{k} {m[k]:.4f}" for k in KEYS),
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    ref = {(r["fold"], r["seed"]): r for r in rows if r["size"] == r["trained_at"]}
    print("\n| size | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
    for size in sizes:
        cells = []
        for k in KEYS:
            d = np.array([r[k] - ref[(r["fold"], r["seed"])][k] for r in rows if r["size"] == size])
            cells.append(f"{d.mean():+.4f} ± {d.std(ddof=1) if len(d) > 1 else 0:.4f} ({int((d > 0).sum())}/{len(d)})")
        print(f"| {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
