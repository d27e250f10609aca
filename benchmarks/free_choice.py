"""Inference-time ways of choosing a free crop on the border grid, measured on fold models against FCDB's experts.

Step 1 scores, once per model, every photo's candidates of a wide grid (edges 0-4 twelfths of the side in from
each border, at least 30 % of the photo, aspect within (0.5, 2)): the border grid `run` uses and its variants
are subsets of it.  ``--mode tta`` scores the mirrored image too (``Cropper(tta=True)``), ``--mode s288`` at a
short side of 288 instead of the model's 256::

    python benchmarks/free_choice.py score --fcdb heldout=runs/validate/data/fcdb_heldout:test \\
        --fcdb dev=../shared/data/fcdb:test --out runs/free_choice/plain \\
        runs/validate/runs/ref11/fold*_seed0/model.safetensors
    python benchmarks/free_choice.py score --mode tta ... --out runs/free_choice/tta ...
    python benchmarks/free_choice.py report runs/free_choice/plain [--alt tta=runs/free_choice/tta ...]

Step 2 (``report``) compares, per model and photo set, each variant's mean IoU of the chosen crop with the
expert's against the border grid as ``run`` chooses (edges 0-3 twelfths in, at least half the photo, at most
90 %, the mean of the 3 best overlapping anchors): the 90 % cap, the minimum share, the depth, the number of
anchors voted; the fold models' z-scored ensemble; a geometric prior fitted on one set and applied to the other;
and each ``--alt`` scoring alone and averaged with the plain one (z-scores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from box_fusion import fcdb_sets  # benchmarks/ is on the path when run as a script
from smartcrop.anchors import BORDER_MAX_SHARE, GRID_BINS as BINS
from smartcrop.cropper import FUSE_K

# the border grid (edges 0..BINS//3 - 1 twelfths in, at least half the photo, the cap) and box voting as `run` does
REF = dict(depth=BINS // 3, amin=0.5, cap=BORDER_MAX_SHARE, k=FUSE_K)


def wide_grid(w: int, h: int, depth: int = 5) -> np.ndarray:
    """Every box whose edges lie 0..depth-1 twelfths in from their borders, >= 30 % of the photo, aspect (0.5, 2):
    the border grid's walk (``anchors._grid_anchors`` on the grid's lines) one twelfth deeper and without its caps."""
    from smartcrop.anchors import _grid_anchors

    return np.asarray(_grid_anchors(w, h, BINS, 0.0, corner=depth, min_share=0.3), np.float32)


def score(args) -> None:
    import dataclasses

    import torch

    from smartcrop import Cropper
    from smartcrop.evaluate import decoded_items

    torch.set_num_threads(1)
    sets = fcdb_sets(args.fcdb)
    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    for mi, m in enumerate(args.models):
        c = Cropper(m, device="cpu", tta=args.mode == "tta")
        if args.mode.startswith("s"):
            side = int(args.mode[1:])
            c.config = dataclasses.replace(c.config, short_side=side, max_long_side=3 * side)
        for name, items in sets.items():
            boxes, scores, n, gt, size, photos = [], [], [], [], [], []
            for item, li in decoded_items(c, items, name, False, None):
                w, h = li.full_size
                b = wide_grid(w, h)
                boxes.append(b)
                scores.append(c.score_boxes_batch([(li.image, (w, h))], [{"x": b}])[0]["x"])
                n.append(len(b))
                gt.append(item.box)
                size.append((w, h))
                photos.append(Path(item.image_path).name)
            f = args.out / f"m{mi}_{name}.npz"
            np.savez(f, boxes=np.concatenate(boxes), scores=np.concatenate(scores), n=np.asarray(n),
                     gt=np.asarray(gt, np.float64), size=np.asarray(size), photos=np.asarray(photos))
            index.append({"model": str(m), "set": name, "file": f.name})
            print(f"{m} {name}: {len(n)} photos", flush=True)
    (args.out / "index.json").write_text(json.dumps({"mode": args.mode, "runs": index}, indent=1) + "\n")


def load(folder: Path) -> dict:
    """(model, set) → list of photo dicts: boxes, scores, gt, w, h."""
    out = {}
    for run in json.loads((folder / "index.json").read_text())["runs"]:
        z = np.load(folder / run["file"])
        ends = np.cumsum(z["n"])
        rows = []
        for i, end in enumerate(ends):
            start = end - z["n"][i]
            rows.append({"boxes": z["boxes"][start:end], "scores": z["scores"][start:end], "gt": z["gt"][i],
                         "w": int(z["size"][i][0]), "h": int(z["size"][i][1]), "photo": str(z["photos"][i])})
        out[(run["model"], run["set"])] = rows
    return out


def edges_in(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """Each box's left, top, right, bottom edge in twelfths of the side in from its border."""
    return np.stack([np.rint(boxes[:, 0] / w * BINS), np.rint(boxes[:, 1] / h * BINS),
                     BINS - np.rint(boxes[:, 2] / w * BINS), BINS - np.rint(boxes[:, 3] / h * BINS)], 1)


def subset(row: dict, depth: int, amin: float, cap: float, scores=None):
    b, w, h = row["boxes"], row["w"], row["h"]
    s = row["scores"] if scores is None else scores
    share = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
    m = (edges_in(b, w, h).max(1) < depth) & (share > amin - 1e-4) & (share <= cap + 1e-6)
    return b[m], s[m], m


def chosen_iou(row: dict, depth=REF["depth"], amin=REF["amin"], cap=REF["cap"], k=REF["k"], scores=None) -> float:
    from smartcrop.cropper import fuse_box
    from smartcrop.metrics import iou

    b, s, _ = subset(row, depth, amin, cap, scores)
    return iou(fuse_box(b, s, int(np.argmax(s)), k), row["gt"])


def zscore(s: np.ndarray) -> np.ndarray:
    return (s - s.mean()) / (s.std() + 1e-9)


def prior_features(row: dict) -> tuple:
    """Per border-grid anchor (as `run`): its box, z-scored model score, geometric features, IoU with the
    expert's crop."""
    from smartcrop.anchors import box_iou_matrix

    b, s, _ = subset(row, REF["depth"], REF["amin"], REF["cap"])
    w, h = row["w"], row["h"]
    e = edges_in(b, w, h)
    cw, ch = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    feats = np.stack([cw * ch / (w * h), (e[:, 0] == 0) + (e[:, 2] == 0), (e[:, 1] == 0) + (e[:, 3] == 0),
                      np.log(cw / ch / (w / h)), np.abs((b[:, 0] + b[:, 2]) / (2 * w) - 0.5),
                      np.abs((b[:, 1] + b[:, 3]) / (2 * h) - 0.5), (e[:, [0, 2]] == 0).all(1),
                      (e[:, [1, 3]] == 0).all(1)], 1).astype(np.float32)
    y = box_iou_matrix(b, row["gt"][None].astype(np.float32))[:, 0]
    return b, zscore(s), feats, y


def fit_prior(rows: list, temperature: float = 0.3, l2: float = 0.01, steps: int = 300):
    """Weights a, θ maximising the expected IoU under softmax((a·z + F·θ) / T) over each photo's anchors."""
    import torch

    torch.manual_seed(0)
    data = [tuple(torch.tensor(x) for x in prior_features(r)[1:]) for r in rows]
    th = torch.zeros(data[0][1].shape[1], requires_grad=True)
    a = torch.ones(1, requires_grad=True)
    opt = torch.optim.Adam([th, a], lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        loss = -sum((torch.softmax((a * z + f @ th) / temperature, 0) * y).sum() for z, f, y in data) / len(data)
        (loss + l2 * (th ** 2).sum()).backward()
        opt.step()
    return float(a.detach()), th.detach().numpy()


def prior_iou(row: dict, a: float, th: np.ndarray, k: int = 3) -> float:
    from smartcrop.cropper import fuse_box
    from smartcrop.metrics import iou

    b, z, f, _ = prior_features(row)
    u = a * z + f @ th
    return iou(fuse_box(b, u, int(np.argmax(u)), k), row["gt"])


def paired(name: str, values: dict, ref: dict, sets: list, out: list) -> None:
    """One report line: per set, the variant's mean IoU and its mean change against ``ref`` over the models."""
    line = {"variant": name}
    text = f"{name:34s}"
    for st in sets:
        ms = [m for m in values if m[1] == st]
        d = [values[m] - ref[m] for m in ms]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        line[st] = {"iou": round(statistics.mean(values[m] for m in ms), 4), "change": round(statistics.mean(d), 4),
                    "sd": round(sd, 4), "won": sum(x > 0 for x in d), "models": len(d)}
        text += f" | {st} {line[st]['iou']:.4f} {line[st]['change']:+.4f} ± {sd:.4f} ({line[st]['won']}/{len(d)})"
    out.append(line)
    print(text, flush=True)


def report(args) -> None:
    data = load(args.plain)
    sets = list(dict.fromkeys(st for _, st in data))
    models = list(dict.fromkeys(m for m, _ in data))

    def mean_iou(key, **kw):
        return statistics.mean(chosen_iou(r, **kw) for r in data[key])

    ref = {key: mean_iou(key) for key in data}
    out: list = []
    print("mean IoU with the expert's crop; change against the border grid as `run` chooses, sd over the models,"
          " models won")
    paired("border grid, as run (reference)", ref, ref, sets, out)
    variants = [("90 % cap → " + f"{c:.0%}", dict(cap=c)) for c in (0.75, 0.8, 0.95, 1.0)]
    variants += [(f"at least {a:.0%} of the photo", dict(amin=a)) for a in (0.3, 0.4)]
    variants += [("edges up to 4/12 in", dict(depth=5)), ("edges up to 4/12 in, >= 40 %", dict(depth=5, amin=0.4))]
    variants += [(f"vote over {k}", dict(k=k)) for k in (1, 2, 4, 5, 8)]
    for name, kw in variants:
        paired(name, {key: mean_iou(key, **kw) for key in data}, ref, sets, out)
    for st in sets:  # headroom: the best border-grid anchor, and the best among the model's top 5 and top 1
        best, top5, top1 = [], [], []
        for m in models:
            for r in data[(m, st)]:
                _, z, _, y = prior_features(r)
                order = np.argsort(-z)
                best.append(y.max())
                top5.append(y[order[:5]].max())
                top1.append(y[order[0]])
        out.append({"variant": "headroom", st: {"best_anchor": round(float(np.mean(best)), 4),
                                                "best_of_top5": round(float(np.mean(top5)), 4),
                                                "top1": round(float(np.mean(top1)), 4)}})
        print(f"headroom | {st}: the best border-grid anchor {np.mean(best):.4f}, the best of the model's top 5 "
              f"{np.mean(top5):.4f}, its top 1 {np.mean(top1):.4f} (means over the models' photos)")
    for st in sets:  # the fold models' ensemble: one value per set, paired with the models' mean
        keys = [(m, st) for m in models]
        ens = statistics.mean(chosen_iou(r, scores=np.mean([zscore(data[k][i]["scores"]) for k in keys], 0))
                              for i, r in enumerate(data[keys[0]]))
        mean = statistics.mean(ref[k] for k in keys)
        out.append({"variant": "ensemble of the models (z-scores)", st: {"iou": round(ens, 4),
                                                                          "models_mean": round(mean, 4)}})
        print(f"ensemble of the {len(keys)} models (z-scores) | {st} {ens:.4f} against their mean {mean:.4f}")
    for fit_set in sets:  # a geometric prior fitted on one set (every model's scores), applied to each
        a, th = fit_prior([r for m in models for r in data[(m, fit_set)]])
        paired(f"prior fitted on {fit_set}", {key: statistics.mean(prior_iou(r, a, th) for r in data[key])
                                              for key in data}, ref, sets, out)
    for alt in args.alt:
        name, folder = alt.split("=", 1)
        other = load(Path(folder))
        for how in ("alone", "averaged"):
            vals = {}
            for key, rows in data.items():
                alt_rows = other[key]
                vals[key] = statistics.mean(
                    chosen_iou(r, scores=alt_rows[i]["scores"] if how == "alone"
                               else zscore(r["scores"]) + zscore(alt_rows[i]["scores"]))
                    for i, r in enumerate(rows))
            paired(f"{name} {how}", vals, ref, sets, out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("models", nargs="+", type=Path)
    s.add_argument("--fcdb", action="append", required=True, help="NAME=ROOT:SPLIT")
    s.add_argument("--mode", default="plain", help="plain, tta (mirrored image too) or sN (short side N)")
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("report")
    r.add_argument("plain", type=Path)
    r.add_argument("--alt", action="append", default=[], help="NAME=FOLDER of another scoring of the same models")
    r.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    mode = getattr(args, "mode", "plain")
    if not (mode in ("plain", "tta") or (mode[:1] == "s" and mode[1:].isdigit())):
        ap.error(f"--mode must be plain, tta or sN, not {args.mode!r}")
    score(args) if args.cmd == "score" else report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
