"""Face cuts of free-ratio crops, with ../shared/tools/face_cut.py's face detector and rule.

face_cut.py counts crops of 16:9, 1:1 and 4:5; this counts `smartcrop run --ratio any` crops the same way: of the
photos with a detected face (OpenCV's Haar cascade, as there), how many crops leave a face less than 90 % inside,
and the crops' mean share of the photo, for each run given::

    smartcrop run ../shared/data/unlabeled --ratio any --json --dry-run --free-grid gaic > runs/free_gaic.jsonl
    smartcrop run ../shared/data/unlabeled --ratio any --json --dry-run --free-grid border > runs/free_border.jsonl
    python benchmarks/free_face_cut.py ../shared/data/unlabeled runs/free_gaic.jsonl runs/free_border.jsonl

Needs opencv-python-headless<5 (the `faces` extra).  face_cut.py's libvips comparison is not used (pyvips is not
needed).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.modules.setdefault("pyvips", types.ModuleType("pyvips"))  # imported by face_cut.py, used only for vips
    sys.path.insert(0, str(TOOLS))
    from face_cut import faces, inside

    photos = Path(args[0])
    runs = {}
    for f in args[1:]:
        with open(f) as fh:
            runs[Path(f).stem] = {Path(r["input"]).name: r for r in map(json.loads, fh) if "box" in r}
    cut = {k: 0 for k in runs}
    area: dict = {k: [] for k in runs}
    n = 0
    for p in sorted(photos.iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        im = ImageOps.exif_transpose(Image.open(p))
        fs = faces(im)
        if not fs:
            continue
        n += 1
        for k, recs in runs.items():
            b = np.array(recs[p.name]["box"], float)
            cut[k] += any(inside(f, b) < 0.9 for f in fs)
            area[k].append((b[2] - b[0]) * (b[3] - b[1]) / (im.width * im.height))
    print(json.dumps({"with_faces": n, **{k: {"cut": f"{cut[k]}/{n}", "rate": round(cut[k] / max(n, 1), 3),
                                            "mean_area": round(float(np.mean(area[k])), 3)} for k in runs}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
