"""Weight averaging ("model soup") of validation-protocol runs, fold by fold, against its members.

For each fold the members' kept models (``WORK/runs/VARIANT/foldK_seedS/model.safetensors``, looked up in every
``--work`` folder) are averaged with :func:`smartcrop.weights.average_models` into ``--soups DIR/foldK.safetensors``,
and the soup and every member are scored exactly as ``smartcrop eval`` scores (the library's ``Cropper`` defaults):
the fold's 20 held-out GAICD images (SRCC, PCC, Acc5, Acc10), the FCDB dev half and the held-out FCDB train slice,
free (``any``) and at the expert's ratio (``gt``).  The members' GAICD scores are also averaged after z-scoring
per image (a prediction ensemble, which costs one model pass per member: the soup costs one).  Printed: the soup,
the ensemble and each member against the members' mean, paired by fold (mean ± sd, folds won).

    python benchmarks/soup.py --work runs/validate --work runs/validate2 --members ref11:0+initzero:1 \\
        --soups runs/soup/ref11_initzero --out docs/validation/inference/soup_ref11_initzero.json

``--out`` keeps every evaluation (by model sha256, fold and set), so a rerun only scores what is new.  Averaging
is meant for runs that started from the same weights (``smartcrop train --init-seed``); members whose cards
record different initialisation seeds are reported, and averaged all the same (for the contrast).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from validate import fmt, mean_sd  # benchmarks/ is on the path when run as a script

REPO = Path(__file__).resolve().parent.parent
GAICD_KEYS = ("srcc", "pcc", "acc5", "acc10")
FCDB_SETS = ("dev", "heldout")


def _model(works: list[Path], member: str, fold: int) -> Path:
    variant, seed = member.split(":")
    for w in works:
        p = w / "runs" / variant / f"fold{fold}_seed{seed}" / "model.safetensors"
        if p.is_file():
            return p
    raise SystemExit(f"{member}: no kept model for fold {fold} in {', '.join(map(str, works))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, action="append", default=None,
                    help="validation work folder(s) holding the kept models (default runs/validate)")
    ap.add_argument("--members", required=True, help="VARIANT:SEED+VARIANT:SEED[+...]")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--fcdb-dev", type=Path, default=REPO.parent / "shared" / "data" / "fcdb")
    ap.add_argument("--soups", type=Path, required=True, help="folder for the averaged models")
    ap.add_argument("--out", type=Path, required=True, help="JSON of every evaluation (read first if present)")
    ap.add_argument("--gaicd-only", action="store_true", help="score the GAICD fold only (no FCDB)")
    args = ap.parse_args(argv)
    works = args.work or [REPO / "runs" / "validate"]
    members = args.members.split("+")
    folds = [int(f) for f in args.folds.split(",")]

    import torch

    from smartcrop import Cropper
    from smartcrop.data import read_fcdb, read_gaicd
    from smartcrop.evaluate import evaluate_fcdb, gaicd_predictions
    from smartcrop.metrics import gaicd_metrics
    from smartcrop.weights import average_models, save_model, sha256_file

    torch.set_num_threads(1)
    store = json.loads(args.out.read_text()) if args.out.is_file() else {}
    fcdb = {"dev": read_fcdb(args.fcdb_dev, "test"), "heldout": read_fcdb(works[0] / "data" / "fcdb_heldout", "test")}

    def evaluate(path: Path, fold: int, items) -> dict:
        key = f"{sha256_file(path)}:fold{fold}"
        if key not in store or (not args.gaicd_only and "dev_any" not in store[key]):
            cropper = Cropper(weights=path, device="cpu")
            preds = gaicd_predictions(cropper, items)
            rec = {"file": str(path), "gaicd": gaicd_metrics((s, it.mos) for it, s in preds),
                   "gaicd_scores": {it.name: [round(float(v), 6) for v in s] for it, s in preds}}
            for name, its in ({} if args.gaicd_only else fcdb).items():
                for mode in ("any", "gt"):
                    rec[f"{name}_{mode}"] = evaluate_fcdb(cropper, its, mode)["iou"]
            store[key] = rec
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
        return store[key]

    rows = []
    for fold in folds:
        paths = [_model(works, m, fold) for m in members]
        soup_path = args.soups / f"fold{fold}.safetensors"
        net, info = average_models(paths)
        seeds = {m["init_seed"] for m in info["average_of"]}
        if len(seeds - {None}) > 1:
            print(f"fold {fold}: the members' initialisation seeds differ ({sorted(seeds - {None})})", file=sys.stderr)
        args.soups.mkdir(parents=True, exist_ok=True)
        save_model(net, soup_path, {"command": "benchmarks/soup.py --members " + args.members, **info})
        items = read_gaicd(works[0] / "data" / f"gaicd_fold{fold}", "val")
        got = {m: evaluate(p, fold, items) for m, p in zip(members, paths)}
        got["soup"] = evaluate(soup_path, fold, items)
        # the prediction ensemble: each member's scores z-scored per image, averaged
        ens = []
        for it in items:
            zs = [np.asarray(got[m]["gaicd_scores"][it.name]) for m in members]
            ens.append((np.mean([(z - z.mean()) / (z.std() + 1e-9) for z in zs], axis=0), it.mos))
        got["ensemble"] = {"gaicd": gaicd_metrics(ens)}
        rows.append((fold, got))
        print(f"fold {fold}: " + " | ".join(
            f"{k} SRCC {v['gaicd']['srcc']:.3f} Acc5 {v['gaicd']['acc5']:.1f}"
            + "".join(f" {s}/{mo} {v[f'{s}_{mo}']:.4f}" for s in FCDB_SETS for mo in ("any", "gt") if f"{s}_{mo}" in v)
            for k, v in got.items()), file=sys.stderr, flush=True)

    cols = [("gaicd", k) for k in GAICD_KEYS] + [(None, f"{s}_{mo}") for s in FCDB_SETS for mo in ("any", "gt")]

    def value(rec: dict, col) -> float | None:
        group, k = col
        return rec[group][k] if group else rec.get(k)

    if args.gaicd_only:
        cols = cols[:len(GAICD_KEYS)]

    print(f"\nsoup of {args.members}, folds {args.folds}: means over folds")
    for who in members + ["soup", "ensemble"]:
        vals = []
        for col in cols:
            v = [value(got[who], col) for _, got in rows]
            vals.append("–" if None in v else f"{np.mean(v):.4f}")
        print(f"  {who:>12}: " + " ".join(f"{c[1]} {v}" for c, v in zip(cols, vals)))
    print("\npaired by fold against the members' mean: mean ± sd (folds won)")
    for who in ["soup", "ensemble"] + members:
        parts = []
        for col in cols:
            if any(value(got[w], col) is None for _, got in rows for w in members + [who]):
                continue  # not scored on every fold
            d = [value(got[who], col) - np.mean([value(got[m], col) for m in members]) for _, got in rows]
            parts.append(f"{col[1]} {fmt(*mean_sd(d), 4, signed=True)} ({sum(x > 0 for x in d)}/{len(d)})")
        print(f"  {who}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
