"""Adapting a model to a personal album: rank consistency on the user's own (unlabeled) photos.

The album's photos go through the frozen backbone once (plain and mirrored) and their image features are
cached.  Then, per photo and step, ``N`` anchors are sampled and

* the rank-consistency hinge ``max(0, δ + sign(p_ij − 0.5)(ŷ_j − ŷ_i))`` over all pairs makes the score head
  agree with the (frozen) pairwise ranking head, which carries what was learned from labeled crops;
* an anchoring term keeps the model from drifting: with ``--labeled`` data, the labeled losses of training on
  that data; otherwise a distillation term, the mean squared difference between the adapted and the base
  model's scores of the same anchors.

Only the region/spatial encoders and the score head are updated; the backbone and the ranking head stay fixed.
docs/finetune.md has the measurements behind these choices.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .anchors import gaic_anchors

MIN_PHOTOS = 4


class AlbumError(Exception):
    """The album cannot be used (too few readable photos); one-line message."""


@dataclass
class FinetuneConfig:
    epochs: int = 3
    lr: float = 5e-5
    weight_decay: float = 1e-4
    anchors: int = 16  # N anchors per photo and step
    delta: float = 0.1
    distill: float = 1.0  # weight of the anchoring term to the base model's scores (no labeled data)
    labeled_weight: float = 1.0
    steps_per_photo: int = 1
    seed: int = 0


@dataclass
class AlbumPhoto:
    name: str
    size: tuple  # network input (w, h)
    feats: list  # [plain, mirrored] ImageFeatures, detached
    anchors: np.ndarray  # GAIC anchors in network pixels
    base: list  # base model scores of the anchors, [plain, mirrored]
    targets: np.ndarray | None = None  # labeled: normalised MOS or IoU
    kind: str = "album"  # album | gaicd | fcdb


def _trainable(net) -> list:
    names = ("region_fc.", "saf_conv1.", "saf_conv2.", "saf_fc.", "score_head.")
    params = []
    for n, p in net.named_parameters():
        p.requires_grad_(n.startswith(names))
        if p.requires_grad:
            params.append(p)
    return params


def _flip(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def cache_photos(net, sources: Sequence, log: Callable[[str], None], progress=None, device: str = "cpu",
                 kind: str = "album", labels: Sequence | None = None) -> list[AlbumPhoto]:
    """Decode, run the frozen backbone (plain and mirrored) and keep the image features and base scores."""
    import torch

    from .cropper import image_tensor, network_size
    from .imageio import ImageError, load_image
    from .progress import progress_bar
    from .training import MOS_MEAN, MOS_STD, fcdb_candidates

    cfg = net.config
    out: list[AlbumPhoto] = []
    net.eval()
    with progress_bar(len(sources), f"reading {kind} photos", progress) as bar, torch.no_grad():
        for k, src in enumerate(sources):
            path = getattr(src, "image_path", src)
            try:
                li = load_image(path, target_short_side=cfg.short_side)
            except ImageError as e:
                log(f"warning: skipping {path}: {e}")
                bar.advance()
                continue
            fw, fh = li.full_size
            w, h = network_size(fw, fh, cfg.short_side, cfg.max_long_side)
            x = image_tensor(li.image, (w, h)).to(device)
            sx, sy = w / fw, h / fh
            targets = None
            if kind == "gaicd":
                anchors = src.boxes * np.array([sx, sy, sx, sy], np.float32)
                targets = (src.mos - MOS_MEAN) / MOS_STD
            elif kind == "fcdb":
                cands, ious = fcdb_candidates(fw, fh, src.box)
                anchors = cands * np.array([sx, sy, sx, sy], np.float32)
                targets = ious
            else:
                anchors = gaic_anchors(w, h)
            anchors = anchors.astype(np.float32)
            feats, base = [], []
            for flip in (False, True):
                f = net.image_features(x.flip(-1) if flip else x)
                b = _flip(anchors, w) if flip else anchors
                base.append(net.score_boxes(f, torch.from_numpy(b).to(device)).cpu().numpy())
                feats.append(f)
            out.append(AlbumPhoto(Path(path).name, (w, h), feats, anchors, base, targets, kind))
            bar.advance()
    return out


class Finetuner:
    def __init__(self, net, cfg: FinetuneConfig, device: str = "cpu"):
        import torch

        self.torch = torch
        self.net = net
        self.cfg = cfg
        self.device = device
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.opt = torch.optim.Adam(_trainable(net), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.epoch = 0
        self.history: list[dict] = []

    def photo_loss(self, ph: AlbumPhoto) -> dict:
        from .training import pair_indices, rank_consistency_loss

        torch = self.torch
        F = torch.nn.functional
        cfg = self.cfg
        flip = int(self.rng.random() < 0.5)
        boxes = _flip(ph.anchors, ph.size[0]) if flip else ph.anchors
        n = len(boxes)
        idx = self.rng.choice(n, min(cfg.anchors if ph.kind == "album" else 32, n), replace=False)
        cf = self.net.crop_features(ph.feats[flip], torch.from_numpy(boxes[idx]).to(self.device))
        y = self.net.score_features(cf)
        parts = {}
        if ph.kind == "album" and len(idx) >= 2:
            ii, jj = np.triu_indices(len(idx), 1)
            ti, tj = torch.from_numpy(ii).to(self.device), torch.from_numpy(jj).to(self.device)
            with torch.no_grad():
                logits = self.net.rank_logits(cf[ti], cf[tj])
            parts["rc"] = rank_consistency_loss((y[ti], y[tj]), logits, cfg.delta)
            if cfg.distill > 0:
                base = torch.from_numpy(ph.base[flip][idx]).to(self.device)
                parts["distill"] = cfg.distill * F.mse_loss(y, base)
        elif ph.kind == "album":
            pass  # a single anchor (extreme panorama): nothing to compare
        elif ph.kind == "gaicd":
            t = torch.from_numpy(ph.targets[idx].astype(np.float32)).to(self.device)
            parts["labeled"] = cfg.labeled_weight * F.smooth_l1_loss(y, t)
        else:  # fcdb: margin ranking on IoU pairs
            t = ph.targets[idx]
            pairs = pair_indices(t, 0.2, 256, self.rng)
            if len(pairs):
                pi = torch.from_numpy(pairs[:, 0]).to(self.device)
                pj = torch.from_numpy(pairs[:, 1]).to(self.device)
                sign = torch.from_numpy(np.where(t[pairs[:, 0]] > t[pairs[:, 1]], 1.0, -1.0).astype(np.float32))
                parts["labeled"] = cfg.labeled_weight * torch.relu(0.25 - sign.to(self.device) * (y[pi] - y[pj])).mean()
        return parts

    def train_epoch(self, album: Sequence[AlbumPhoto], labeled: Sequence[AlbumPhoto] = (), bar=None) -> dict:
        self.net.train()
        sums: dict[str, float] = {}
        t0 = time.time()
        order = np.concatenate([self.rng.permutation(len(album)) for _ in range(self.cfg.steps_per_photo)])
        for step, i in enumerate(order):
            parts = self.photo_loss(album[i])
            if labeled:
                parts.update(self.photo_loss(labeled[int(self.rng.integers(len(labeled)))]))
            if not parts:
                continue
            loss = sum(parts.values())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if bar is not None:
                bar.advance(1, status=" ".join(f"{k} {v / (step + 1):.4f}" for k, v in sums.items()))
        self.epoch += 1
        self.net.eval()
        rec = {"epoch": self.epoch, "seconds": round(time.time() - t0, 2), "photos": len(album),
               "loss": {k: v / max(1, len(order)) for k, v in sums.items()}}
        self.history.append(rec)
        return rec

    def save_checkpoint(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        self.torch.save({"model": self.net.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch,
                         "history": json.dumps(self.history), "rng": json.dumps(self.rng.bit_generator.state)}, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path) -> None:
        st = self.torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.epoch = int(st["epoch"])
        self.history = json.loads(st["history"])
        self.rng.bit_generator.state = json.loads(st["rng"])


def labeled_sources(root: Path) -> tuple[str, list]:
    """(kind, items) of a GAICD-layout (every split with annotations) or FCDB-layout (training list) folder."""
    from .data import gaicd_splits, read_fcdb, read_gaicd

    root = Path(root)
    if (root / "annotations").is_dir():
        items = []
        for split in gaicd_splits(root):
            if (root / "images" / split).is_dir():
                items += read_gaicd(root, split)
        return "gaicd", items
    if (root / "cropping_training_set.json").is_file():
        return "fcdb", read_fcdb(root, "train")
    raise AlbumError(f"{root}: neither a GAICD layout (images/, annotations/) nor an FCDB one (cropping_*_set.json)")


def finetune(net, photos: Sequence[Path], cfg: FinetuneConfig, labeled_root: Path | None = None,
             checkpoint: Path | None = None, resume: Path | None = None, device: str = "cpu",
             log: Callable[[str], None] = print, progress=None, max_labeled: int = 400):
    """Fine-tune ``net`` in place on ``photos``; returns the list of epoch records."""
    from .progress import progress_bar

    net.to(device)
    album = cache_photos(net, list(photos), log, progress, device)
    if len(album) < MIN_PHOTOS:
        raise AlbumError(f"only {len(album)} usable photo(s) in the album: at least {MIN_PHOTOS} are needed "
                         f"(dozens or more give a useful adaptation)")
    labeled: list = []
    if labeled_root is not None:
        kind, items = labeled_sources(labeled_root)
        if len(items) > max_labeled:
            rng = np.random.default_rng(cfg.seed)
            items = [items[i] for i in sorted(rng.choice(len(items), max_labeled, replace=False))]
        labeled = cache_photos(net, items, log, progress, device, kind=kind)
        if not labeled:
            raise AlbumError(f"{labeled_root}: no usable labeled photos")
        cfg = FinetuneConfig(**{**asdict(cfg), "distill": 0.0})
    ft = Finetuner(net, cfg, device)
    if resume is not None:
        ft.load_checkpoint(resume)
        log(f"resumed from {resume} after epoch {ft.epoch}")
    while ft.epoch < cfg.epochs:
        with progress_bar(len(album) * cfg.steps_per_photo, f"fine-tune epoch {ft.epoch + 1}/{cfg.epochs}",
                          progress, status=True) as bar:
            rec = ft.train_epoch(album, labeled, bar)
        if checkpoint is not None:
            ft.save_checkpoint(checkpoint)
        log(f"epoch {rec['epoch']}: {rec['seconds']:.1f} s over {rec['photos']} photos, "
            + " ".join(f"{k}={v:.4f}" for k, v in rec["loss"].items()))
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    return ft.history


def adapt_cropper(cropper, photos: Sequence[Path], epochs: int = 2, log: Callable[[str], None] = print):
    """A new Cropper whose model is a copy of ``cropper``'s fine-tuned on ``photos`` (nothing is written)."""
    from .cropper import Cropper

    net = copy.deepcopy(cropper.net)
    log(f"adapting the model to {len(photos)} photos ({epochs} epochs)…")
    finetune(net, photos, FinetuneConfig(epochs=epochs), device=cropper.device, log=log)
    return Cropper(net=net, device=cropper.device)
