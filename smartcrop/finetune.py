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
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .anchors import flip_boxes, gaic_anchors, scale_boxes
from .errors import UsageError
from .training import SKIPPING, TrainConfig, check_same_config, restore_run, write_checkpoint


class AlbumError(UsageError):
    """The album cannot be used (too few readable photos); one-line message."""


class TooFewPhotos(AlbumError):
    """Fewer of the album's photos decode than adaptation needs (:attr:`FinetuneConfig.min_photos`)."""

    def __init__(self, usable: int, needed: int) -> None:
        super().__init__(f"only {usable} usable photo(s) in the album: at least {needed} are needed (dozens or "
                         "more give a useful adaptation)")


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
    min_photos: int = 4  # fewer usable album photos is an error
    max_labeled: int = 400  # labeled photos drawn at most from --labeled data
    # how labeled photos are used: the training recipe's crops per photo, pair thresholds, margin, MOS units
    labeled: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        d = dict(d)
        if isinstance(d.get("labeled"), dict):
            d["labeled"] = TrainConfig(**d["labeled"])
        return cls(**d)


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
    names = ("region_fc.", "saf_conv1.", "saf_conv2.", "saf_fc.", "score_head.", "fcdb_head.")
    params = []
    for n, p in net.named_parameters():
        p.requires_grad_(n.startswith(names))
        if p.requires_grad:
            params.append(p)
    return params


def cache_photos(net, sources: Sequence, log: Callable[[str], None], progress=None, device: str = "cpu",
                 kind: str = "album", recipe: TrainConfig | None = None) -> list[AlbumPhoto]:
    """Decode, run the frozen backbone (plain and mirrored) and keep the image features and base scores.

    The caller puts ``net`` in eval mode.  ``recipe`` gives the MOS normalisation of GAICD-layout photos."""
    import torch

    from .data import annotation_outside
    from .imageio import ImageError, load_image
    from .progress import progress_bar
    from .training import fcdb_candidates
    from .transforms import image_tensor, network_size, normalize_mos

    recipe = recipe or TrainConfig()
    cfg = net.config
    out: list[AlbumPhoto] = []
    with progress_bar(len(sources), f"reading {kind} photos", progress) as bar, torch.no_grad():
        for k, src in enumerate(sources):
            path = getattr(src, "image_path", src)
            try:
                li = load_image(path, target_short_side=cfg.short_side)
            except ImageError as e:
                log(f"{SKIPPING}{path}: {e}")
                bar.advance()
                continue
            fw, fh = li.full_size
            outside = None if kind == "album" else annotation_outside(src, fw, fh)
            if outside is not None:
                log(f"{SKIPPING}{path}: {outside}")
                bar.advance()
                continue
            w, h = network_size(fw, fh, cfg.short_side, cfg.max_long_side)
            x = image_tensor(li.image, (w, h)).to(device)
            sx, sy = w / fw, h / fh
            targets = None
            if kind == "gaicd":
                anchors = scale_boxes(src.boxes, sx, sy)
                targets = normalize_mos(src.mos, recipe.mos_mean, recipe.mos_std)
            elif kind == "fcdb":
                cands, ious = fcdb_candidates(fw, fh, src.box)
                anchors = scale_boxes(cands, sx, sy)
                targets = ious
            else:
                anchors = gaic_anchors(w, h)
            anchors = anchors.astype(np.float32)
            feats, base = [], []
            for flip in (False, True):
                f = net.image_features(x.flip(-1) if flip else x)
                b = flip_boxes(anchors, w) if flip else anchors
                base.append(net.score_boxes(f, torch.from_numpy(b).to(device)).cpu().numpy())
                feats.append(f)
            out.append(AlbumPhoto(Path(path).name, (w, h), feats, anchors, base, targets, kind))
            bar.advance()
    return out


class Finetuner:
    def __init__(self, net, cfg: FinetuneConfig, device: str = "cpu", base: str | None = None,
                 sources: str | None = None):
        import torch

        self.torch = torch
        self.net = net
        self.cfg = cfg
        self.device = device
        self.base = base  # sha256 of the model file fine-tuned, recorded in the checkpoint (checked on --resume)
        self.sources = sources  # the album and labeled data (training.run_sources), recorded there too
        self.rng = np.random.default_rng(cfg.seed)
        self.opt = torch.optim.Adam(_trainable(net), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.epoch = 0
        self.history: list[dict] = []

    def photo_loss(self, ph: AlbumPhoto) -> dict:
        from .losses import fcdb_loss, gaicd_loss, rank_consistency

        torch = self.torch
        cfg = self.cfg
        rec = cfg.labeled
        flip = int(self.rng.random() < 0.5)
        boxes = flip_boxes(ph.anchors, ph.size[0]) if flip else ph.anchors
        n = len(boxes)
        idx = self.rng.choice(n, min(cfg.anchors if ph.kind == "album" else rec.fcdb_crops, n), replace=False)
        cf = self.net.crop_features(ph.feats[flip], torch.from_numpy(boxes[idx]).to(self.device))
        parts = {}
        if ph.kind == "album":  # the score `run` ranks by (with a separate FCDB head: both heads' sum)
            y = self.net.score_features(cf)
            rc = rank_consistency(self.net, cf, y, cfg.delta)
            if rc is not None:  # None: a single anchor (extreme panorama), nothing to compare
                parts["rc"] = rc
                if cfg.distill > 0:
                    base = torch.from_numpy(ph.base[flip][idx]).to(self.device)
                    parts["distill"] = cfg.distill * torch.nn.functional.mse_loss(y, base)
        elif ph.kind == "gaicd":  # the score head only: the ranking head stays as trained
            t = ph.targets[idx].astype(np.float32)
            reg = gaicd_loss(self.net, cf, self.net.mos_scores(cf), t, self.rng, eta=rec.eta,
                             max_pairs=rec.pairs_per_image, lambda_cls=0.0)["reg"]
            parts["labeled"] = cfg.labeled_weight * reg
        else:  # fcdb: margin ranking on IoU pairs
            rank = fcdb_loss(self.net, cf, self.net.fcdb_scores(cf), ph.targets[idx], self.rng, tau=rec.fcdb_tau,
                             max_pairs=rec.pairs_per_image, margin=rec.fcdb_margin, weight=cfg.labeled_weight,
                             lambda_cls=0.0)
            if rank:
                parts["labeled"] = rank["fcdb_rank"]
        return parts

    def train_epoch(self, album: Sequence[AlbumPhoto], labeled: Sequence[AlbumPhoto] = (), bar=None) -> dict:
        """One pass over the album; the caller puts the model in training mode (see :func:`finetune`)."""
        from .training import LossMeter, optimizer_step

        meter = LossMeter()
        t0 = time.time()
        order = np.concatenate([self.rng.permutation(len(album)) for _ in range(self.cfg.steps_per_photo)])
        for i in order:
            parts = self.photo_loss(album[i])
            if labeled:
                parts.update(self.photo_loss(labeled[int(self.rng.integers(len(labeled)))]))
            optimizer_step(self.opt, parts, meter)
            if bar is not None:
                bar.advance(1, status=meter.status())
        self.epoch += 1
        rec = {"epoch": self.epoch, "seconds": round(time.time() - t0, 2), "photos": len(album),
               "loss": meter.means()}
        self.history.append(rec)
        return rec

    def save_checkpoint(self, path: Path) -> None:
        write_checkpoint({"model": self.net.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch,
                          "history": json.dumps(self.history), "rng": json.dumps(self.rng.bit_generator.state),
                          "config": json.dumps(asdict(self.cfg)),
                          **({"base": self.base} if self.base else {}),
                          **({"sources": self.sources} if self.sources else {})}, path)

    def load_checkpoint(self, path: Path) -> None:
        """Continue the fine-tuning saved in ``path``; one of another model's architecture, or whose run used
        other settings than ``cfg`` (but the epochs), is a one-line :class:`UsageError`."""
        st = self.torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(st.get("config"), str):
            check_same_config(path, json.loads(st["config"]), asdict(self.cfg), "fine-tuned")
        restore_run(self, st, self.net, path, "the model being fine-tuned",
                    "resume with the --weights or --model its run started from")


def labeled_sources(root: Path, on_note: Callable[[str], None] | None = None,
                    on_error: Callable[[str], None] | None = None) -> tuple[str, list]:
    """(kind, items) of a GAICD-layout (every split with annotations) or FCDB-layout (training list) folder; a
    malformed one is a one-line :class:`~smartcrop.errors.UsageError`, the readers' warnings go to ``on_note``
    (:func:`~smartcrop.data.reading`); with ``on_error``, a GAICD image whose annotation is malformed is
    reported there and left out."""
    from .data import gaicd_splits, read_fcdb, read_gaicd, reading

    root = Path(root)
    with reading(on_note):
        if (root / "annotations").is_dir():
            kind, items = "gaicd", []
            for split in gaicd_splits(root):
                if (root / "images" / split).is_dir():
                    items += read_gaicd(root, split, on_error)
        elif (root / "cropping_training_set.json").is_file():
            kind, items = "fcdb", read_fcdb(root, "train")
        else:
            raise AlbumError(f"{root}: neither a GAICD layout (images/, annotations/) nor an FCDB one "
                             "(cropping_*_set.json)")
    if not items:  # e.g. annotations whose photos are not there: say so before the model loads
        raise AlbumError(f"{root}: no labeled photos there")
    return kind, items


def finetune(net, photos: Sequence[Path], cfg: FinetuneConfig, labeled_root: Path | None = None,
             checkpoint: Path | None = None, resume: Path | None = None, device: str = "cpu",
             log: Callable[[str], None] = print, progress=None, labeled_items: tuple[str, list] | None = None,
             base: str | None = None, sources: str | None = None):
    """Fine-tune ``net`` in place on ``photos``; returns the list of epoch records.  ``labeled_items``: what
    :func:`labeled_sources` read from ``labeled_root``, when the caller read it first (to refuse bad data
    before any work).  ``base``: the sha256 of the model file ``net`` was loaded from, recorded in the
    checkpoints (``smartcrop.training.check_resume`` refuses to continue them on another model), as is
    ``sources``, the album and labeled data read (:func:`~smartcrop.training.run_sources`).

    The global RNGs are seeded here (from ``cfg.seed``) and the model's mode is switched here only: eval while
    photos are cached, train for each epoch, eval when done.
    """
    from .progress import progress_bar
    from .training import seed_everything

    seed_everything(cfg.seed)
    net.to(device)
    net.eval()
    album = cache_photos(net, list(photos), log, progress, device, recipe=cfg.labeled)
    if len(album) < cfg.min_photos:
        raise TooFewPhotos(len(album), cfg.min_photos)
    labeled: list = []
    if labeled_root is not None:
        kind, items = labeled_items or labeled_sources(labeled_root, on_note=log)
        if len(items) > cfg.max_labeled:
            rng = np.random.default_rng(cfg.seed)
            items = [items[i] for i in sorted(rng.choice(len(items), cfg.max_labeled, replace=False))]
        labeled = cache_photos(net, items, log, progress, device, kind=kind, recipe=cfg.labeled)
        if not labeled:
            raise AlbumError(f"{labeled_root}: no usable labeled photos")
        cfg = replace(cfg, distill=0.0)
    ft = Finetuner(net, cfg, device, base, sources)
    if resume is not None:
        ft.load_checkpoint(resume)
        log(f"resumed from {resume} after epoch {ft.epoch}")
    while ft.epoch < cfg.epochs:
        net.train()
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


def output_path(out: str) -> Path:
    """Where ``finetune --out OUT`` writes: a ``.safetensors`` path as given, or a bare model name in the user's
    models folder (then usable as ``--model NAME``)."""
    from .weights import DEFAULT_MODEL, user_models_dir, valid_model_name

    if out.lower().endswith(".safetensors"):  # a path (`Holiday.SAFETENSORS` is refused as one, not renamed)
        return Path(out)
    if out == DEFAULT_MODEL:
        raise UsageError(f"{out!r} is the shipped model's name (--model {out}): choose another")
    if valid_model_name(out) and "/" not in out:
        return user_models_dir() / f"{out}.safetensors"
    raise UsageError(f"output must be a .safetensors path or a model name (letters, digits, . _ -), not {out!r}")


def save_finetuned(net, out_path: Path, *, base_path, albums: Sequence[Path], photos: int, labeled: Path | None,
                   cfg: FinetuneConfig, history: list, argv: Sequence[str] = ()) -> dict:
    """Write the fine-tuned model with a card saying what it was adapted from and on; returns the card."""
    from .weights import save_model

    header = dict(getattr(net, "header", {}) or {})
    header.pop("config", None)
    header["finetune"] = {"base": str(base_path), "albums": [str(a) for a in albums], "photos": photos,
                          "labeled": str(labeled) if labeled else None, "config": asdict(cfg),
                          "history": history, "command": "smartcrop finetune " + " ".join(map(shlex.quote, argv))}
    card = save_model(net, out_path, header)
    out_path.with_suffix(".ckpt").unlink(missing_ok=True)
    return card


def adapt_cropper(cropper, photos: Sequence[Path], epochs: int = 2, log: Callable[[str], None] = print):
    """A new Cropper whose model is a copy of ``cropper``'s fine-tuned on ``photos`` (nothing is written); when
    too few of them decode, ``cropper`` itself, said in one line (the run goes on and names the others)."""
    from .cropper import Cropper

    net = copy.deepcopy(cropper.net)
    log(f"adapting the model to {len(photos)} photos ({epochs} epochs)…")
    # a photo that cannot be read is reported by the run that crops it: not a second time here
    try:
        finetune(net, photos, FinetuneConfig(epochs=epochs), device=cropper.device,
                 log=lambda line: None if line.startswith(SKIPPING) else log(line))
    except TooFewPhotos as e:  # the photos that do decode are still cropped, by the model as it is
        log(f"not adapted: {e}; cropping with the model as it is")
        return cropper
    adapted = Cropper(net=net, device=cropper.device)
    adapted.choice = cropper.choice
    return adapted
