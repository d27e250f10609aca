"""The library's front door: load a model, score candidate crops, pick the best ones.

>>> from smartcrop import Cropper
>>> cropper = Cropper()                                  # the shipped model, best device
>>> crops = cropper.crop("photo.jpg", ratios=["16:9", "1:1"])
>>> crops[0].box, crops[0].score, crops[0].ratio         # (x1, y1, x2, y2) in upright pixels
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .anchors import (
    FREE_GRID, anchors_for, as_ratio, box_iou_matrix, check_boxes, check_free_grid, is_free, ratio_box,
    refine_anchors, scale_boxes,
)
from .transforms import image_tensor, network_size


@dataclass(frozen=True)
class Crop:
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels of the upright full-resolution image
    score: float  # model score in normalised MOS units, (MOS − 2.95) / 0.8: 0 ≈ an average GAICD crop
    ratio: str  # the requested ratio ("16:9", "any", ...)

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def resolve_device(device: str = "auto") -> str:
    """``auto`` → the best available device (CUDA, then MPS, then CPU); others are checked to exist."""
    import torch

    from .errors import DeviceError

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda': no CUDA device is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps': no MPS device is available")
    if device not in {"cpu", "cuda", "mps"} and not device.startswith("cuda:"):
        raise DeviceError(f"unknown device {device!r} (auto, cpu, cuda, mps)")
    return device


def cuda_setup(cudnn: bool) -> None:
    """Settings for scoring (``cudnn=True``) or training (``False``) on a CUDA device; never autotuning per shape.

    Measured on an H200 (docs/performance.md, "Eighth session"): with cuDNN, the first training step at each
    new network size took 8–13 s (fixed-shape steps 0.12 s once seen; an epoch meets ~39 sizes), without it no
    step took over 0.3 s (0.19 s a step, an epoch of the GPU recipe in 16–20 s).  Scoring keeps cuDNN: 4.4 ms a
    photo warmed against 9.6 ms without, and `run` about even (64 photos 3.5–4.0 s with, 3.0–3.1 s without;
    512 photos 11.4–11.9 s with, 12.2–12.3 s without)."""
    import torch

    torch.backends.cudnn.enabled = cudnn
    torch.backends.cudnn.benchmark = False


def distinct_best(boxes: np.ndarray, scores: np.ndarray, max_iou: float) -> Iterator[int]:
    """Indices of the boxes, best first, skipping any overlapping an already yielded one by IoU > ``max_iou``
    (lazily: a caller stops when it has enough)."""
    chosen: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if chosen and box_iou_matrix(boxes[i : i + 1], boxes[chosen]).max() > max_iou:
            continue
        chosen.append(int(i))
        yield int(i)


#: the smallest side of a crop worth writing, in the photo's pixels (``run`` refuses smaller ones)
MIN_CROP_SIDE = 16
#: ``top_k`` crops of one ratio overlap each other by IoU at most this, as anchors and as written (fused) boxes
DISTINCT_IOU = 0.6

#: Box voting (docs/results.md): a chosen crop is the mean of itself and the next best anchors overlapping it
FUSE_K = 3
FUSE_MAX = 20  # run's and eval's --fuse allow 1..20
FUSE_IOU = 0.5
#: Boxes scored per model call: each holds ~0.3 MB of features while scored (an annotation of 100,000 crops
#: took 19 GB at once); every candidate set of `run` and GAICD's ~86 crops an image fit in one call
SCORE_CHUNK = 512
#: A crop of a given ratio is instead the score-weighted mean of every anchor overlapping it, weights
#: exp((s_j − s_i) / VOTE_T) (tenth session, docs/results.md: better at FCDB's expert ratio, not free)
VOTE_T = 0.1


def _side(box) -> float:
    """The shorter side of an ``(x1, y1, x2, y2)`` box."""
    return min(box[2] - box[0], box[3] - box[1])


def fuse_box(boxes: np.ndarray, scores: np.ndarray, i: int, k: int = FUSE_K, min_iou: float = FUSE_IOU,
             temperature: float | None = None) -> np.ndarray:
    """The mean of ``boxes[i]`` and the ``k - 1`` best-scoring boxes that score no higher than it and overlap it
    by IoU >= ``min_iou`` (``k = 1``: ``boxes[i]`` itself).  Anchors of one aspect ratio average to that ratio.

    For the best box this is "box voting" over its neighbourhood: on FCDB it raised the IoU with the expert
    crop by +0.004 (free ratio) and +0.006 to +0.010 (at the expert's ratio) for five models out of five, on
    photos held out from training and on FCDB test (chosen on the first, confirmed on the second).

    With ``temperature`` T (and ``k`` > 1): the weighted mean of ``boxes[i]`` and *every* box that scores no
    higher and overlaps it so, box j weighing ``exp((scores[j] − scores[i]) / T)`` (``boxes[i]`` weighs 1)."""
    if k <= 1:
        return np.asarray(boxes[i], dtype=np.float64)
    b = np.asarray(boxes, dtype=np.float64)
    below = np.flatnonzero(scores <= scores[i])
    below = below[np.argsort(-scores[below], kind="stable")]
    near = below[box_iou_matrix(b[i : i + 1], b[below])[0] >= min_iou]
    keep = [i] + [int(j) for j in near if j != i]
    if temperature is None:
        return b[keep[:k]].mean(axis=0)
    w = np.exp((np.asarray(scores, dtype=np.float64)[keep] - float(scores[i])) / temperature)
    return (w[:, None] * b[keep]).sum(axis=0) / w.sum()


@dataclass(frozen=True)
class Choice:
    """How a crop is chosen among the scored anchors: ``run``'s ``--fuse``, ``--refine``, ``--faces`` and
    ``--free-grid`` (each described at :class:`Cropper`), as one value that the run's options, its scoring
    workers, the Ray scorers and an adapted model's cropper pass on (:attr:`Cropper.choice`)."""

    fuse: int = FUSE_K
    refine: bool = False
    faces: bool = False
    free_grid: str = FREE_GRID

    def __post_init__(self) -> None:
        check_free_grid(self.free_grid)
        if not (_is_int(self.fuse) and 1 <= self.fuse <= FUSE_MAX):
            raise ValueError(f"fuse must be a whole number from 1 to {FUSE_MAX}, not {self.fuse!r}")
        object.__setattr__(self, "fuse", int(self.fuse))  # frozen: a NumPy integer becomes an int
        _check_flags(refine=self.refine, faces=self.faces)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _ratio_list(ratios) -> list:
    """``ratios`` as :meth:`Cropper.crop` and :meth:`Cropper.best_crops` take them: one ratio (``"16:9"``, a
    number, ``"any"``; None: ``"any"``) or an iterable of them, as a list, each checked (a one-line
    ``ValueError`` for a bad one, a ``TypeError`` for what is no ratio or list of them at all)."""
    if ratios is None:
        return ["any"]
    if isinstance(ratios, (str, numbers.Real)):
        return _ratio_list([ratios])
    wrong = TypeError(f"ratios must be a ratio ('16:9', 1.5 or 'any') or a list of them, not "
                      f"{type(ratios).__name__}")
    if isinstance(ratios, (bytes, bytearray, memoryview, Mapping)):
        raise wrong
    try:
        out = list(ratios)
    except TypeError:
        raise wrong from None
    for r in out:
        if not is_free(r):
            as_ratio(r)
    return out


def _check_top_k(top_k) -> None:
    if not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be a whole number of 1 or more, not {top_k!r}")


def _check_image(image, what: str = "a PIL image (crop() also takes a path or bytes)") -> None:
    from PIL import Image

    if not isinstance(image, Image.Image):
        hint = " (PIL.Image.fromarray makes one of an array)" if isinstance(image, np.ndarray) else ""
        raise TypeError(f"the image must be {what}, not {type(image).__name__}{hint}")


def _check_flags(**flags) -> None:
    """A one-line ``ValueError`` for the first of ``flags`` that is not True or False (``refine="no"`` would
    count as true)."""
    for name, v in flags.items():
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, not {v!r}")


class Cropper:
    """Score crops with a SAC-Net model.

    ``weights``: a model file; ``model``: the name of a user model (``smartcrop models``); neither: the shipped
    model.  ``device``: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` or ``mps``.  ``amp``: score
    under bfloat16 autocast (off by default; docs/performance.md measures how often it changes a crop).
    ``tta``: also score the mirrored image and average (twice the model time; off by default because it
    measured within noise, see docs/results.md).  ``fuse``: each chosen free crop is the mean of this many
    overlapping top anchors (:func:`fuse_box`, default 3), each crop of a given ratio the score-weighted mean of
    all the anchors overlapping the best (:data:`VOTE_T`); 1: the best anchor itself.  ``refine``: a free-ratio
    crop is also chosen among the best free anchor's neighbours (:func:`~smartcrop.anchors.refine_anchors`;
    off by default: larger free crops; on the border grid lower IoU on fold models, docs/results.md).
    ``free_grid``: the free-ratio candidates, ``border`` (:func:`~smartcrop.anchors.border_anchors`: edges can
    reach the photo's border; the default) or ``gaic`` (the paper's grid).  ``faces``: crops that cut a detected
    face lose score before the choice (:mod:`smartcrop.faces`; needs the ``faces`` extra, off by default).
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "auto", model: str | None = None,
                 net=None, tta: bool = False, amp: bool = False, fuse: int = FUSE_K, refine: bool = False,
                 faces: bool = False, free_grid: str = FREE_GRID):
        from .weights import load_model, resolve_model

        choice = Choice(fuse, refine, faces, free_grid)  # checks them before the model loads
        _check_flags(tta=tta, amp=amp)
        if faces:  # fail before the model loads, with the extra to install
            from .faces import require

            require()

        self.device = resolve_device(device)
        if net is None:
            self.path = resolve_model(weights, model)
            net = load_model(self.path, device=self.device)
        else:
            self.path = getattr(net, "source_path", None)
            net = net.to(self.device).eval()
        self.net = net
        self.config = net.config
        self.tta = tta  # also score the mirrored image and average (two backbone passes)
        self.amp = amp  # bfloat16 autocast while scoring (see docs/performance.md for its effect on the crops)
        # fuse: a free crop averages this many overlapping top anchors, a ratio crop votes (fuse_box); refine: a
        # free crop is also chosen among the best free anchor's neighbours (refine_anchors); faces: crops cutting
        # a detected face lose score before the choice (smartcrop.faces); free_grid: the free-ratio candidates
        # (anchors.free_anchors)
        self.choice = choice
        self._scorer = None  # net with BatchNorm folded, made at the first scoring (see scorer)
        self._channels_last = self.device == "cpu"  # measured faster on a CPU (model.fold_batchnorm)
        # On a GPU the first use of an input shape costs far more than its arithmetic (an H200 took 0.34 s for
        # each of a `run`'s first batches, ~0.05 s warmed: docs/performance.md), and a batch's photos split into
        # network sizes in any proportion: each backbone pass is padded to a power of two (few shapes a size).
        self._pad_pow2 = self.device.startswith("cuda")

    @property
    def choice(self) -> Choice:
        """:attr:`fuse`, :attr:`refine`, :attr:`faces` and :attr:`free_grid` as one :class:`Choice`; setting it
        sets the four."""
        return Choice(self.fuse, self.refine, self.faces, self.free_grid)

    @choice.setter
    def choice(self, choice: Choice) -> None:
        self.fuse, self.refine, self.faces, self.free_grid = choice.fuse, choice.refine, choice.faces, choice.free_grid

    @property
    def scorer(self):
        """The model used for scoring: a copy of :attr:`net` with BatchNorm folded into the convolutions
        (:func:`~smartcrop.model.fold_batchnorm`) and, on a CPU, each convolution and linear layer fused with
        its activation (:func:`~smartcrop.model.fuse_activations`), made at the first call.  ``net`` stays as loaded, for
        fine-tuning and saving; a cropper whose ``net`` was changed after scoring must be made anew."""
        if self._scorer is None:
            from .model import fold_batchnorm, fuse_activations

            self._scorer = fold_batchnorm(self.net, channels_last=self._channels_last)
            if self._channels_last and not self.amp:  # on a CPU: each layer and its activation in one call
                fuse_activations(self._scorer)
        return self._scorer

    # -- low level -------------------------------------------------------------------------------------------

    def score_boxes(self, image, full_size: tuple[int, int] | None,
                    box_sets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scores of several sets of boxes on one image, from one backbone pass.

        ``image`` is a PIL image (possibly a reduced decode; any mode, as :meth:`crop` takes it); ``full_size``
        is the (w, h) of the image the boxes are expressed in (``None``: the image's own size).  A box that is
        not one inside that image (NaN, empty, beyond its border) is a one-line ``ValueError``.
        """
        _check_image(image)
        if not isinstance(box_sets, Mapping):
            raise TypeError(f"box_sets must map names to boxes, such as {{'mine': [[x1, y1, x2, y2]]}}, not "
                            f"{type(box_sets).__name__}")
        fw, fh = full_size or image.size
        if not (fw >= 1 and fh >= 1):
            raise ValueError(f"the image must be at least 1x1 pixels, not {fw}x{fh}")
        checked = {}
        for key, boxes in box_sets.items():
            try:
                checked[key] = check_boxes(boxes, fw, fh)
            except ValueError as e:
                raise ValueError(f"{key!r}: {e}") from None
        return self.score_boxes_batch([(image, full_size)], [checked])[0]

    def score_boxes_batch(self, images: Sequence[tuple], box_sets: Sequence[Mapping[str, np.ndarray]],
                          refine: Collection[str] = (), faces: Sequence | None = None) -> list:
        """Like :meth:`score_boxes` for several ``(image, full_size)``; images whose network input has the same
        size share one batched backbone pass.

        ``refine``: keys of free-ratio sets whose best box is refined — its neighbours
        (:func:`~smartcrop.anchors.refine_anchors`) are scored on the same features and appended to that set
        **in place** (``box_sets[i][key]`` becomes the longer array), their scores after the set's own.  The
        best box is the best by :meth:`choice_scores` with ``faces[i]`` (None: by the model's scores)."""
        import torch

        sizes = []
        for img, full in images:
            fw, fh = full or img.size
            sizes.append(network_size(fw, fh, self.config.short_side, self.config.max_long_side))
        results: list = [None] * len(images)
        net = self.scorer
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(sizes):
            groups.setdefault(s, []).append(i)
        if self.device.startswith("cuda"):
            cuda_setup(cudnn=True)  # a global setting, which training in the same process turns off
        amp = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.amp)
        with torch.inference_mode(), amp:
            for (net_w, net_h), idx in groups.items():
                x = torch.cat([image_tensor(images[i][0], (net_w, net_h)) for i in idx])
                if self._pad_pow2 and len(idx) & (len(idx) - 1):  # repeats of the last image, never read back
                    x = torch.cat([x, x[-1:].expand((1 << len(idx).bit_length()) - len(idx), -1, -1, -1)])
                if self._channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if self.device.startswith("cuda"):  # page-locked memory: the copy overlaps with other work
                    x = x.pin_memory().to(self.device, non_blocking=True)
                else:
                    x = x.to(self.device)
                feats = net.image_features(x)
                feats_m = net.image_features(x.flip(-1)) if self.tta else None
                for j, i in enumerate(idx):
                    fw, fh = images[i][1] or images[i][0].size
                    sx, sy = net_w / fw, net_h / fh
                    f = feats.select(j)
                    f_m = feats_m.select(j) if feats_m is not None else None
                    out = {}
                    for key, boxes in box_sets[i].items():
                        out[key] = self._score_on(net, f, f_m, boxes, sx, sy)
                        if key in refine and len(out[key]):
                            c = self.choice_scores(boxes, out[key], None if faces is None else faces[i])
                            extra = refine_anchors(np.asarray(boxes)[int(np.argmax(c))], fw, fh)
                            box_sets[i][key] = np.concatenate([np.asarray(boxes, dtype=np.float32), extra])
                            out[key] = np.concatenate([out[key], self._score_on(net, f, f_m, extra, sx, sy)])
                    results[i] = out
        return results

    def _score_on(self, net, f, f_m, boxes, sx: float, sy: float) -> np.ndarray:
        """Scores of ``boxes`` (full-size pixels, scaled by ``sx``, ``sy`` to the network input) on one image's
        features ``f`` (and, with test-time flips, averaged with their mirror images' on ``f_m``)."""
        import torch

        b = scale_boxes(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), sx, sy)
        if len(b) == 0:
            return np.zeros(0, dtype=np.float32)
        tb = torch.from_numpy(b).to(self.device)

        def scores(feats, boxes):  # SCORE_CHUNK boxes at a time: memory stays bounded however many are asked
            return torch.cat([net.score_boxes(feats, boxes[i:i + SCORE_CHUNK])
                              for i in range(0, len(boxes), SCORE_CHUNK)])

        sc = scores(f, tb)
        if f_m is not None:
            net_w = f.input_size[0]
            mirrored = torch.stack([net_w - tb[:, 2], tb[:, 1], net_w - tb[:, 0], tb[:, 3]], dim=1)
            sc = (sc + scores(f_m, mirrored)) / 2
        return sc.float().cpu().numpy()

    def best_crops_batch(self, images: Sequence[tuple], ratios: Sequence[str] = ("any",), top_k: int = 1,
                         faces: Sequence | None = None) -> list:
        """:meth:`best_crops` for several ``(image, full_size)`` pairs, batching the backbone where possible.
        ``faces``: with :attr:`faces`, each image's faces if already found (``run``'s decoding workers find
        them, :func:`~smartcrop.stages.prepare`); None: :meth:`find_faces` here.  ``ratios`` and ``top_k`` are
        checked as :meth:`crop` checks them."""
        ratios = _ratio_list(ratios)
        _check_top_k(top_k)
        box_sets = []
        for img, full in images:
            _check_image(img)
            fw, fh = full or img.size
            box_sets.append({r: anchors_for(fw, fh, r, self.free_grid) for r in ratios})
        if not self.faces:
            faces = [None] * len(images)
        elif faces is None:
            faces = [self.find_faces(img, full) for img, full in images]
        scores = self.score_boxes_batch(images, box_sets, refine=[r for r in ratios if self.refine and is_free(r)],
                                        faces=faces)
        return [self._pick(bs, sc, ratios, top_k, full or img.size, f)
                for bs, sc, f, (img, full) in zip(box_sets, scores, faces, images)]

    def find_faces(self, image, full_size: tuple[int, int] | None) -> np.ndarray | None:
        """With :attr:`faces`, the faces :meth:`choice_scores` avoids cutting (full-size pixels; searched at
        :data:`~smartcrop.faces.SEARCH_SCALE` of the model's input size); else None."""
        if not self.faces:
            return None
        from .faces import detect_for_model

        fw, fh = full_size or image.size
        size = network_size(fw, fh, self.config.short_side, self.config.max_long_side)
        return detect_for_model(image, (fw, fh), size)

    @staticmethod
    def choice_scores(boxes: np.ndarray, scores: np.ndarray, faces: np.ndarray | None) -> np.ndarray:
        """The scores a crop is chosen by: the model's, less :func:`~smartcrop.faces.face_penalty` for the
        boxes that cut one of ``faces`` (none: the model's)."""
        if faces is None or not len(faces):
            return scores
        from .faces import face_penalty

        return np.asarray(scores, dtype=np.float64) - face_penalty(boxes, faces)

    def fused(self, boxes: np.ndarray, scores: np.ndarray, i: int, free: bool) -> np.ndarray:
        """``boxes[i]`` fused with its neighbours by :func:`fuse_box`: a free crop with the ``fuse`` - 1 next
        best, a crop of a given ratio by a score-weighted vote of all (``fuse`` = 1: neither)."""
        return fuse_box(boxes, scores, i, self.fuse, temperature=None if free else VOTE_T)

    def _pick(self, box_sets, scores, ratios, top_k, size: tuple[int, int], faces=None) -> list[Crop]:
        """The ``top_k`` distinct best anchors per ratio (by :meth:`choice_scores`), each fused with its
        neighbours (:meth:`fused`) and, for a ratio crop, given that ratio in whole pixels as its anchors have
        it (:func:`~smartcrop.anchors.ratio_box`: a 1:1 crop is square); the score is the anchor's, as the
        model gave it.  ``size``: the image's full size."""
        crops: list[Crop] = []
        for r in ratios:
            boxes, s = box_sets[r], scores[r]
            c = self.choice_scores(boxes, s, faces)
            taken: list = []
            # fused, two distinct anchors' crops can come closer than the anchors were: such a crop is passed
            # over for the next distinct anchor (top_k 1: the best anchor's, as ever)
            for i in distinct_best(boxes, c, DISTINCT_IOU):
                box = self._as_crop(self.fused(boxes, c, i, is_free(r)), r, size)
                if _side(box) < MIN_CROP_SIDE:  # a tiny photo: the best crop that is not too small to write
                    i, box = self._best_writable(boxes, c, r, size, i, box)
                if taken and box_iou_matrix(np.asarray([box], np.float64), np.asarray(taken, np.float64)).max() \
                        > DISTINCT_IOU:
                    continue
                taken.append(box)
                crops.append(Crop(box, float(s[i]), r))
                if len(taken) == top_k:
                    break
        return crops

    def _best_writable(self, boxes, c, ratio: str, size, i: int, box):
        """``(index, box)`` of the best-scoring anchor (by ``c``) whose crop has sides of at least
        :data:`MIN_CROP_SIDE`, unfused: the vote can shrink a tiny photo's crop below what ``run`` writes, and
        its best anchor may be that small itself.  ``(i, box)`` unchanged when no anchor is that large."""
        for j in np.argsort(-np.asarray(c, dtype=np.float64), kind="stable"):
            anchor = self._as_crop(np.asarray(boxes[j], dtype=np.float64), ratio, size)
            if _side(anchor) >= MIN_CROP_SIDE:
                return int(j), anchor
        return i, box

    @staticmethod
    def _as_crop(b: np.ndarray, ratio: str, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """A fused or anchor box in whole pixels; a ratio crop given that ratio exactly (:func:`ratio_box`)."""
        return tuple(int(round(v)) for v in b) if is_free(ratio) else ratio_box(b, ratio, *size)

    # -- high level ------------------------------------------------------------------------------------------

    def best_crops(self, image, full_size: tuple[int, int] | None, ratios: Sequence[str] = ("any",),
                   top_k: int = 1) -> list[Crop]:
        """The ``top_k`` best distinct crops for every ratio, from one backbone pass (``image`` a PIL image,
        ``full_size`` as in :meth:`score_boxes`; ``ratios`` and ``top_k`` as in :meth:`crop`)."""
        return self.best_crops_batch([(image, full_size)], ratios, top_k)[0]

    def crop(self, image, ratios: Iterable[str] | str = ("any",), top_k: int = 1) -> list[Crop]:
        """Best crop(s) of ``image`` (a path, bytes or PIL image) for each of ``ratios`` (``"any"``, ``"16:9"``,
        a number; None: ``"any"``).

        Paths and bytes are decoded with EXIF orientation applied; boxes are in upright full-resolution pixels.
        A PIL image is taken as it is (no EXIF orientation: ``PIL.ImageOps.exif_transpose`` it first for an
        upright one), in any mode, as a file of that mode is read (alpha over white, 16-bit and float rescaled);
        boxes are in its pixels.  A bad ratio or ``top_k`` is a one-line ``ValueError``.
        """
        from PIL import Image

        ratios = _ratio_list(ratios)
        _check_top_k(top_k)
        if not isinstance(image, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)):
            _check_image(image, "a path, bytes or a PIL image")
        if isinstance(image, Image.Image):
            from .imageio import as_rgb

            loaded_img, full = as_rgb(image), image.size
        else:
            from .imageio import ImageError, load_image, safe_name

            try:
                li = load_image(image, target_short_side=self.config.short_side)
            except ImageError as e:  # the command line names the file itself; a caller of crop() gets it here
                if isinstance(image, (str, os.PathLike)):
                    raise ImageError(f"{safe_name(image)}: {e}") from None
                raise
            loaded_img, full = li.image, li.full_size
        return self.best_crops(loaded_img, full, ratios, top_k)
