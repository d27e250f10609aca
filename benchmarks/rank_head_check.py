"""Does the pairwise ranking head help at inference?  Score head alone vs. a Borda count of the ranking head
(each crop's mean probability of beating the others) vs. their z-scored sum, on held-out GAICD fold images.

    python benchmarks/rank_head_check.py --work runs/validate --variant fcdbhalf --seed 1 \
        --fcdb-dev ../shared/data/fcdb --out runs/rank_head_check.json

Uses the models kept by ``benchmarks/validate.py --keep-models`` (WORK/runs/VARIANT/foldK_seedS/) and each
fold's 20 held-out images (WORK/data/gaicd_foldK, split val); prints SRCC / Acc5 / Acc10 per fold and the
paired mean ± sd of each alternative minus the score head.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def borda(net, crop_feats):
    """Mean over j of P(i beats j), antisymmetrised, from the ranking head's two layers (first layer split)."""
    import torch

    lin1, lin2 = net.rank_head[0], net.rank_head[2]
    d = crop_feats.shape[1]
    a = crop_feats @ lin1.weight[:, :d].T
    b = crop_feats @ lin1.weight[:, d:].T
    h = torch.relu(a[:, None, :] + b[None, :, :] + lin1.bias)
    logit = (h @ lin2.weight[0] + lin2.bias[0])  # (N, N): i beats j
    p = torch.sigmoid(logit)
    p = (p + 1 - p.T) / 2
    n = p.shape[0]
    return ((p.sum(1) - p.diagonal()) / max(n - 1, 1)).numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/validate"))
    ap.add_argument("--variant", default="fcdbhalf")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fcdb-dev", type=Path,
                    help="FCDB root whose test split is the dev half (e.g. ../shared/data/fcdb)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from smartcrop import Cropper
    from smartcrop.anchors import gaic_anchors, ratio_anchors, scale_boxes
    from smartcrop.data import read_fcdb, read_gaicd
    from smartcrop.imageio import load_image
    from smartcrop.metrics import gaicd_metrics, iou
    from smartcrop.transforms import image_tensor, network_size

    torch.set_num_threads(1)
    z = lambda x: (x - x.mean()) / (x.std() + 1e-9)  # noqa: E731
    rows = []
    for k in range(5):
        mp = args.work / "runs" / args.variant / f"fold{k}_seed{args.seed}" / "model.safetensors"
        if not mp.is_file():
            continue
        c = Cropper(weights=mp, device="cpu")
        net = c.net.eval()
        preds: dict = {"score": [], "borda": [], "sum": []}
        for item in read_gaicd(args.work / "data" / f"gaicd_fold{k}", "val"):
            li = load_image(item.image_path, target_short_side=c.config.short_side)
            fw, fh = li.full_size
            nw, nh = network_size(fw, fh, c.config.short_side, c.config.max_long_side)
            with torch.inference_mode():
                feats = net.image_features(image_tensor(li.image, (nw, nh)))
                b = torch.from_numpy(scale_boxes(np.asarray(item.boxes, np.float32), nw / fw, nh / fh))
                cf = net.crop_features(feats, b)
                s = net.score_features(cf).numpy()
                r = borda(net, cf)
            for key, v in (("score", s), ("borda", r), ("sum", z(s) + z(r))):
                preds[key].append((v, item.mos))
        row = {"fold": k, **{key: gaicd_metrics(v) for key, v in preds.items()}}
        # FCDB: the chosen box among free anchors / anchors at the expert's ratio, by each rule
        for set_name, root in (("dev", args.fcdb_dev), ("heldout", args.work / "data" / "fcdb_heldout")):
            if root is None:
                continue
            ious: dict = {}
            for item in read_fcdb(root, "test"):
                li = load_image(item.image_path, target_short_side=c.config.short_side)
                fw, fh = li.full_size
                nw, nh = network_size(fw, fh, c.config.short_side, c.config.max_long_side)
                x1, y1, x2, y2 = item.box
                with torch.inference_mode():
                    feats = net.image_features(image_tensor(li.image, (nw, nh)))
                    for mode, boxes in (("any", gaic_anchors(fw, fh)),
                                        ("gt", ratio_anchors(fw, fh, max(x2 - x1, 1e-6) / max(y2 - y1, 1e-6)))):
                        bx = np.asarray(boxes, np.float32)
                        cf = net.crop_features(feats, torch.from_numpy(scale_boxes(bx, nw / fw, nh / fh)))
                        s = net.score_features(cf).numpy()
                        r = borda(net, cf)
                        for key, v in (("score", s), ("borda", r), ("sum", z(s) + z(r))):
                            ious.setdefault(f"fcdb_{set_name}_{mode}_{key}", []).append(
                                iou(tuple(bx[int(np.argmax(v))]), item.box))
            row.update({key: float(np.mean(v)) for key, v in ious.items()})
        rows.append(row)
        print(k, " ".join(f"{key} {m['srcc']:.3f}/{m['acc5']:.1f}/{m['acc10']:.1f}"
                          for key, m in row.items() if key in preds),
              " ".join(f"{key[5:]} {v:.4f}" for key, v in row.items() if key.startswith("fcdb_")), flush=True)
    for key in ("borda", "sum"):
        for met in ("srcc", "acc5", "acc10"):
            d = np.array([r[key][met] - r["score"][met] for r in rows])
            print(f"{key} - score {met}: {d.mean():+.4f} ± {d.std(ddof=1) if len(d) > 1 else float('nan'):.4f} "
                  f"({int((d > 0).sum())}/{len(d)})")
        for fk in sorted({k2[:-len("_score")] for r in rows for k2 in r if k2.endswith("_score")}):
            d = np.array([r[f"{fk}_{key}"] - r[f"{fk}_score"] for r in rows])
            print(f"{key} - score {fk}: {d.mean():+.4f} ± {d.std(ddof=1) if len(d) > 1 else float('nan'):.4f} "
                  f"({int((d > 0).sum())}/{len(d)})")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
