"""Copy the shared data folder with every photo downscaled to a short side of 256 px (the network's input size),
and every label rescaled with it, so that a whole training/benchmark set fits in a few tens of MB (e.g. to carry
it to a GPU machine).

    python benchmarks/shrink_data.py ../shared/data .devdata/data [--short-side 256] [--quality 88]

Layouts are kept (``gaicd/images/{dev,holdout}``, ``gaicd/annotations/dev``, ``fcdb/images`` with both json
lists, ``unlabeled``), so ``smartcrop train/eval`` and ``benchmarks/validate.py --data`` read the copy unchanged.
GAICD annotation boxes and FCDB crops are multiplied by the photo's own scale factors (x and y separately, since
rounding makes them differ slightly).  Photos already at or under the short side are copied byte for byte with
their labels unchanged.  Nothing in the source is modified.  ``--weights W`` also writes W (a torchvision-layout
MobileNetV2 ``state_dict``) without its unused ImageNet classifier to ``DEST/../weights/``.  JPEGs are written with
optimised Huffman tables (smaller files, the same pixels).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image, ImageOps



def shrink(src: Path, dst: Path, short: int, quality: int) -> tuple[float, float]:
    """Write ``src`` downscaled to short side ``short`` as ``dst`` (JPEG); the x and y scale factors."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im
        w, h = im.size
        if min(w, h) <= short:
            shutil.copyfile(src, dst)
            return 1.0, 1.0
        s = short / min(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        im.convert("RGB").resize((nw, nh), Image.LANCZOS).save(dst, quality=quality, optimize=True)
        return nw / w, nh / h


def photos(folder: Path) -> list[Path]:
    """The photos smartcrop itself reads from ``folder`` (``smartcrop.data.list_images``, recursive)."""
    from smartcrop.data import list_images

    return list_images([folder])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="the shared data folder (gaicd/, fcdb/, unlabeled/)")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--quality", type=int, default=88)
    ap.add_argument("--weights", type=Path, default=None, help="also copy this file into DEST/../weights/")
    args = ap.parse_args(argv)
    src, dst, short, q = args.source, args.dest, args.short_side, args.quality
    n = 0
    for split in ("dev", "holdout"):
        img_dir = src / "gaicd" / "images" / split
        if not img_dir.is_dir():
            continue
        for p in photos(img_dir):
            sx, sy = shrink(p, dst / "gaicd" / "images" / split / p.relative_to(img_dir), short, q)
            n += 1
            ann = src / "gaicd" / "annotations" / split / f"{p.stem}.txt"
            if ann.is_file():
                out = dst / "gaicd" / "annotations" / split / ann.name
                out.parent.mkdir(parents=True, exist_ok=True)
                lines = []
                for line in ann.read_text().splitlines():
                    parts = line.split()
                    if len(parts) != 5:
                        lines.append(line)
                        continue
                    y1, x1, y2, x2, m = (float(v) for v in parts)
                    lines.append(f"{y1 * sy:.3f} {x1 * sx:.3f} {y2 * sy:.3f} {x2 * sx:.3f} {parts[4]}")
                out.write_text("\n".join(lines) + "\n")
    fcdb = src / "fcdb"
    if fcdb.is_dir():
        scale = {}
        for p in photos(fcdb / "images"):
            scale[p.name] = shrink(p, dst / "fcdb" / "images" / p.relative_to(fcdb / "images"), short, q)
            n += 1
        for js in ("cropping_training_set.json", "cropping_testing_set.json"):
            if not (fcdb / js).is_file():
                continue
            entries = json.loads((fcdb / js).read_text())
            for e in entries:
                sx, sy = scale.get(str(e["url"]).rstrip("/").rsplit("/", 1)[-1], (1.0, 1.0))
                x, y, w, h = (float(v) for v in e["crop"])
                e["crop"] = [x * sx, y * sy, w * sx, h * sy]
            (dst / "fcdb" / js).write_text(json.dumps(entries))
    if (src / "unlabeled").is_dir():
        for p in photos(src / "unlabeled"):
            shrink(p, dst / "unlabeled" / p.relative_to(src / "unlabeled"), short, q)
            n += 1
    if args.weights:  # the ImageNet classifier is never used (model.backbone_state drops it): leave it out
        import torch

        (dst.parent / "weights").mkdir(parents=True, exist_ok=True)
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        torch.save({k: v for k, v in state.items() if not k.startswith("classifier.")},
                   dst.parent / "weights" / args.weights.name)
    size = sum(f.stat().st_size for f in dst.parent.rglob("*") if f.is_file())
    print(f"wrote {n} photos to {dst} ({size / 2**20:.1f} MiB with the weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
