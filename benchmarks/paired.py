"""Pair a validation variant's result files with a reference variant's, fold by fold, like for like on FCDB's
free crops.

``benchmarks/validate.py --summary`` pairs the result files' own columns, and a result's free-ratio FCDB IoU
(``fcdb_*_any``) is measured with its run's code: the reference ``ref11`` (code ``55da97a``) chose free crops
among GAIC's grid, variants run since the eleventh session among the border grid.  Here the reference's free
IoU comes instead from ``benchmarks/free_grid.py``'s output for its kept models (``--free-ref``, column
``border/3``: the border grid, mean of three, as ``run`` and ``eval fcdb --ratio any`` choose now), so both sides
are the border grid; GAICD and the GT-ratio columns come from the result files.  Prints, per fold, the
variant's figures and the differences, then mean ± sd over the folds (pairs won)::

    python benchmarks/paired.py listwise --reference ref11 --seed 0 \\
        --free-ref docs/validation/inference/free_grid_ref11.json

Result files are looked up in ``--results`` folders (default: ``runs/validate/results``,
``runs/validate2/results``, ``docs/validation/results``), the first that has ``VARIANT/foldK_seedS.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("srcc", "acc5", "acc10", "dev_free", "heldout_free", "dev_gt", "heldout_gt")


def find(roots, variant: str, fold: int, seed: int) -> dict | None:
    for root in roots:
        p = Path(root) / variant / f"fold{fold}_seed{seed}.json"
        if p.exists():
            return json.loads(p.read_text())
    return None


def figures(res: dict, free: dict | None, fold: int, seed: int) -> dict:
    out = {k: res["gaicd_val"][k] for k in KEYS[:3]}
    for s in ("dev", "heldout"):
        out[f"{s}_gt"] = res[f"fcdb_{s}_gt"]["iou"]
        out[f"{s}_free"] = free[(fold, seed, s)] if free is not None else res[f"fcdb_{s}_any"]["iou"]
    return out


def read_free(path: Path) -> dict:
    """(fold, seed, set) → the border grid's free IoU, from free_grid.py's JSON (models ``…/foldK_seedS/…``)."""
    out = {}
    for row in json.loads(path.read_text()):
        run = Path(row["model"]).parent.name  # foldK_seedS
        fold, seed = (int(x) for x in run.removeprefix("fold").split("_seed"))
        out[(fold, seed, row["set"])] = row["border/3"]["iou"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant")
    ap.add_argument("--reference", default="ref11")
    ap.add_argument("--seed", type=int, default=0, help="the variant's seed, paired with the reference's same seed")
    ap.add_argument("--free-ref", type=Path, action="append", help="free_grid.py JSON of the reference's models "
                    "(border/3 column); repeatable")
    ap.add_argument("--results", action="append", default=None)
    args = ap.parse_args(argv)
    roots = args.results or ["runs/validate/results", "runs/validate2/results", "docs/validation/results"]
    free = {k: v for p in args.free_ref for k, v in read_free(p).items()} if args.free_ref else None
    diffs = {k: [] for k in KEYS}
    print("fold  " + "  ".join(f"{k:>12}" for k in KEYS) + "   (variant; below each: variant − reference)")
    for fold in range(5):
        a, b = find(roots, args.variant, fold, args.seed), find(roots, args.reference, fold, args.seed)
        if a is None or b is None:
            continue
        fa, fb = figures(a, None, fold, args.seed), figures(b, free, fold, args.seed)
        print(f"{fold:>4}  " + "  ".join(f"{fa[k]:>12.4f}" for k in KEYS))
        print("      " + "  ".join(f"{fa[k] - fb[k]:>+12.4f}" for k in KEYS))
        for k in KEYS:
            diffs[k].append(fa[k] - fb[k])
    n = len(diffs["srcc"])
    if not n:
        print("no fold done by both")
        return 1
    for k in KEYS:
        d = diffs[k]
        sd = statistics.stdev(d) if n > 1 else float("nan")
        print(f"{k}: {statistics.mean(d):+.4f} ± {sd:.4f} ({sum(x > 0 for x in d)}/{n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
