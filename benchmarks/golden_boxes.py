"""Boxes the shipped model chooses on GAICD dev and FCDB dev (test split): a behaviour check for refactors.

    python benchmarks/golden_boxes.py --data ../shared/data --out runs/golden_before.json
    python benchmarks/golden_boxes.py --data ../shared/data --check runs/golden_before.json

Writes, for every image, the best box and its score for the ratios ``any``, ``16:9``, ``1:1`` and ``4:5``
through the public API (:class:`smartcrop.Cropper`). ``--check`` recomputes them and compares: boxes must be
identical and scores within 1e-4; it prints the number of differences and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RATIOS = ["any", "16:9", "1:1", "4:5"]


def compute(data: Path, weights: Path | None) -> dict:
    from smartcrop import Cropper
    from smartcrop.data import read_fcdb, read_gaicd

    cropper = Cropper(weights=weights, device="cpu")
    paths = [it.image_path for it in read_gaicd(data / "gaicd", "dev")]
    paths += [it.image_path for it in read_fcdb(data / "fcdb", "test")]
    out = {}
    for p in paths:
        crops = cropper.crop(p, ratios=RATIOS)
        out[f"{p.parent.name}/{p.name}"] = [[c.ratio, list(c.box), round(c.score, 5)] for c in crops]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--weights", type=Path, default=None, help="model file (default: the shipped model)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, help="write the boxes to this JSON file")
    g.add_argument("--check", type=Path, help="compare with a JSON file written by --out")
    args = ap.parse_args(argv)
    now = compute(args.data, args.weights)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(now, indent=0))
        print(f"{len(now)} images, {sum(len(v) for v in now.values())} boxes → {args.out}")
        return 0
    ref = json.loads(args.check.read_text())
    diffs = 0
    for name, crops in ref.items():
        got = now.get(name)
        if got is None or len(got) != len(crops):
            diffs += 1
            print(f"{name}: missing or different number of crops")
            continue
        for (r0, b0, s0), (r1, b1, s1) in zip(crops, got):
            if r0 != r1 or b0 != b1 or abs(s0 - s1) > 1e-4:
                diffs += 1
                print(f"{name} {r0}: {b0} {s0} → {b1} {s1}")
    print(f"{len(ref)} images compared, {diffs} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
