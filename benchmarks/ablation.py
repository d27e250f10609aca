"""The paper's ablation on our data: basic model, + spatial-aware feature, + rank consistency, both.

All four variants train on the same prepared images (the frozen backbone prefix is computed once) with the
same seed and schedule, validate on the same held-out GAICD slice and FCDB slice, and are then evaluated on
the FCDB test split.  Results go to a JSON file (and are summarised in docs/results.md).

    python benchmarks/ablation.py --data ../shared/data --epochs 5 --out runs/ablation.json

Variants are ``basic``, ``saf``, ``rc``, ``saf+rc``, optionally with options after ``@``: ``@fw=W`` (FCDB
loss weight), ``@fl=iou`` (FCDB IoU regressed as a score instead of ranked), ``@nofcdb`` (no FCDB photos).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--backbone-weights", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr-step", type=int, default=4)
    ap.add_argument("--fcdb-per-epoch", type=int, default=400)
    ap.add_argument("--fcdb-weight", type=float, default=0.5)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--fold", type=int, default=None, help="which 1/k slice of GAICD dev (by name) is held out; "
                    "default: the slice `smartcrop train --val-fraction` holds out")
    ap.add_argument("--variants", default="basic,saf,rc,saf+rc")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation.json"))
    ap.add_argument("--save-models", type=Path, default=None, help="folder to save each variant's model")
    args = ap.parse_args(argv)

    import torch

    from smartcrop.cropper import Cropper
    from smartcrop.data import list_images, read_fcdb, read_gaicd
    from smartcrop.evaluate import evaluate_fcdb, evaluate_gaicd
    from smartcrop.model import ModelConfig, SACNet
    from smartcrop.training import TrainConfig, TrainData, Trainer, prepare_samples, split_validation, validate
    from smartcrop.weights import load_backbone_weights, save_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    d = args.data
    data = TrainData(gaicd=read_gaicd(d / "gaicd", "dev"), fcdb=read_fcdb(d / "fcdb", "train"),
                     unlabeled=list_images([d / "unlabeled", d / "gaicd" / "images" / "holdout"]))
    if args.fold is None:
        data.gaicd, data.val_gaicd = split_validation(data.gaicd, args.val_fraction)
    else:  # every k-th image by name, starting at --fold (fold k // 2 is split_validation's slice)
        k = max(2, int(round(1 / args.val_fraction)))
        val = {it.name for it in sorted(data.gaicd, key=lambda it: it.name)[args.fold::k]}
        data.val_gaicd = [it for it in data.gaicd if it.name in val]
        data.gaicd = [it for it in data.gaicd if it.name not in val]
    data.fcdb, data.val_fcdb = split_validation(data.fcdb, args.val_fraction / 2)
    fcdb_test = read_fcdb(d / "fcdb", "test")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    base = SACNet(ModelConfig(saf=True))
    load_backbone_weights(base, args.backbone_weights)
    t0 = time.time()
    prep = Trainer(base, TrainConfig())
    g, f, u, _ = prepare_samples(prep, data, log, progress=False)
    log(f"prepared {len(g)} + {len(f)} + {len(u)} images in {time.time() - t0:.0f} s")

    results = {"args": {k: str(v) for k, v in vars(args).items()}, "val_gaicd": [it.name for it in data.val_gaicd],
               "variants": {}}
    for variant in args.variants.split(","):
        # "saf+rc", "saf+rc@fw=1.0" (its own FCDB loss weight), "saf+rc@fl=iou" (FCDB IoU regressed as a
        # score instead of ranked), "saf+rc@nofcdb" (no FCDB photos; GAICD repeated as often as with them)
        name, *opts = variant.split("@")
        opt = dict(o.partition("=")[::2] for o in opts)
        saf = "saf" in name.split("+")
        rc = "rc" in name.split("+")
        fcdb_weight = float(opt["fw"]) if "fw" in opt else args.fcdb_weight
        fcdb_loss = opt.get("fl", "rank")
        torch.manual_seed(0)
        net = SACNet(ModelConfig(saf=saf))
        load_backbone_weights(net, args.backbone_weights)
        cfg = TrainConfig(epochs=args.epochs, lr_step=args.lr_step, saf=saf, rc=rc,
                          fcdb_per_epoch=args.fcdb_per_epoch, fcdb_weight=fcdb_weight, fcdb_loss=fcdb_loss)
        tr = Trainer(net, cfg, "cpu", log)
        g_v, f_v = g, f
        if "nofcdb" in opt:  # the GAICD images as many times per epoch as they would come with FCDB
            n_fcdb = min(len(f), args.fcdb_per_epoch) if args.fcdb_per_epoch else len(f)
            g_v, f_v = g * tr.gaicd_repeats(len(g), n_fcdb), []
        hist = []
        for _ in range(cfg.epochs):
            rec = tr.train_epoch(tr.epoch_plan(g_v, f_v), u)
            rec["val"] = validate(net, data, "cpu")
            hist.append(rec)
            log(f"[{variant}] epoch {rec['epoch']} {rec['seconds']:.0f}s loss {rec['loss']} val {rec['val']}")
        net.eval()
        cropper = Cropper(net=net, device="cpu")
        res = {"history": hist, "config": asdict(cfg),
               "val_gaicd": evaluate_gaicd(cropper, data.val_gaicd, progress=False),
               "fcdb_test_any": evaluate_fcdb(cropper, fcdb_test, "any", progress=False),
               "fcdb_test_gt": evaluate_fcdb(cropper, fcdb_test, "gt", progress=False)}
        results["variants"][variant] = res
        log(f"[{variant}] final {json.dumps({k: v for k, v in res.items() if k not in ('history', 'config')})}")
        if args.save_models:
            save_model(net, args.save_models / f"{variant.replace('+', '_').replace('@', '_').replace('=', '')}.safetensors",
                       {"training": {"ablation": variant, "config": asdict(cfg)}})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
