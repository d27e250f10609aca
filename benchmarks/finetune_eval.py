"""Measure `smartcrop finetune` schemes transductively on GAICD photos whose scores the base model never saw.

The base model is one trained with a held-out GAICD slice (benchmarks/ablation.py --save-models writes it and
lists the slice in its JSON). Each scheme fine-tunes that model on the held-out photos alone (photos only: no
scores), then `smartcrop eval` scores it on those same photos' human scores, and on FCDB test (drift check):

* ``base``: no fine-tuning;
* ``rc``: rank consistency alone (``--distill 0``): the paper's loss with no anchor;
* ``rc+distill``: rank consistency + distillation to the base model's scores (the default);
* ``rc+gaicd``: rank consistency + the labeled GAICD images the base model was trained on (``--labeled``);
* ``rc+fcdb``: rank consistency + FCDB's training crops (``--labeled``).

Everything goes through the CLI, so the numbers are what a user gets.

    python benchmarks/finetune_eval.py --base runs/ablation/saf_rc.safetensors --split-json runs/ablation.json \\
        --out runs/finetune_eval.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCHEMES = {
    "rc": ["--distill", "0"],
    "rc+distill": [],
    "rc+gaicd": ["--labeled", "{train_root}"],
    "rc+fcdb": ["--labeled", "{fcdb}"],
}


def mini_gaicd(src: Path, stems: list[str], dest: Path, split: str) -> Path:
    """A GAICD-layout folder holding only the images ``stems`` of the dev split (symlinks)."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "images" / split).mkdir(parents=True)
    (dest / "annotations" / split).mkdir(parents=True)
    files = {p.stem: p for p in (src / "images" / "dev").iterdir()}
    for stem in stems:
        img = files[stem]
        (dest / "images" / split / img.name).symlink_to(img.resolve())
        (dest / "annotations" / split / f"{stem}.txt").symlink_to((src / "annotations" / "dev" / f"{stem}.txt").resolve())
    return dest


def cli(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "smartcrop.cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"smartcrop {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--split-json", type=Path, required=True, help="ablation JSON listing the held-out slice")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--work", type=Path, default=Path("runs/finetune_eval"))
    ap.add_argument("--out", type=Path, default=Path("runs/finetune_eval.json"))
    args = ap.parse_args(argv)

    gaicd = args.data / "gaicd"
    val = json.loads(args.split_json.read_text())["val_gaicd"]
    dev = sorted(p.stem for p in (gaicd / "images" / "dev").iterdir() if not p.name.startswith("."))
    args.work.mkdir(parents=True, exist_ok=True)
    val_root = mini_gaicd(gaicd, val, args.work / "gaicd_heldout", "heldout")
    train_root = mini_gaicd(gaicd, [n for n in dev if n not in set(val)], args.work / "gaicd_train", "train")
    album = val_root / "images" / "heldout"

    def evaluate(weights: Path) -> dict:
        g = json.loads(cli("eval", "gaicd", val_root, "--split", "heldout", "--weights", weights, "--json"))
        f = json.loads(cli("eval", "fcdb", args.data / "fcdb", "--ratio", "any", "--weights", weights, "--json"))
        return {"gaicd_heldout": g, "fcdb_test_any_iou": f["iou"]}

    res = {"base": str(args.base), "n_heldout": len(val), "epochs": args.epochs, "schemes": {}}
    res["schemes"]["base"] = evaluate(args.base)
    print(f"base: {json.dumps(res['schemes']['base'])}", file=sys.stderr, flush=True)
    for name in args.schemes.split(","):
        extra = [a.format(train_root=train_root, fcdb=args.data / "fcdb") for a in SCHEMES[name]]
        out = args.work / f"{name.replace('+', '_')}.safetensors"
        t = time.perf_counter()
        cli("finetune", album, "-o", out, "--weights", args.base, "--epochs", args.epochs, "--force", *extra)
        seconds = time.perf_counter() - t
        card = json.loads(out.with_suffix(".json").read_text())
        rec = evaluate(out)
        rec["finetune_seconds"] = round(seconds, 1)
        rec["epoch_seconds"] = [h["seconds"] for h in card["finetune"]["history"]]
        res["schemes"][name] = rec
        print(f"{name}: {json.dumps(rec)}", file=sys.stderr, flush=True)
        args.out.write_text(json.dumps(res, indent=1))
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
