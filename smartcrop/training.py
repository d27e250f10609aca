"""Training: labeled GAICD-style scores, FCDB-style expert boxes, and rank consistency on unlabeled photos.

Each training step is one labeled image (GAICD-layout dense scores or an FCDB-layout expert box), plus one
unlabeled image for rank consistency when unlabeled photos are given; the losses are in
:mod:`smartcrop.losses`.

The backbone can be trained end to end (``frozen_layers=0``; photometric jitter and flips applied to the
image) or with its first ``frozen_layers`` layers frozen, in which case their outputs are computed once per
image and flip and cached in memory (fast on a CPU; photometric jitter is then not applied, unless
``jitter_views`` caches that many jittered copies of each labeled image).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .anchors import border_anchors, box_iou_matrix, flip_boxes, gaic_anchors, ratio_anchors, scale_boxes


@dataclass
class TrainConfig:
    epochs: int = 5
    lr: float = 1e-4
    backbone_lr_mult: float = 1.0
    weight_decay: float = 1e-4  # Adam's L2 term (the paper's); with adamw: decoupled, on weight matrices only
    adamw: bool = False  # AdamW: weight decay decoupled from the gradient, on conv/linear weights, not on biases/BN
    lr_step: int = 4  # multiply lr by 0.1 at this epoch (1-based count of finished epochs)
    crops_per_image: int = 64  # GAICD crops drawn per image and step (the paper's 64; >= its anchors: all)
    pairs_per_image: int = 256  # P
    eta: float = 0.5  # MOS gap of the pairs used by L_cls
    lambda_cls: float = 1.0
    gaicd_rank_weight: float = 0.0  # margin ranking loss on the score head over the GAICD pairs (0: off, the paper)
    centred_mos: float | None = None  # regress each image's MOS around its mean, this weight on the mean (None: off)
    top_weight: float = 0.0  # extra regression weight of each GAICD image's best quarter of crops (0: off)
    fcdb_weight: float = 0.5  # the shipped recipe since issue 11 (1.0 before: docs/results.md)
    fcdb_tau: float = 0.2  # IoU gap of the FCDB pairs
    fcdb_margin: float = 0.25  # margin of the FCDB ranking loss, in normalised MOS units
    fcdb_crops: int = 32
    fcdb_loss: str = "rank"  # "rank" (the method); "iou": smooth-L1 to IoU z-scored per image (ablation only)
    fcdb_border: bool = False  # FCDB's candidates also include border_anchors (fcdb_candidates)
    fcdb_listwise: float = 0.0  # weight (times fcdb_weight) of the listwise FCDB term (losses.listwise_loss); 0: off
    rc_weight: float = 1.0
    rc_anchors: int = 16  # N
    rc_delta: float = 0.1
    # distillation (with teacher models, see teacher_targets): smooth-L1 between the score head and the teachers'
    # combined score on distill_anchors anchors of each unlabeled photo a step (drawn with rank consistency's)
    distill_weight: float = 1.0
    distill_anchors: int = 16  # anchors per unlabeled photo and step for distillation (at least rc_anchors drawn)
    gaicd_share: float = 0.35  # GAICD images are repeated so they make up about this share of labeled steps
    fcdb_per_epoch: int = 400  # 0: all FCDB images each epoch; else a random subset of this size
    frozen_layers: int = 14
    jitter: float = 0.2
    # with a frozen prefix: also cache this many photometrically jittered copies (``jitter``) of each labeled
    # image (each plain and flipped; jittered by a generator of its own, from the seed, its name and size) and
    # draw one of the 1 + jitter_views views per use; 0 = off (no draw).
    # Unlabeled photos keep their one view.  End to end, every use is jittered anyway.
    jitter_views: int = 0
    seed: int = 0
    saf: bool = True
    rc: bool = True
    mos_mean: float = 2.95  # GAICD MOS normalisation (the GAIC code's figures)
    mos_std: float = 0.8
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and saved (0: off)
    batch_size: int = 1  # labeled images per optimiser step (and as many unlabeled ones); >1: see size_batches
    size_step: int = 0  # with batch_size > 1: network sizes rounded to multiples of this, so batches fill up
    amp: bool = False  # bfloat16 autocast on CUDA (ignored elsewhere)
    cudnn: bool = False  # cuDNN on CUDA: its first step at each new network size took 8–13 s (cropper.cuda_setup)
    # with batch_size > 1: every backbone pass has the shape (2 * batch_size, 3, h, w) of one network size —
    # part-filled batches are topped up with other images of their size and each step's unlabeled photos are
    # of the labeled batch's size, in the same pass — so a GPU meets a few dozen input shapes, not hundreds
    fixed_shapes: bool = False
    # scale augmentation (one-image steps only): besides the network size, each image is also prepared at these
    # multiples of it (e.g. (0.875, 1.125); a frozen prefix is cached for each) and every use draws one of the
    # sizes uniformly; () = off, and then no random number is drawn for it
    scales: tuple = ()
    # crop augmentation (GAICD images, one-image steps only): also prepare this many views of each GAICD image
    # cut down to a sub-rectangle — each side, with probability ½, moved in by up to ``crop_margin`` of the
    # photo's width or height — keeping the annotated crops that lie wholly inside it (with their MOS), drawn
    # from the image's own generator; drawn among with the scales (``Sample.alternates``). 0 = off.
    crop_views: int = 0
    crop_margin: float = 0.125

    def __post_init__(self) -> None:
        if self.top_weight > 0 and self.centred_mos is not None:
            raise ValueError("top_weight and centred_mos do not combine (one weights the crops, one centres them)")

    @classmethod
    def for_device(cls, device: str, backbone: str = "mobilenet_v2", **overrides) -> "TrainConfig":
        """The recipe for ``device``: on a CPU the backbone's layers through its stride-16 stage (MobileNetV2's
        first 14, EfficientNet-Lite0's first 12) are frozen and cached (fast), one
        image per step; on a GPU the whole network is trained, 8 images per step (one backbone pass per
        batch of equal-sized images; sizes rounded to multiples of 16, so the 2,705 photos of ../shared fall
        into 39 sizes instead of 332, at most 3 % anisotropic stretch) in bfloat16 autocast.  ``overrides``
        whose value is None keep the recipe's value.  On a GPU the first use of an input shape costs far more
        than its arithmetic, and with variable shapes an H200 finished no epoch in 285 s (docs/performance.md):
        hence ``fixed_shapes``."""
        from .model import BACKBONE_SPECS

        gpu = device.startswith("cuda")
        recipe = {"frozen_layers": BACKBONE_SPECS[backbone].cpu_frozen if device == "cpu" else 0,
                  "batch_size": 8 if gpu else 1, "amp": gpu, "size_step": 16 if gpu else 0, "fixed_shapes": gpu}
        recipe.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**recipe)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's legacy and torch's global generators (the trainer's own generator is separate)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LossMeter:
    """Running mean of each named loss term over the steps where it occurred."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def status(self) -> str:
        return " ".join(f"{k} {v:.4f}" for k, v in self.means().items())


def optimizer_step(opt, parts: dict, meter: LossMeter) -> None:
    """One optimiser step on the sum of the loss terms ``parts`` (nothing when there is none).  A term that is
    not a finite number (the run diverged: too high a learning rate) is a :class:`TrainingError`, raised before
    the step, so the weights stay those of the last finite step."""
    import math

    from .errors import TrainingError

    if not parts:
        return
    values = {k: float(v.detach()) for k, v in parts.items()}  # read once: for the check and for the meter
    bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
    if bad:
        raise TrainingError(f"training diverged (loss {bad}): stopped, the model was not saved; try a lower --lr")
    opt.zero_grad(set_to_none=True)
    sum(parts.values()).backward()
    opt.step()
    meter.add(values)


@dataclass
class Sample:
    """One training image after preprocessing."""

    kind: str  # "gaicd" | "fcdb" | "unlabeled"
    name: str
    size: tuple[int, int]  # network input (w, h)
    boxes: np.ndarray | None = None  # (N, 4) in network pixels (un-flipped)
    targets: np.ndarray | None = None  # normalised MOS (gaicd) or IoU (fcdb)
    image: object = None  # uint8 tensor (3, h, w) when training end to end
    prefix: list = field(default_factory=list)  # cached backbone prefixes [plain, flipped] (× views) when frozen
    alternates: list = field(default_factory=list)  # the same image at TrainConfig.scales (Samples)


#: a crop view (:meth:`Trainer._crop_views`) keeping fewer of the image's annotated crops is not used
MIN_CROP_VIEW_BOXES = 16


def crop_view(pixels: tuple[int, int], full_size, boxes: np.ndarray, margin: float, rng: np.random.Generator
              ) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A sub-rectangle of an image decoded at ``pixels`` (w, h) whose annotation is at ``full_size``: each side,
    with probability ½, moves in by a uniform share in [0, ``margin``) of the image's width or height (whole
    decoded pixels).  Returns the rectangle (x0, y0, x1, y1) in decoded pixels and the mask of ``boxes``
    (full-size coordinates) lying wholly inside it.  Always draws 8 numbers."""
    pw, ph = pixels
    cut = np.where(rng.random(4) < 0.5, rng.random(4) * margin, 0.0)
    x0, y0 = int(np.floor(cut[0] * pw)), int(np.floor(cut[1] * ph))
    x1, y1 = pw - int(np.floor(cut[2] * pw)), ph - int(np.floor(cut[3] * ph))
    fx, fy = full_size[0] / pw, full_size[1] / ph
    eps = 1e-3
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    keep = ((b[:, 0] >= x0 * fx - eps) & (b[:, 1] >= y0 * fy - eps)
            & (b[:, 2] <= x1 * fx + eps) & (b[:, 3] <= y1 * fy + eps))
    return (x0, y0, x1, y1), keep


def fcdb_candidates(width: float, height: float, box, border: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Candidate crops of an FCDB photo and their IoU with the expert box (the expert box is included): the GAIC
    anchors, with ``border`` also :func:`~smartcrop.anchors.border_anchors`, and the anchors of the expert
    box's aspect ratio."""
    x1, y1, x2, y2 = box
    r = max(x2 - x1, 1e-3) / max(y2 - y1, 1e-3)
    w, h = int(round(width)), int(round(height))
    cands = np.concatenate([
        gaic_anchors(w, h),
        border_anchors(w, h) if border else np.zeros((0, 4), np.float32),
        ratio_anchors(w, h, r) if 0.1 < r < 10 else np.zeros((0, 4), np.float32),
        np.asarray([box], dtype=np.float32),
    ])
    return cands, box_iou_matrix(cands, np.asarray([box]))[:, 0].astype(np.float32)


class WeightAverage:
    """Exponential moving average of a model's trainable weights (``TrainConfig.ema``): after every optimiser
    step ``avg ← d·avg + (1 − d)·w`` with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` steps (the usual
    warm-up, so the first steps' weights do not dominate).  :meth:`swapped` puts the average in the model for
    validation; :meth:`apply` leaves it there (before saving)."""

    def __init__(self, model, decay: float):
        self.decay = float(decay)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}
        self.updates = 0

    def update(self) -> None:
        import torch

        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for n, p in self.params.items():
                self.shadow[n].mul_(d).add_(p.detach(), alpha=1 - d)

    def _swap(self) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params.items():
                tmp = p.detach().clone()
                p.copy_(self.shadow[n])
                self.shadow[n].copy_(tmp)

    @contextmanager
    def swapped(self):
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def apply(self) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])

    def state(self) -> dict:
        return {"updates": self.updates, "shadow": dict(self.shadow)}

    def load(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


def size_batches(plan: Sequence, batch_size: int, fill_rng: np.random.Generator | None = None) -> list[list]:
    """Split an epoch's ``plan`` into steps of ``batch_size`` samples that share one network input size (so a
    batch is one backbone pass): samples go, in plan order, into the pending batch of their size, which becomes
    a step when full; the part-filled ones follow at the end.  Every sample is in exactly one step.

    With ``fill_rng`` every step is full: a part-filled batch is topped up with other samples of its size from
    ``plan`` drawn with that generator (again when the size has fewer samples than a batch), so those samples
    are in two steps of the epoch."""
    if batch_size <= 1:
        return [[s] for s in plan]
    pending: dict = {}
    steps = []
    for s in plan:
        b = pending.setdefault(s.size, [])
        b.append(s)
        if len(b) == batch_size:
            steps.append(b)
            del pending[s.size]
    steps.extend(pending.values())
    if fill_rng is not None:
        by_size: dict = {}
        for s in plan:
            by_size.setdefault(s.size, []).append(s)
        for b in steps:
            need = batch_size - len(b)
            if need > 0:
                others = [s for s in by_size[b[0].size] if all(s is not x for x in b)] or by_size[b[0].size]
                picks = fill_rng.choice(len(others), need, replace=len(others) < need)
                b.extend(others[int(i)] for i in picks)
    return steps


# --------------------------------------------------------------------------------------------------------------


def decay_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """Each optimizer group split in two: its weight matrices and kernels (2 or more dimensions) with
    ``weight_decay``, its biases and BatchNorm scales and shifts without (the usual AdamW practice: decaying
    those shifts or rescales what a layer computes instead of shrinking a linear map).  Empty groups are
    dropped."""
    out = []
    for g in groups:
        for decay in (True, False):
            params = [p for p in g["params"] if (p.ndim >= 2) == decay]
            if params:
                out.append({**g, "params": params, "weight_decay": weight_decay if decay else 0.0})
    return out


class Trainer:
    def __init__(self, model, cfg: TrainConfig, device: str = "cpu", log: Callable[[str], None] = print):
        import torch

        self.torch = torch
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.log = log
        self.rng = np.random.default_rng(cfg.seed)
        frozen = cfg.frozen_layers
        for i, layer in enumerate(model.backbone.features):
            for p in layer.parameters():
                p.requires_grad_(i >= frozen)
        bb = [p for p in model.backbone.parameters() if p.requires_grad]
        heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups = [{"params": heads, "lr": cfg.lr}]
        if bb:
            groups.append({"params": bb, "lr": cfg.lr * cfg.backbone_lr_mult})
        if cfg.adamw:
            groups = decay_groups(groups, cfg.weight_decay)
            self.opt = torch.optim.AdamW(groups)
        else:
            self.opt = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=max(1, cfg.lr_step), gamma=0.1)
        self.ema = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
        self.epoch = 0
        self.history: list[dict] = []
        self.sources: str | None = None  # what the run reads (run_sources), recorded in its checkpoints

    # -- data ------------------------------------------------------------------------------------------------

    def prepare(self, kind: str, name: str, pil_image, full_size, boxes=None, targets=None,
                teachers: Sequence = ()) -> Sample:
        """Resize to the network size and, when the backbone prefix is frozen, cache its output (plain and flipped);
        the same at each of ``TrainConfig.scales`` (one-image steps only).  An unlabeled photo with ``teachers``
        gets their :func:`teacher_targets` at the network size (none for its scale alternates)."""
        from .transforms import network_size

        cfg_m = self.model.config
        w, h = network_size(full_size[0], full_size[1], cfg_m.short_side, cfg_m.max_long_side)
        step = self.cfg.size_step
        if step > 0 and self.cfg.batch_size > 1:  # fewer distinct sizes: fuller batches (see size_batches)
            w, h = (max(step, int(round(v / step)) * step) for v in (w, h))
        targets = None if targets is None else np.asarray(targets, np.float32)
        s = self._prepared(kind, name, pil_image, full_size, (w, h), boxes, targets)
        if kind == "unlabeled" and teachers:
            from .transforms import image_tensor

            s.targets = teacher_targets(teachers, image_tensor(pil_image, (w, h)).to(self.device), (w, h))
        if self.cfg.batch_size <= 1:
            for f in self.cfg.scales:
                size = (max(32, int(round(w * f))), max(32, int(round(h * f))))
                s.alternates.append(self._prepared(kind, name, pil_image, full_size, size, boxes, targets))
            if kind == "gaicd" and self.cfg.crop_views > 0:
                s.alternates += self._crop_views(name, pil_image, full_size, boxes, targets)
        return s

    def _crop_views(self, name, pil_image, full_size, boxes, targets) -> list[Sample]:
        """``TrainConfig.crop_views`` samples of the image cut down by :func:`crop_view` (from the image's own
        generator, so the same whatever the order or a resume); a view keeping fewer than
        :data:`MIN_CROP_VIEW_BOXES` annotated crops is left out."""
        from .transforms import network_size

        cfg_m = self.model.config
        own = np.random.default_rng([self.cfg.seed, zlib.crc32(f"crop:{name}".encode())])
        views = []
        for _ in range(self.cfg.crop_views):
            rect, keep = crop_view(pil_image.size, full_size, boxes, self.cfg.crop_margin, own)
            if keep.sum() < MIN_CROP_VIEW_BOXES:
                continue
            fx, fy = full_size[0] / pil_image.size[0], full_size[1] / pil_image.size[1]
            x0, y0, x1, y1 = rect
            sub_full = ((x1 - x0) * fx, (y1 - y0) * fy)
            sub_boxes = boxes[keep] - np.array([x0 * fx, y0 * fy, x0 * fx, y0 * fy], np.float32)
            size = network_size(sub_full[0], sub_full[1], cfg_m.short_side, cfg_m.max_long_side)
            views.append(self._prepared("gaicd", name, pil_image.crop(rect), sub_full, size, sub_boxes,
                                        targets[keep]))
        return views

    def _prepared(self, kind, name, pil_image, full_size, size, boxes, targets) -> Sample:
        """One :class:`Sample` of the image at network size ``size`` (boxes scaled to it, prefix cached)."""
        from .transforms import image_tensor

        torch = self.torch
        w, h = size
        x = image_tensor(pil_image, (w, h))
        if boxes is not None:
            boxes = scale_boxes(boxes, w / full_size[0], h / full_size[1])
        s = Sample(kind, name, (w, h), boxes, targets)
        if self.cfg.frozen_layers > 0:
            from .transforms import photometric_jitter

            views = [x]
            if kind != "unlabeled" and self.cfg.jitter > 0 and self.cfg.jitter_views > 0:
                # drawn from the image's own generator, not the trainer's: the views are the same however the
                # images are ordered and whether the run started afresh or resumed from a checkpoint
                own = np.random.default_rng([self.cfg.seed, zlib.crc32(f"{kind}:{name}".encode()), w, h])
                views += [photometric_jitter(x, self.cfg.jitter, own) for _ in range(self.cfg.jitter_views)]
            with torch.no_grad():  # the frozen prefix has no dropout and frozen BN: the same in either mode
                for view in views:
                    for img in (view, view.flip(-1)):  # [plain, flipped] of each view
                        p = self.model.backbone_prefix(img.to(self.device), self.cfg.frozen_layers)
                        s.prefix.append(_half(p.detach()))
        else:
            s.image = x[0].to(torch.uint8)
        return s

    def _at_scale(self, s: Sample) -> Sample:
        """``s`` or one of its :attr:`Sample.alternates`, uniformly (scale augmentation; no draw without any)."""
        if not s.alternates:
            return s
        k = int(self.rng.integers(len(s.alternates) + 1))
        return s if k == 0 else s.alternates[k - 1]

    def _features(self, s: Sample, flip: bool):
        from .transforms import photometric_jitter

        m = self.model
        if s.prefix:  # [plain, flipped] of the image and of each jittered view: one view drawn when there are several
            v = int(self.rng.integers(len(s.prefix) // 2)) if len(s.prefix) > 2 else 0
            return m.features_from_prefix(_full(s.prefix[2 * v + (1 if flip else 0)], self.device))
        x = s.image.float().unsqueeze(0).to(self.device)
        if flip:
            x = x.flip(-1)
        if self.cfg.jitter > 0:
            x = photometric_jitter(x, self.cfg.jitter, self.rng)
        return m.image_features(x)

    # -- one step --------------------------------------------------------------------------------------------

    def _features_batch(self, samples: Sequence[Sample], flips: Sequence[bool]):
        """:meth:`_features` of samples of one network size, as one batch ``ImageFeatures``: one backbone pass
        for all of them when the backbone is trained end to end (each image flipped and jittered on its own)."""
        from .model import ImageFeatures
        from .transforms import photometric_jitter

        torch = self.torch
        if len(samples) == 1 or samples[0].prefix:
            each = [self._features(s, f) for s, f in zip(samples, flips)]
            if len(each) == 1:
                return each[0]
            saf = None if each[0].saf is None else torch.cat([e.saf for e in each])
            return ImageFeatures(torch.cat([e.region_map for e in each]), saf, each[0].input_size)
        xs = []
        for s, flip in zip(samples, flips):
            x = s.image.float().unsqueeze(0).to(self.device, non_blocking=True)
            if flip:
                x = x.flip(-1)
            if self.cfg.jitter > 0:
                x = photometric_jitter(x, self.cfg.jitter, self.rng)
            xs.append(x)
        return self.model.image_features(torch.cat(xs))

    def labeled_loss(self, s: Sample):
        s = self._at_scale(s)
        flip = bool(self.rng.random() < 0.5)
        return self._labeled_loss(s, flip, self._features(s, flip))

    def _labeled_draw(self, s: Sample, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """The crops (boxes in the image as shown, and their targets) a labeled image trains on this step."""
        cfg = self.cfg
        boxes = flip_boxes(s.boxes, s.size[0]) if flip else s.boxes
        n = len(boxes)
        k = cfg.crops_per_image if s.kind == "gaicd" else cfg.fcdb_crops
        idx = self.rng.choice(n, min(k, n), replace=False)
        if s.kind == "fcdb":  # always include the expert box (the last candidate)
            idx[0] = n - 1
            idx = np.unique(idx)
        return boxes[idx], s.targets[idx]

    def _labeled_loss(self, s: Sample, flip: bool, feats):
        from .losses import fcdb_loss, gaicd_loss

        cfg = self.cfg
        boxes, t = self._labeled_draw(s, flip)
        cf = self.model.crop_features(feats, self.torch.from_numpy(boxes).to(self.device))
        if s.kind == "gaicd":
            return gaicd_loss(self.model, cf, self.model.mos_scores(cf), t, self.rng, eta=cfg.eta,
                              max_pairs=cfg.pairs_per_image, lambda_cls=cfg.lambda_cls,
                              rank_weight=cfg.gaicd_rank_weight, centred=cfg.centred_mos,
                              top_weight=cfg.top_weight)
        # with a separate FCDB head the expert crops train that head (and the shared features) only: neither the
        # MOS head nor the ranking head, which rank consistency turns into the MOS head's labels
        own = self.model.config.fcdb_head
        return fcdb_loss(self.model, cf, self.model.fcdb_scores(cf), t, self.rng, tau=cfg.fcdb_tau,
                         max_pairs=cfg.pairs_per_image, margin=cfg.fcdb_margin, weight=cfg.fcdb_weight,
                         lambda_cls=0.0 if own else cfg.lambda_cls, mode=cfg.fcdb_loss, image_ious=s.targets,
                         listwise=cfg.fcdb_listwise)

    def consistency_loss(self, s: Sample):
        s = self._at_scale(s)
        flip = bool(self.rng.random() < 0.5)
        return self._consistency_loss(s, self._features(s, flip), flip)

    def _consistency_draw(self, s: Sample):
        """(anchors, their indices among the photo's GAIC anchors, whether to distill) an unlabeled photo trains
        on this step; None when it has fewer than 2 anchors (e.g. extreme panoramas: no pair to compare).  With
        teacher targets, up to max(rc_anchors, distill_anchors) anchors: rank consistency on the first
        rc_anchors of them, distillation on all (without, the draw is exactly rank consistency's)."""
        cfg = self.cfg
        anchors = gaic_anchors(*s.size)
        if len(anchors) < 2:
            return None
        distill = s.targets is not None and cfg.distill_weight > 0
        k = max(cfg.rc_anchors, cfg.distill_anchors) if distill else cfg.rc_anchors
        idx = self.rng.choice(len(anchors), min(k, len(anchors)), replace=False)
        return anchors[idx], idx, distill

    def _consistency_loss(self, s: Sample, feats, flip: bool = False):
        """Rank consistency over ``rc_anchors`` random anchors of an unlabeled photo and, when it has teacher
        targets, the distillation term over ``max(rc_anchors, distill_anchors)`` of them (a superset)."""
        import torch.nn.functional as F

        from .losses import rank_consistency

        cfg = self.cfg
        drawn = self._consistency_draw(s)
        if drawn is None:
            return {}
        anchors, idx, distill = drawn
        cf = self.model.crop_features(feats, self.torch.from_numpy(anchors).to(self.device))
        y = self.model.mos_scores(cf)
        parts = {}
        if cfg.rc and cfg.rc_weight > 0:
            r = cfg.rc_anchors
            parts["rc"] = cfg.rc_weight * rank_consistency(self.model, cf[:r], y[:r], cfg.rc_delta)
        if distill:
            t = self.torch.from_numpy(s.targets[int(flip), idx]).to(self.device)
            parts["distill"] = cfg.distill_weight * F.smooth_l1_loss(y, t)
        return parts

    def gaicd_repeats(self, n_gaicd: int, n_fcdb: int) -> int:
        """How many times the GAICD images go into an epoch with ``n_fcdb`` FCDB photos, so that they make up
        about ``gaicd_share`` of the labeled steps (once when either set is empty)."""
        share = self.cfg.gaicd_share
        if not n_gaicd or not n_fcdb or share <= 0:
            return 1
        return max(1, int(round(share / (1 - share) * n_fcdb / n_gaicd)))

    def epoch_plan(self, gaicd: Sequence[Sample], fcdb: Sequence[Sample]) -> list[Sample]:
        cfg = self.cfg
        f = list(fcdb)
        if cfg.fcdb_per_epoch and len(f) > cfg.fcdb_per_epoch:
            f = [f[i] for i in self.rng.choice(len(f), cfg.fcdb_per_epoch, replace=False)]
        g = list(gaicd) * self.gaicd_repeats(len(gaicd), len(f))
        plan = g + f
        order = self.rng.permutation(len(plan))
        return [plan[i] for i in order]

    def batch_loss(self, labeled: Sequence[Sample], unlabeled: Sequence[Sample]) -> dict:
        """Loss terms of one step over several labeled images of one size (one backbone pass) and as many
        unlabeled ones (one pass per size; with ``fixed_shapes`` and unlabeled photos of the labeled size, one
        pass for all): each term is the mean over the batch of the per-image losses — those of
        :meth:`_labeled_loss` and :meth:`_consistency_loss`, drawn in the same order — computed together
        (:class:`~smartcrop.losses.StepLosses`: one crop-feature call per backbone pass, each head once)."""
        from .losses import StepLosses

        torch = self.torch
        acc = StepLosses()
        passes = []  # (batch features, the boxes of each of its images)
        flips = [bool(self.rng.random() < 0.5) for _ in labeled]
        size = labeled[0].size
        if self.cfg.fixed_shapes and unlabeled and all(s.size == size for s in unlabeled):
            u_flips = [bool(self.rng.random() < 0.5) for _ in unlabeled]
            feats = self._features_batch([*labeled, *unlabeled], flips + u_flips)
            boxes = [self._labeled_terms(acc, s, f, len(labeled)) for s, f in zip(labeled, flips)]
            boxes += [self._consistency_terms(acc, s, f, len(unlabeled)) for s, f in zip(unlabeled, u_flips)]
            passes.append((feats, boxes))
        else:
            feats = self._features_batch(labeled, flips)
            passes.append((feats, [self._labeled_terms(acc, s, f, len(labeled)) for s, f in zip(labeled, flips)]))
            by_size: dict = {}
            for s in unlabeled:
                by_size.setdefault(s.size, []).append(s)
            for group in by_size.values():
                u_flips = [bool(self.rng.random() < 0.5) for _ in group]
                feats = self._features_batch(group, u_flips)
                passes.append((feats, [self._consistency_terms(acc, s, f, len(unlabeled))
                                       for s, f in zip(group, u_flips)]))
        cf = []
        for feats, boxes in passes:
            if not sum(len(b) for b in boxes):  # only photos without an anchor pair
                continue
            index = np.concatenate([np.full(len(b), k) for k, b in enumerate(boxes)])
            cf.append(self.model.crop_features(feats, torch.from_numpy(np.concatenate(boxes)).to(self.device),
                                               torch.from_numpy(index).to(self.device)))
        return acc.evaluate(self.model, torch.cat(cf))

    def _labeled_terms(self, acc, s: Sample, flip: bool, n: int) -> np.ndarray:
        """Add a labeled image's terms (what :meth:`_labeled_loss` computes, weighted 1/``n``) to the step's
        :class:`~smartcrop.losses.StepLosses`; return its crops' boxes (their rows come next)."""
        from .losses import listwise_targets, pair_indices, top_weights

        cfg = self.cfg
        boxes, t = self._labeled_draw(s, flip)
        rows = acc.rows(len(boxes))
        if s.kind == "gaicd":
            if cfg.centred_mos is None:
                acc.add_smooth_l1("reg", "mos", rows, t, 1.0 / n, top_weights(t, cfg.top_weight))
            else:
                acc.add_centred_smooth_l1("reg", "mos", rows, t, 1.0 / n, cfg.centred_mos)
            if cfg.lambda_cls > 0 or cfg.gaicd_rank_weight > 0:
                pairs = pair_indices(t, cfg.eta, cfg.pairs_per_image, self.rng)
                first_better = t[pairs[:, 0]] > t[pairs[:, 1]]
                i, j = rows[pairs[:, 0]], rows[pairs[:, 1]]
                if cfg.lambda_cls > 0:
                    acc.add_bce("cls", i, j, first_better, cfg.lambda_cls / n)
                if cfg.gaicd_rank_weight > 0:
                    acc.add_hinge("rank", "mos", i, j, np.where(first_better, 1.0, -1.0), 0.25,
                                  cfg.gaicd_rank_weight / n)
            return boxes
        w = cfg.fcdb_weight / n
        if cfg.fcdb_listwise > 0:
            acc.add_listwise("fcdb_list", "fcdb", rows, listwise_targets(t), w * cfg.fcdb_listwise)
        pairs = pair_indices(t, cfg.fcdb_tau, cfg.pairs_per_image, self.rng)
        if not len(pairs):
            return boxes
        better = np.where(t[pairs[:, 0]] > t[pairs[:, 1]], 1.0, -1.0)
        i, j = rows[pairs[:, 0]], rows[pairs[:, 1]]
        if cfg.fcdb_loss == "iou":
            z = (t - s.targets.mean()) / max(float(s.targets.std()), 1e-6)
            acc.add_smooth_l1("fcdb_reg", "fcdb", rows, z, w)
        elif cfg.fcdb_loss == "rank":
            acc.add_hinge("fcdb_rank", "fcdb", i, j, better, cfg.fcdb_margin, w)
        else:
            raise ValueError(f"unknown FCDB loss {cfg.fcdb_loss!r} (rank, iou)")
        lambda_cls = 0.0 if self.model.config.fcdb_head else cfg.lambda_cls  # see _labeled_loss
        if lambda_cls > 0:
            acc.add_bce("fcdb_cls", i, j, better > 0, w * lambda_cls)
        return boxes

    def _consistency_terms(self, acc, s: Sample, flip: bool, n: int) -> np.ndarray:
        """Add an unlabeled photo's terms (what :meth:`_consistency_loss` computes, weighted 1/``n``) to the
        step's :class:`~smartcrop.losses.StepLosses`; return its anchors (none for a photo without pairs)."""
        cfg = self.cfg
        drawn = self._consistency_draw(s)
        if drawn is None:
            return np.zeros((0, 4), np.float32)
        anchors, idx, distill = drawn
        rows = acc.rows(len(anchors))
        if cfg.rc and cfg.rc_weight > 0:
            ii, jj = np.triu_indices(min(cfg.rc_anchors, len(rows)), 1)
            acc.add_hinge("rc", "mos", rows[ii], rows[jj], None, cfg.rc_delta, cfg.rc_weight / n)
        if distill:
            acc.add_smooth_l1("distill", "mos", rows, s.targets[int(flip), idx], cfg.distill_weight / n)
        return anchors

    def _autocast(self):
        if self.cfg.amp and str(self.device).startswith("cuda"):
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def train_epoch(self, plan: Sequence[Sample], unlabeled: Sequence[Sample], bar=None) -> dict:
        """One pass over ``plan`` (from :meth:`epoch_plan`), each labeled image paired with an unlabeled photo;
        ``batch_size`` labeled images per step (:func:`size_batches`).

        The caller puts the model in training mode (see :func:`run_training`)."""
        if str(self.device).startswith("cuda"):
            from .cropper import cuda_setup

            cuda_setup(self.cfg.cudnn)  # a global setting, which scoring (validation, teachers) turns on
        # rank consistency and distillation are the unlabeled photos' losses
        use_rc = len(unlabeled) > 0 and ((self.cfg.rc and self.cfg.rc_weight > 0) or (
            self.cfg.distill_weight > 0 and any(u.targets is not None for u in unlabeled)))
        u_order = self.rng.permutation(len(unlabeled)) if use_rc else []
        meter = LossMeter()
        t0 = time.time()
        fixed = self.cfg.fixed_shapes and self.cfg.batch_size > 1
        steps = size_batches(plan, self.cfg.batch_size, self.rng if fixed else None)
        done = 0  # labeled images so far: the k-th is paired with unlabeled photo u_order[k]
        # fixed shapes: each size's unlabeled photos in u_order's order, taken in turn (cycling) by the steps of
        # that size; a size without unlabeled photos takes them from u_order as usual
        by_size: dict = {}
        if fixed and use_rc:
            for i in u_order:
                by_size.setdefault(unlabeled[i].size, []).append(unlabeled[i])
        same_size = {size: itertools.cycle(photos) for size, photos in by_size.items()}
        for batch in steps:
            with self._autocast():
                if self.cfg.batch_size <= 1:  # the one-image recipe, exactly as it always ran
                    parts = self.labeled_loss(batch[0])
                    if use_rc:
                        parts.update(self.consistency_loss(unlabeled[u_order[done % len(unlabeled)]]))
                else:
                    same = same_size.get(batch[0].size)
                    if same is not None:
                        u = [next(same) for _ in batch]
                    elif use_rc:
                        u = [unlabeled[u_order[(done + k) % len(unlabeled)]] for k in range(len(batch))]
                    else:
                        u = []
                    parts = self.batch_loss(batch, u)
            done += len(batch)
            optimizer_step(self.opt, parts, meter)
            if self.ema is not None and parts:
                self.ema.update()
            if bar is not None:
                bar.advance(len(batch), status=meter.status())
        self.sched.step()
        self.epoch += 1
        rec = {"epoch": self.epoch, "steps": len(steps), "images": len(plan), "seconds": round(time.time() - t0, 1),
               "lr": self.opt.param_groups[0]["lr"], "loss": meter.means()}
        return rec

    # -- checkpoints -----------------------------------------------------------------------------------------

    def state(self) -> dict:
        torch = self.torch
        return {
            "model": self.model.state_dict(), "config": self.model.config.to_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "epoch": self.epoch,
            "history": json.dumps(self.history), "train_config": json.dumps(asdict(self.cfg)),
            "rng": json.dumps(self.rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
            **({"ema": self.ema.state()} if self.ema is not None else {}),
            **({"sources": self.sources} if self.sources else {}),
        }

    def save_checkpoint(self, path: str | Path) -> None:
        write_checkpoint(self.state(), path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue the run saved in ``path``.  A checkpoint of another architecture or optimizer than this
        trainer's (a run started with other options) is a one-line :class:`UsageError`, before any image is
        prepared."""
        from .errors import UsageError

        torch = self.torch
        st = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(st.get("train_config") or "{}")
        if bool(saved.get("adamw", False)) != self.cfg.adamw:
            raise UsageError(f"{path}: its run trained with {'AdamW' if saved.get('adamw') else 'Adam'}: resume it "
                             f"{'with' if saved.get('adamw') else 'without'} --adamw")
        restore_run(self, st, self.model, path, "the model and optimizer these options make",
                    "resume with the options its run started with")
        check_same_config(path, saved, asdict(self.cfg), "trained")
        if self.ema is not None and "ema" in st:
            self.ema.load(st["ema"])
        elif self.ema is not None:  # a checkpoint of a run without the average: start it from these weights
            self.ema = WeightAverage(self.model, self.cfg.ema)


def restore_run(run, st: dict, model, path: str | Path, fits: str, hint: str) -> None:
    """Put the state of checkpoint ``st`` (read from ``path``) into ``run``, a :class:`Trainer` or a
    :class:`~smartcrop.finetune.Finetuner`: ``model``'s and ``run.opt``'s weights, ``run.epoch``,
    ``run.history`` and ``run.rng`` (and a Trainer's scheduler and torch generator).  A checkpoint whose
    tensors do not fit is a one-line :class:`~smartcrop.errors.UsageError`: "PATH: the checkpoint does not fit
    ``fits`` (why); ``hint``"; one missing a part or holding a malformed one, likewise."""
    from .errors import UsageError, one_line

    try:
        model.load_state_dict(st["model"])
        run.opt.load_state_dict(st["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"{path}: the checkpoint does not fit {fits} ({one_line(e, 160)}); {hint}") from None
    try:
        run.epoch = int(st["epoch"])
        run.history = json.loads(st["history"])
        run.rng.bit_generator.state = json.loads(st["rng"])
        if hasattr(run, "sched"):  # a training run's
            run.sched.load_state_dict(st["scheduler"])
            run.torch.set_rng_state(st["torch_rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # edited by hand, or written by other code
        raise UsageError(f"{path}: not a complete smartcrop checkpoint ({one_line(e, 120)}); {hint}") from None


def teacher_targets(teachers: Sequence, image, size: tuple[int, int]) -> np.ndarray | None:
    """What ``teachers`` (smartcrop models in eval mode) make of the GAIC anchors of one photo at network size
    ``size`` (``image``: its (1, 3, h, w) pixel tensor at that size): a (2, N) float32 array, row 0 for the photo
    as it is and row 1 for it mirrored (the anchors of the mirrored photo, in its own pixels) — what the student
    is shown either way.  Each teacher's scores of one view are z-scored over the anchors and averaged, then put
    back on the teachers' mean scale (mean offset + mean spread), so the target ranks the anchors as the
    ensemble does and is in the units of the score head.  None when the photo has fewer than 2 anchors."""
    import torch

    anchors = gaic_anchors(*size)
    if len(anchors) < 2:
        return None
    boxes = torch.from_numpy(anchors).to(image.device)
    views = torch.cat([image, image.flip(-1)]).float()
    zs, means, sds = [], [], []
    with torch.no_grad():
        for t in teachers:
            feats = t.image_features(views)
            y = torch.stack([t.mos_scores(t.crop_features(feats.select(v), boxes)) for v in (0, 1)]).double().cpu()
            mu, sd = y.mean(1, keepdim=True), y.std(1, keepdim=True).clamp_min(1e-6)
            zs.append((y - mu) / sd)
            means.append(mu)
            sds.append(sd)
    out = torch.stack(means).mean(0) + torch.stack(sds).mean(0) * torch.stack(zs).mean(0)
    return out.numpy().astype(np.float32)


def _half(p):
    from .model import BackbonePrefix

    return BackbonePrefix(p.x.half().cpu(), {k: v.half().cpu() for k, v in p.taps.items()},
                          [m.half().cpu() for m in p.saf_maps], p.stop, p.input_size)


def _full(p, device):
    from .model import BackbonePrefix

    return BackbonePrefix(p.x.to(device).float(), {k: v.to(device).float() for k, v in p.taps.items()},
                          [m.to(device).float() for m in p.saf_maps], p.stop, p.input_size)


# --------------------------------------------------------------------------------------------------------------
# the whole run


@dataclass
class TrainData:
    gaicd: list = field(default_factory=list)  # GaicdItem
    fcdb: list = field(default_factory=list)  # FcdbItem
    unlabeled: list = field(default_factory=list)  # Path
    val_gaicd: list = field(default_factory=list)
    val_fcdb: list = field(default_factory=list)


def split_validation(items: list, fraction: float) -> tuple[list, list]:
    """Deterministic hold-out: every k-th item by name (k = round(1 / fraction)); ``(train, val)``."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    k = max(2, int(round(1 / fraction)))
    ordered = sorted(items, key=lambda it: it.name)
    val = ordered[k // 2 :: k]
    names = {it.name for it in val}
    return [it for it in items if it.name not in names], val


def _image_path(kind: str, item):
    """The file of one training job: an unlabeled photo is its path, a labeled item has ``image_path``."""
    return item if kind == "unlabeled" else item.image_path


def _decode_for_training(path, short_side: int):
    """Worker task of :func:`prepare_samples`: ``(PIL image decoded at about the network size, full size)``."""
    from .imageio import load_image

    li = load_image(path, target_short_side=short_side)
    return li.image, li.full_size


#: how the log line of a photo a training or fine-tuning run leaves out begins (the command line counts them)
SKIPPING = "warning: skipping "
VAL_SKIPPED = "warning: validation photo skipped"


def prepare_samples(trainer: Trainer, data: TrainData, log: Callable[[str], None], progress=None,
                    workers: int = 1, teachers: Sequence = ()) -> tuple:
    """Decode and prepare every training image (``Trainer.prepare``; the unlabeled photos with the targets of
    ``teachers``, if any); with ``workers > 1`` the decodes run in that many worker processes while this one
    prepares (order and results are the same)."""
    from collections import deque
    from concurrent.futures import BrokenExecutor

    from .data import annotation_outside
    from .imageio import ImageError
    from .pool import WorkerPool, open_files_note
    from .progress import progress_bar
    from .transforms import normalize_mos

    short = trainer.model.config.short_side
    jobs = [("gaicd", it) for it in data.gaicd] + [("fcdb", it) for it in data.fcdb] + \
           [("unlabeled", p) for p in data.unlabeled]
    out = {"gaicd": [], "fcdb": [], "unlabeled": []}
    skipped = 0
    # one worker: the pool's in-process stand-in (each decode runs as it is submitted)
    pool = WorkerPool(max(1, workers), start_method="forkserver")
    if (note := open_files_note(pool)) is not None:
        log(note)
    try:
        with progress_bar(len(jobs), "preparing images", progress) as bar:
            pending: deque = deque()
            todo = iter(jobs)
            while True:
                while len(pending) < 4 * pool.workers and (job := next(todo, None)) is not None:
                    pending.append((job, pool.submit(_decode_for_training, _image_path(*job), short)))
                if not pending:
                    break
                (kind, it), fut = pending.popleft()
                path = _image_path(kind, it)
                try:
                    try:
                        image, full_size = fut.result()
                    except BrokenExecutor:  # its worker died (e.g. killed for memory): once more, here
                        image, full_size = _decode_for_training(path, short)
                except ImageError as e:
                    log(f"{SKIPPING}{path}: {e}")
                    skipped += 1
                    bar.advance()
                    continue
                outside = None if kind == "unlabeled" else annotation_outside(it, *full_size)
                if outside is not None:
                    log(f"{SKIPPING}{path}: {outside}")
                    skipped += 1
                    bar.advance()
                    continue
                if kind == "gaicd":
                    mos = normalize_mos(it.mos, trainer.cfg.mos_mean, trainer.cfg.mos_std)
                    s = trainer.prepare(kind, it.name, image, full_size, it.boxes, mos)
                elif kind == "fcdb":
                    boxes, ious = fcdb_candidates(full_size[0], full_size[1], it.box, trainer.cfg.fcdb_border)
                    s = trainer.prepare(kind, it.name, image, full_size, boxes, ious)
                else:
                    s = trainer.prepare(kind, Path(path).name, image, full_size, teachers=teachers)
                out[kind].append(s)
                bar.advance()
    finally:
        pool.close(cancel=True)
    return out["gaicd"], out["fcdb"], out["unlabeled"], skipped


def gaicd_spec(spec: str) -> tuple[Path, str]:
    """``ROOT[:SPLIT]`` → (root, split); the split defaults to ``train`` (also for ``ROOT:``, unless a folder
    is named so).  An empty spec is a :class:`~smartcrop.errors.UsageError` (it would read the current folder)."""
    from .errors import UsageError

    if not spec.strip():
        raise UsageError("--gaicd is empty: give ROOT[:SPLIT] (the current folder is --gaicd .)")
    root, sep, split = spec.rpartition(":")
    if sep and split and "/" not in split and "\\" not in split:
        return Path(root), split
    if sep and not split and root and not os.path.lexists(spec):
        return Path(root), "train"
    return Path(spec), "train"


def load_train_data(gaicd: Sequence[str] = (), fcdb: Sequence[Path] = (), unlabeled: Sequence[Path] = (),
                    val_fraction: float = 0.2, on_note: Callable[[str], None] | None = None,
                    on_error: Callable[[str], None] | None = None) -> TrainData:
    """Read the training sets (GAICD ``ROOT[:SPLIT]`` specs, FCDB roots, folders of unlabeled photos) and hold
    out ``val_fraction`` of the GAICD images and half that of the FCDB ones for per-epoch validation.  A
    malformed set is a one-line :class:`~smartcrop.errors.UsageError`; the readers' warnings go to ``on_note``
    (:func:`~smartcrop.data.reading`); with ``on_error``, a GAICD image whose annotation is malformed is reported
    there and left out."""
    from .data import list_images, read_fcdb, read_gaicd, reading
    from .errors import UsageError

    data = TrainData()
    with reading(on_note):
        for spec in gaicd:
            data.gaicd += read_gaicd(*gaicd_spec(spec), on_error=on_error)
        for root in fcdb:
            data.fcdb += read_fcdb(root, "train")
        if unlabeled:
            data.unlabeled = list_images(unlabeled, recursive=True)
    if not data.gaicd and not data.fcdb:
        raise UsageError("no labeled data: give GAICD (ROOT[:SPLIT]) and/or FCDB training data")
    # a photo reached twice (a set given twice, a link with its own annotation) would weigh double and could
    # sit on both sides of the validation split
    data.gaicd = _each_file_once(data.gaicd, "GAICD", on_note)
    data.fcdb = _each_file_once(data.fcdb, "FCDB", on_note)
    data.gaicd, data.val_gaicd = split_validation(data.gaicd, val_fraction)
    data.fcdb, data.val_fcdb = split_validation(data.fcdb, val_fraction / 2)
    return data


def _each_file_once(items: list, what: str, on_note: Callable[[str], None] | None) -> list:
    """``items`` (annotated photos) without those whose photo is a file an earlier one already is
    (:func:`~smartcrop.data.file_identity`), said in one note."""
    from .data import file_identity

    seen: set = set()
    kept = []
    for it in items:
        key = file_identity(it.image_path)  # a photo not there: its loader says so
        if key not in seen:
            seen.add(key)
            kept.append(it)
    if len(kept) < len(items) and on_note is not None:
        on_note(f"note: {len(items) - len(kept)} {what} photo(s) reached more than once (the same file): each is "
                "used once, with its first annotation")
    return kept


def build_model(init: Path | None = None, backbone: str | None = None, saf: bool = True,
                backbone_weights: Path | None = None, seed: int = 0, fcdb_head: bool = False,
                dropout: float | None = None, feat_dim: int | None = None):
    """``(model, source)``: a new SAC-Net with ImageNet backbone weights, or a smartcrop model to start from.
    ``backbone``: a new model's (default ``mobilenet_v2``); with ``init``, None or the model's own.
    ``dropout`` and ``feat_dim`` (the width of the region and spatial-aware features and of the heads' hidden
    layers) shape a new model only; None keeps :class:`~smartcrop.model.ModelConfig`'s defaults."""
    import torch

    from .errors import UsageError
    from .model import BACKBONES, ModelConfig, SACNet
    from .weights import load_backbone_weights, load_model

    torch.manual_seed(seed)  # the heads' initialisation
    if backbone is not None and backbone not in BACKBONES:
        raise UsageError(f"unknown backbone {backbone!r} (available: {', '.join(BACKBONES)})")
    if init is not None:
        net = load_model(init)
        if net.config.saf != saf:
            raise UsageError(f"{init}: the model {'has' if net.config.saf else 'lacks'} the spatial-aware feature, "
                             "unlike the requested architecture")
        if backbone is not None and backbone != net.config.backbone:
            raise UsageError(f"{init}: the model's backbone is {net.config.backbone}, not {backbone} "
                             "(--backbone applies to a new model)")
        if fcdb_head and not net.config.fcdb_head:
            raise UsageError(f"{init}: the model has no separate FCDB head (--fcdb-head needs a new model)")
        for flag, value in (("--dropout", dropout), ("--feat-dim", feat_dim)):
            if value is not None:
                raise UsageError(f"{flag} applies to a new model, not to --init")
        return net, f"init {init}"
    extra = {k: v for k, v in (("dropout", dropout), ("feat_dim", feat_dim)) if v is not None}
    net = SACNet(ModelConfig(backbone=backbone or "mobilenet_v2", saf=saf, fcdb_head=fcdb_head, **extra))
    return net, load_backbone_weights(net, backbone_weights)


def validate(model, data: TrainData, device: str, on_error: Callable[[str], None] | None = None) -> dict:
    """Metrics of ``model`` (in eval mode) on the held-out GAICD and FCDB items of ``data``; a held-out photo
    that cannot be read goes to ``on_error`` and is left out, and a metric of no photo at all is None (not NaN,
    which JSON readers refuse)."""
    from .cropper import Cropper
    from .evaluate import evaluate_fcdb, evaluate_gaicd

    def rounded(m: dict) -> dict:
        return {k: (round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in m.items()}

    cropper = Cropper(net=model, device=device)
    res = {}
    if data.val_gaicd:
        res["gaicd"] = rounded(evaluate_gaicd(cropper, data.val_gaicd, progress=False, on_error=on_error))
    if data.val_fcdb:
        res["fcdb_any"] = rounded(evaluate_fcdb(cropper, data.val_fcdb, "any", progress=False, on_error=on_error))
    return res


def write_checkpoint(state: dict, path: str | Path) -> None:
    """``torch.save`` ``state`` to ``path`` as every smartcrop output is written
    (:func:`~smartcrop.imageio.write_atomic`: a fresh temporary file beside it, never one already there nor
    what a link there points to, length-checked, fsynced and renamed over ``path``): an interrupted save
    (Ctrl-C, SIGTERM, a full disk) leaves the last checkpoint as it was."""
    import io

    import torch

    from .imageio import write_atomic

    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())  # makes the folder with the first file written in it


#: what a smartcrop checkpoint (``Trainer.save_checkpoint``, ``finetune.Finetuner.save_checkpoint``) holds
CHECKPOINT_KEYS = frozenset({"model", "optimizer", "epoch", "history", "rng"})


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a smartcrop training or fine-tuning checkpoint.  Read with ``weights_only`` (nothing
    but plain containers and tensors is unpickled) and memory-mapped (its tensors are not read)."""
    return checkpoint_kind(path) is not None


def checkpoint_kind(path: Path) -> str | None:
    """``"train"`` (written by ``smartcrop train``), ``"finetune"`` or None (not a smartcrop checkpoint), read as
    :func:`is_checkpoint` reads it."""
    return _kind(_read_checkpoint(path))


def _kind(st: dict | None) -> str | None:
    return None if st is None else "train" if "train_config" in st else "finetune"


def _read_checkpoint(path: Path) -> dict | None:
    """A smartcrop checkpoint's contents (tensors memory-mapped, not read), or None for anything else."""
    import torch

    try:
        st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file, or one holding anything beyond tensors and containers
        return None
    return st if isinstance(st, dict) and CHECKPOINT_KEYS <= st.keys() else None


def check_resume(resume: Path | None, command: str, lr: float | None = None, base: str | None = None,
                 sources: str | None = None, config: dict | None = None) -> None:
    """Refuse, before any work, a ``--resume`` file of ``command`` (``"train"`` or ``"finetune"``) that is
    missing, not a smartcrop checkpoint (the model file given instead of its ``.ckpt``) or the other command's,
    one whose run started at another learning rate than ``lr`` (the optimizer's state would keep its own while
    the card recorded ``lr``), one of a fine-tuning of another model than ``base`` (its sha256), or one of a run
    that read other data than ``sources`` (:func:`run_sources`; the last two where the checkpoint records
    them), or one of a fine-tuning with other settings than ``config`` (but its epochs): a one-line
    :class:`~smartcrop.errors.UsageError`."""
    from .errors import UsageError
    from .imageio import safe_name

    if resume is None:
        return
    if not Path(resume).is_file():
        raise UsageError(f"{safe_name(resume)}: no such checkpoint")
    st = _read_checkpoint(resume)
    kind = _kind(st)
    if kind is None:
        raise UsageError(f"{safe_name(resume)}: not a smartcrop checkpoint (--resume takes the OUT.ckpt a run "
                         "writes beside its model, not the model)")
    if kind != command:
        what = "a training" if kind == "train" else "a fine-tuning"
        raise UsageError(f"{safe_name(resume)}: {what} checkpoint: continue it with smartcrop {kind} --resume")
    if sources is not None and isinstance(st.get("sources"), str) and st["sources"] != sources:
        raise UsageError(f"{safe_name(resume)}: its run read other data ({_sources_change(st['sources'], sources)}): "
                         "resume with the data it started with, or start over")
    if base is not None and isinstance(st.get("base"), str) and st["base"] != base:
        raise UsageError(f"{safe_name(resume)}: its run fine-tuned another model (sha256 {st['base'][:12]}…): "
                         "resume with the --weights or --model it started from")
    groups = st["optimizer"].get("param_groups") if isinstance(st["optimizer"], dict) else None
    if lr is not None and groups:
        saved = groups[0].get("initial_lr", groups[0].get("lr"))
        if isinstance(saved, float) and not math.isclose(saved, lr, rel_tol=1e-6):
            raise UsageError(f"{safe_name(resume)}: its run started at learning rate {saved:g}, not {lr:g}: "
                             f"resume with --lr {saved:g}")
    if config is not None and isinstance(st.get("config"), str):
        check_same_config(resume, json.loads(st["config"]), config, "fine-tuned")


def check_same_config(path, saved: dict, now: dict, verb: str, free: Sequence[str] = ("epochs", "seed")) -> None:
    """A one-line :class:`~smartcrop.errors.UsageError` naming the first setting a run resumed from ``path``
    would change (its optimizer and scheduler would keep the checkpoint's while the card recorded the new one):
    "PATH: its run VERB with NAME=old, not new".  Settings in ``free`` may change (the seed: a resumed run draws
    from the checkpoint's random state, whatever it is); those one side does not record (a checkpoint of older
    code) are not compared."""
    from .errors import UsageError
    from .imageio import safe_name

    now = json.loads(json.dumps(now))  # tuples as the checkpoint's JSON holds them (lists)
    for key in sorted(saved.keys() & now.keys()):
        if key not in free and saved[key] != now[key]:
            raise UsageError(f"{safe_name(path)}: its run {verb} with {key}={saved[key]!r}, not {now[key]!r}: "
                             "resume it with the options it started with (--epochs may change)")


def run_sources(**sets: Sequence) -> str:
    """What a run reads, as its checkpoints record it and :func:`check_resume` compares: each named set's
    paths (or ``(root, split)`` pairs, :func:`gaicd_spec`), resolved, in a canonical order, as JSON; a number
    (the share held out for validation) as it is."""
    def resolved(p) -> str:
        if isinstance(p, (int, float)):
            return f"{p:g}"
        root, split = p if isinstance(p, tuple) else (p, None)
        return os.path.realpath(root) + (f":{split}" if split is not None else "")

    return json.dumps({k: sorted(resolved(p) for p in v) for k, v in sets.items()}, sort_keys=True)


@contextmanager
def output_lock(out: Path):
    """Hold ``out`` for one run of ``train`` or ``finetune``: a second run writing the same model (or its
    checkpoint and log) while this one runs is a one-line :class:`~smartcrop.errors.UsageError` before it does
    any work, instead of both reporting success while the later rename wins.  The lock is an ``flock`` on a
    hidden ``.OUT.lock`` beside ``out`` (its missing folders are made first, and removed again at the end if
    still empty); the file is removed when the run ends (one left by a killed run is harmless: the kernel
    released its lock).  Once held, the temporary files that killed smartcrop processes left in that folder
    (a checkpoint or model being written) are removed.  Where ``fcntl`` is missing (Windows) nothing is
    locked."""
    from .errors import UsageError
    from .imageio import remove_stale_temps, safe_name
    from .plan import check_can_make, make_folder, remove_if_empty
    from .weights import check_model_suffix

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    out = check_model_suffix(out)  # `-o ''` is no name to lock
    folder = Path(os.path.realpath(out.parent))  # one lock whatever the spelling (links, `new/..`)
    check_can_make(folder / out.name, str(out))  # "not a folder", "not writable": before any folder is made
    try:
        made = make_folder(folder)
    except OSError as e:
        raise UsageError(f"cannot write {safe_name(out)}: {e.strerror or e}") from None
    lock = folder / f".{out.name}.lock"
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            fd = os.open(lock, flags, 0o600)
        except OSError as e:
            remove_if_empty(made)
            raise UsageError(f"cannot write {safe_name(out)}: {safe_name(lock)}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            remove_if_empty(made)
            raise UsageError(f"{safe_name(out)} is being written by another smartcrop run"
                             + (f" (process {holder})" if holder.isdigit() else "")
                             + ": wait for it to end, or choose another output") from None
        try:  # the file a finishing run removed after we opened it: lock the new one instead
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        remove_stale_temps(folder, recursive=False)  # a checkpoint or model a killed run was writing
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        remove_if_empty(made)


def _sources_change(saved: str, now: str) -> str:
    """The first set of :func:`run_sources` that differs, for a one-line message: ``--NAME was A, B``."""
    from .imageio import safe_name

    try:
        old, new = json.loads(saved), json.loads(now)
    except ValueError:
        return "not recorded readably"
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            was = ", ".join(old.get(key) or []) or "none"
            return f"--{key.replace('_', '-')} was {safe_name(was if len(was) <= 120 else was[:119] + '…')}"
    return "recorded differently"


def _is_training_log(path: Path) -> bool:
    """Whether ``path`` starts as :func:`run_training`'s ``OUT.log.jsonl`` does (a ``start`` record), or is an
    empty file (a run killed before its first record reached the disk)."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            return True
        with open(path, "rb") as f:
            first = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("event") == "start" and "config" in first


def check_outputs(out: Path, resume: Path | None, force: bool, log_file: bool = True,
                  inputs: Sequence[Path] = ()) -> None:
    """Refuse (:class:`~smartcrop.errors.UsageError`) a training or fine-tuning run that would overwrite or
    remove a file it was not asked to: ``out`` and its card as :func:`~smartcrop.weights.check_model_path` says
    (``inputs``: the model files it reads; ``resume`` from ``OUT.ckpt``: ``out`` may be replaced), and the run's
    sidecars ``OUT.ckpt`` (rewritten every epoch) and, with ``log_file``, ``OUT.log.jsonl`` (appended to).  A sidecar
    that is not smartcrop's own is never touched, ``force`` or not; one of an earlier run needs ``force`` (or,
    for the checkpoint, ``--resume`` from it)."""
    from .errors import UsageError
    from .weights import check_model_path, check_model_suffix

    # only a run resumed from its own checkpoint (OUT.ckpt) may replace OUT: any other needs --force
    ckpt = check_model_suffix(out).with_suffix(".ckpt")
    resuming = resume is not None and ckpt.exists() and os.path.samefile(resume, ckpt)
    out = check_model_path(out, inputs, force, replace=resuming)
    ckpt = out.with_suffix(".ckpt")
    if (ckpt.exists() or ckpt.is_symlink()) and not resuming:
        if not ckpt.is_file() or not is_checkpoint(ckpt):
            raise UsageError(f"{ckpt} exists and is not a smartcrop checkpoint; this run would write its "
                             "checkpoints there: move it away or choose another output")
        if not force:
            raise UsageError(f"{ckpt} holds an earlier run's checkpoint: continue that run with --resume {ckpt}, "
                             "or pass --force to start over")
    log_path = out.with_suffix(".log.jsonl")
    if log_file and (log_path.exists() or log_path.is_symlink()) and not _is_training_log(log_path):
        raise UsageError(f"{log_path} exists and is not a smartcrop training log; this run would append to it: "
                         "move it away or choose another output")


def run_training(model, data: TrainData, cfg: TrainConfig, out: Path, device: str = "cpu",
                 resume: Path | None = None, info: dict | None = None, log: Callable[[str], None] = print,
                 progress: bool | None = None, workers: int = 0, teachers: Sequence = (),
                 branch_seed: int | None = None, sources: str | None = None) -> dict:
    """Train ``model`` on ``data``; checkpoint every epoch to ``OUT.ckpt``, log to ``OUT.log.jsonl``, save ``OUT``.

    ``workers``: processes decoding the training images (0: one per usable core, at most 8; 1: none).
    ``teachers``: smartcrop model files whose combined scores of the unlabeled photos' anchors
    (:func:`teacher_targets`, computed once while the photos are prepared) the score head is also trained to
    match, with weight ``cfg.distill_weight`` (knowledge distillation from an ensemble).
    ``branch_seed`` (with ``resume``): the rest of the run draws from this seed instead of the checkpoint's
    random state, so runs resumed from one checkpoint with different branch seeds share their first epochs.

    The global RNGs are seeded here (from ``cfg.seed``), and the model's train/eval mode is switched here only:
    eval while images are prepared and during validation, train for each epoch, eval when done.
    """
    from .errors import UsageError
    from .progress import progress_bar
    from .weights import save_model

    out = Path(out)
    ckpt = out.with_suffix(".ckpt")
    log_path = out.with_suffix(".log.jsonl")
    seed_everything(cfg.seed)
    trainer = Trainer(model, cfg, device, log)
    trainer.sources = sources
    if resume is not None:
        trainer.load_checkpoint(resume)
        log(f"resumed from {resume} after epoch {trainer.epoch}")
        if branch_seed is not None:
            seed_everything(branch_seed)
            trainer.rng = np.random.default_rng(branch_seed)
    elif branch_seed is not None:
        raise UsageError("a branch seed needs a checkpoint to resume from")
    t0 = time.time()
    model.eval()
    if workers <= 0:
        from .pool import usable_cores

        workers = min(8, usable_cores())
    teacher_nets = []
    if teachers:
        from .cropper import Cropper

        # each teacher's scoring copy (BatchNorm folded; on a CPU its layers fused with their activations)
        teacher_nets = [Cropper(p, device=device).scorer for p in teachers]
        if not data.unlabeled:
            log("note: teacher models given but no unlabeled photos: nothing to distill")
    gaicd, fcdb, unl, skipped = prepare_samples(trainer, data, log, progress, workers, teacher_nets)
    del teacher_nets
    prep_s = time.time() - t0
    log(f"prepared {len(gaicd)} GAICD, {len(fcdb)} FCDB, {len(unl)} unlabeled images in {prep_s:.0f} s"
        + (f" ({skipped} skipped)" if skipped else ""))
    if not gaicd and not fcdb:
        raise UsageError("no labeled training image could be read")
    if cfg.rc and not unl:
        log("note: no unlabeled photos given: training without the rank-consistency loss")
    reported: set[str] = set()

    def val_error(message: str) -> None:  # once a run, not once an epoch
        if message not in reported:
            reported.add(message)
            log(f"{VAL_SKIPPED}: {message}")

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as lf:
        lf.write(json.dumps({"event": "start", "config": asdict(cfg), "model": model.config.to_dict(),
                             "n_gaicd": len(gaicd), "n_fcdb": len(fcdb), "n_unlabeled": len(unl),
                             "prepare_seconds": round(prep_s, 1), "info": info or {}}) + "\n")
        lf.flush()  # on disk now: a run killed in its first epoch leaves a log the next run knows as its own
        while trainer.epoch < cfg.epochs:
            plan = trainer.epoch_plan(gaicd, fcdb)
            model.train()
            with progress_bar(len(plan), f"epoch {trainer.epoch + 1}/{cfg.epochs}", progress, status=True) as bar:
                rec = trainer.train_epoch(plan, unl, bar)
            model.eval()
            with trainer.ema.swapped() if trainer.ema is not None else contextlib.nullcontext():
                rec["val"] = validate(model, data, device, on_error=val_error)
            trainer.history.append(rec)
            trainer.save_checkpoint(ckpt)
            lf.write(json.dumps(rec) + "\n")
            lf.flush()
            log(_epoch_line(rec))
    if trainer.ema is not None:
        trainer.ema.apply()  # the averaged weights are the model
    final = trainer.history[-1] if trainer.history else {}
    card_info = dict(info or {})
    card_info["training"] = dict(card_info.get("training", {}), config=asdict(cfg), epochs_run=trainer.epoch,
                                 n_gaicd=len(gaicd), n_fcdb=len(fcdb), n_unlabeled=len(unl),
                                 seconds_per_epoch=[h["seconds"] for h in trainer.history])
    card_info["validation"] = final.get("val", {})
    card = save_model(model, out, card_info)
    log(f"saved {out} (sha256 {card['sha256'][:12]}…)")
    return card


def _epoch_line(rec: dict) -> str:
    loss = " ".join(f"{k}={v:.4f}" for k, v in rec["loss"].items())
    val = []
    g = rec.get("val", {}).get("gaicd")
    if g:
        val.append(f"val GAICD srcc={g['srcc']:.3f} acc5={g['acc5']:.1f} acc10={g['acc10']:.1f}"
                   if g["srcc"] is not None else "val GAICD: no photo read")
    f = rec.get("val", {}).get("fcdb_any")
    if f:
        val.append(f"val FCDB iou={f['iou']:.3f}" if f["iou"] is not None else "val FCDB: no photo read")
    return f"epoch {rec['epoch']}: {rec['seconds']:.0f} s, {loss}" + ("; " + ", ".join(val) if val else "")
