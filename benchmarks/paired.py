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

Result files are read as ``validate.py --summary`` reads them (``validate.load_results``) from the ``--work``
folders (default: ``runs/validate``, ``runs/validate2``, ``docs/validation``); the first that has a run wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from validate import N_FOLDS, fmt, load_results, mean_sd  # benchmarks/ is on the path when run as a script

KEYS = ("srcc", "acc5", "acc10", "dev_free", "heldout_free", "dev_gt", "heldout_gt")


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
    ap.add_argument("--work", type=Path, action="append", default=None,
                    help="validate.py work folder (repeatable; default runs/validate, runs/validate2, docs/validation)")
    args = ap.parse_args(argv)
    runs: dict = {}  # variant → (fold, seed) → result, the first work folder's run kept
    for work in reversed(args.work or [Path("runs/validate"), Path("runs/validate2"), Path("docs/validation")]):
        for variant, by_run in load_results(work).items():
            runs.setdefault(variant, {}).update(by_run)
    free = {k: v for p in args.free_ref for k, v in read_free(p).items()} if args.free_ref else None
    diffs = {k: [] for k in KEYS}
    print("fold  " + "  ".join(f"{k:>12}" for k in KEYS) + "   (variant; below each: variant − reference)")
    for fold in range(N_FOLDS):
        a = runs.get(args.variant, {}).get((fold, args.seed))
        b = runs.get(args.reference, {}).get((fold, args.seed))
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
        print(f"{k}: {fmt(*mean_sd(d), 4, signed=True)} ({sum(x > 0 for x in d)}/{n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
