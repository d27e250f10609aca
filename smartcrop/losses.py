"""Every training loss, shared by :mod:`smartcrop.training` and :mod:`smartcrop.finetune`.

* :func:`gaicd_loss` — dense human scores (GAICD layout): ``L_reg`` smooth-L1 between the score head and the
  normalised MOS, plus ``λ_cls · L_cls``: binary cross-entropy of the pairwise ranking head on up to ``P``
  pairs whose MOS differ by more than ``η``.
* :func:`fcdb_loss` — one expert box per photo (FCDB layout): candidate crops carry their IoU with the expert
  box.  IoU is not a MOS, so it is never regressed: pairs whose IoU differ by more than ``τ`` give a margin
  ranking loss on the score head and BCE on the ranking head, weighted by ``λ_fcdb``.  (``mode="iou"``: the
  alternative we measured against, a smooth-L1 to the per-image z-score of IoU; ablation only.)  With
  ``listwise`` > 0 also a listwise term (:func:`listwise_targets`): the cross-entropy between the candidates'
  softmax of scores and a softmax of their IoU, which weighs the crops the model now ranks highest.
* :func:`rank_consistency` — unlabeled photos: the hinge ``max(0, δ + sign(p_ij − 0.5)(ŷ_j − ŷ_i))`` over all
  pairs of the sampled anchors, the ranking head's verdict acting as the score head's label (no gradient
  through the verdict).

Each function takes the crop features ``cf`` (N, D) and scores (N,) the model gave to N candidate crops, and
their targets as a numpy array; it returns a dict of named loss terms (empty when no pair qualifies).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pair_indices(targets: np.ndarray, min_gap: float, max_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``max_pairs`` index pairs (i, j) with ``|targets[i] - targets[j]| > min_gap``.

    Half of the pairs (at random) are presented in (better, worse) order and half in (worse, better) order,
    so that the ranking head sees both labels.
    """
    diff = targets[:, None] - targets[None, :]
    ii, jj = np.nonzero(diff > min_gap)
    if len(ii) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if len(ii) > max_pairs:
        sel = rng.choice(len(ii), max_pairs, replace=False)
        ii, jj = ii[sel], jj[sel]
    pairs = np.stack([ii, jj], 1)
    swap = rng.random(len(pairs)) < 0.5
    pairs[swap] = pairs[swap][:, ::-1]
    return pairs


def _split(pairs: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(pairs[:, 0]).to(device), torch.from_numpy(pairs[:, 1]).to(device)


def centred_smooth_l1(scores: torch.Tensor, targets: torch.Tensor, level_weight: float) -> torch.Tensor:
    """Smooth-L1 between scores and targets each taken around its own mean (blind to a common shift: the image's
    ranking is what SRCC and Acc measure), plus ``level_weight`` × smooth-L1 between the two means (which keeps
    the scores on the MOS scale)."""
    m, tm = scores.mean(), targets.mean()
    return F.smooth_l1_loss(scores - m, targets - tm) + level_weight * F.smooth_l1_loss(m, tm)


def top_weights(targets: np.ndarray, top_weight: float, share: float = 0.25) -> np.ndarray | None:
    """Per-crop weights of the regression that favour an image's best crops: the best ``share`` of ``targets``
    (at least one) weigh ``1 + top_weight``, the others 1, scaled to a mean of 1 (None when ``top_weight`` is 0)."""
    if top_weight <= 0 or not len(targets):
        return None
    k = max(1, int(round(share * len(targets))))
    w = np.ones(len(targets), np.float32)
    w[np.argsort(-np.asarray(targets), kind="stable")[:k]] += top_weight
    return w / w.mean()


def gaicd_loss(model, cf: torch.Tensor, scores: torch.Tensor, targets: np.ndarray, rng: np.random.Generator, *,
               eta: float, max_pairs: int, lambda_cls: float, rank_weight: float = 0.0,
               rank_margin: float = 0.25, centred: float | None = None, top_weight: float = 0.0) -> dict:
    """``{"reg": L_reg, "cls": λ_cls · L_cls}`` for crops with normalised MOS ``targets``; with ``rank_weight``
    > 0 also ``"rank"``: a margin ranking loss on the score head itself over the same pairs,
    ``rank_weight · mean(max(0, m − sign(t_i − t_j)(ŷ_i − ŷ_j)))`` (``m = rank_margin``, normalised MOS units;
    the pairs differ by more than ``η`` ≥ m, so a perfect regression satisfies it).  ``centred`` (not None):
    ``L_reg`` is :func:`centred_smooth_l1` with that level weight.  ``top_weight`` > 0: ``L_reg`` is the
    smooth-L1 weighted by :func:`top_weights` (the image's best crops count more)."""
    dev = scores.device
    t = torch.from_numpy(np.asarray(targets, np.float32)).to(dev)
    tw = top_weights(targets, top_weight)
    if tw is not None and centred is not None:
        raise ValueError("top_weight and centred regression do not combine")
    if tw is not None:
        reg = (F.smooth_l1_loss(scores, t, reduction="none") * torch.from_numpy(tw).to(dev)).mean()
    else:
        reg = F.smooth_l1_loss(scores, t) if centred is None else centred_smooth_l1(scores, t, centred)
    parts = {"reg": reg}
    if lambda_cls > 0 or rank_weight > 0:
        pairs = pair_indices(targets, eta, max_pairs, rng)
        if len(pairs):
            pi, pj = _split(pairs, dev)
            first_better = targets[pairs[:, 0]] > targets[pairs[:, 1]]
            if lambda_cls > 0:
                logits = model.rank_logits(cf[pi], cf[pj])
                label = torch.from_numpy(first_better.astype(np.float32)).to(dev)
                parts["cls"] = lambda_cls * F.binary_cross_entropy_with_logits(logits, label)
            if rank_weight > 0:
                sign = torch.from_numpy(np.where(first_better, 1.0, -1.0).astype(np.float32)).to(dev)
                parts["rank"] = rank_weight * torch.relu(rank_margin - sign * (scores[pi] - scores[pj])).mean()
    return parts


#: the listwise FCDB term's temperatures: of the scores (normalised-MOS units) and of the IoU targets
LIST_TEMP = 0.5
LIST_SIGMA = 0.1


def listwise_targets(ious: np.ndarray, sigma: float = LIST_SIGMA) -> np.ndarray:
    """The listwise FCDB term's target distribution over candidates: ``softmax(IoU / sigma)``."""
    z = (np.asarray(ious, np.float64) - np.max(ious)) / sigma
    q = np.exp(z)
    return (q / q.sum()).astype(np.float32)


def listwise_loss(scores: torch.Tensor, q: np.ndarray, temp: float = LIST_TEMP) -> torch.Tensor:
    """``−Σ q · log softmax(scores / temp)``: one image's candidates, ``q`` from :func:`listwise_targets`."""
    return -(torch.from_numpy(q).to(scores.device) * F.log_softmax(scores / temp, 0)).sum()


def fcdb_loss(model, cf: torch.Tensor, scores: torch.Tensor, ious: np.ndarray, rng: np.random.Generator, *,
              tau: float, max_pairs: int, margin: float, weight: float, lambda_cls: float, mode: str = "rank",
              image_ious: np.ndarray | None = None, listwise: float = 0.0) -> dict:
    """Ranking losses for candidate crops whose IoU with the expert box is ``ious``.

    ``mode="iou"`` regresses the per-image z-score of IoU instead (``image_ious``: the IoU of every candidate
    of the image, for the z-score's mean and spread).  ``listwise`` > 0 adds ``weight · listwise`` times
    :func:`listwise_loss` over all the candidates (``fcdb_list``).
    """
    dev = scores.device
    parts = {}
    if listwise > 0 and len(ious) > 1:
        parts["fcdb_list"] = weight * listwise * listwise_loss(scores, listwise_targets(ious))
    pairs = pair_indices(ious, tau, max_pairs, rng)
    if not len(pairs):
        return parts
    pi, pj = _split(pairs, dev)
    better = torch.from_numpy(np.where(ious[pairs[:, 0]] > ious[pairs[:, 1]], 1.0, -1.0).astype(np.float32)).to(dev)
    if mode == "iou":
        ref = ious if image_ious is None else image_ious
        z = ((ious - ref.mean()) / max(float(ref.std()), 1e-6)).astype(np.float32)
        parts["fcdb_reg"] = weight * F.smooth_l1_loss(scores, torch.from_numpy(z).to(dev))
    elif mode == "rank":
        parts["fcdb_rank"] = weight * torch.relu(margin - better * (scores[pi] - scores[pj])).mean()
    else:
        raise ValueError(f"unknown FCDB loss {mode!r} (rank, iou)")
    if lambda_cls > 0:
        logits = model.rank_logits(cf[pi], cf[pj])
        parts["fcdb_cls"] = weight * lambda_cls * F.binary_cross_entropy_with_logits(logits, (better > 0).float())
    return parts


def rank_consistency_loss(scores: tuple[torch.Tensor, torch.Tensor], rank_logits_ij: torch.Tensor,
                          delta: float = 0.1) -> torch.Tensor:
    """Mean of ``max(0, δ + sign(p_ij − 0.5)(ŷ_j − ŷ_i))`` over pairs; ``rank_logits_ij`` is logit(p_ij).

    ``scores`` are (ŷ_i, ŷ_j) tensors for each pair.  The ranking head's verdict is a label: no gradient.
    """
    yi, yj = scores
    sign = torch.sign(rank_logits_ij.detach())  # sign(p − 0.5) == sign(logit)
    return torch.relu(delta + sign * (yj - yi)).mean()


def rank_consistency(model, cf: torch.Tensor, scores: torch.Tensor, delta: float) -> torch.Tensor | None:
    """:func:`rank_consistency_loss` over all pairs of the N crops (None when N < 2)."""
    n = len(scores)
    if n < 2:
        return None
    ii, jj = np.triu_indices(n, 1)
    ti, tj = torch.from_numpy(ii).to(scores.device), torch.from_numpy(jj).to(scores.device)
    with torch.no_grad():
        logits = model.rank_logits(cf[ti], cf[tj])
    return rank_consistency_loss((scores[ti], scores[tj]), logits, delta)


class StepLosses:
    """The loss terms of one training step over several images, evaluated together.

    Every crop of the step is a row of one crop-feature tensor (one :meth:`SACNet.crop_features` call per
    backbone pass instead of one per image); each image adds its terms — elements regressed with smooth-L1,
    pairs under a hinge, pairs classified by the ranking head — with the weight ``w / len`` per entry, so a
    term is the sum over images of ``w`` times the image's mean: with ``w = term weight / images in the
    batch`` that is what :func:`gaicd_loss`, :func:`fcdb_loss` and :func:`rank_consistency` give image by
    image, averaged over the batch.  :meth:`evaluate` then runs each head once on all rows and the ranking
    head twice (its trained pairs, and rank consistency's verdicts without gradient): a few dozen kernel
    launches a step instead of a few dozen per image, which is what a GPU step was waiting on."""

    def __init__(self) -> None:
        self.smooth: dict = {}  # name → (head, rows, targets, weights)
        self.hinge: dict = {}  # name → (head, i, j, sign or None, margin, weights)
        self.bce: dict = {}  # name → (i, j, labels, weights)
        self.centred: dict = {}  # name → (head, rows, targets, group, level weights, weights)
        self.listwise: dict = {}  # name → (head, rows, target probabilities, group, weights)
        self.n_rows = 0
        self.n_groups = 0

    def rows(self, k: int) -> np.ndarray:
        """The rows of the next ``k`` crops of the step (in the order their features will be concatenated)."""
        self.n_rows += k
        return np.arange(self.n_rows - k, self.n_rows)

    @staticmethod
    def _add(store: dict, name: str, columns: tuple, weight: float, entry_weights: np.ndarray | None = None) -> None:
        n = len(columns[0])
        if n == 0:
            return
        w = np.full(n, weight / n, np.float32) if entry_weights is None else (weight / n) * entry_weights
        lists = store.setdefault(name, tuple([] for _ in range(len(columns) + 1)))
        for lst, col in zip(lists, (*columns, np.asarray(w, np.float32))):
            lst.append(np.asarray(col))

    def add_smooth_l1(self, name: str, head: str, rows: np.ndarray, targets: np.ndarray, weight: float,
                      entry_weights: np.ndarray | None = None) -> None:
        """``weight · mean(smooth_l1(s[rows], targets))`` with ``s`` the ``head``'s scores ("mos" or "fcdb");
        with ``entry_weights``, ``weight · mean(entry_weights · smooth_l1(…))``."""
        self._add(self.smooth, name, (np.full(len(rows), head == "fcdb"), rows, np.asarray(targets, np.float32)),
                  weight, entry_weights)

    def add_centred_smooth_l1(self, name: str, head: str, rows: np.ndarray, targets: np.ndarray, weight: float,
                              level_weight: float) -> None:
        """``weight · centred_smooth_l1(s[rows], targets, level_weight)`` (the rows' scores and targets each
        around its own mean, plus ``level_weight`` × smooth-L1 of the means)."""
        n = len(rows)
        self._add(self.centred, name, (np.full(n, head == "fcdb"), rows, np.asarray(targets, np.float32),
                                       np.full(n, self.n_groups), np.full(n, level_weight, np.float32)), weight)
        self.n_groups += bool(n)

    def add_listwise(self, name: str, head: str, rows: np.ndarray, q: np.ndarray, weight: float) -> None:
        """``weight · listwise_loss(s[rows], q)``: a softmax over the rows, as one group."""
        n = len(rows)
        if n < 2:
            return
        self._add(self.listwise, name, (np.full(n, head == "fcdb"), rows, np.asarray(q, np.float32),
                                        np.full(n, self.n_groups)), weight, np.full(n, n, np.float32))
        self.n_groups += 1

    def add_hinge(self, name: str, head: str, i: np.ndarray, j: np.ndarray, sign: np.ndarray | None,
                  margin: float, weight: float) -> None:
        """``weight · mean(max(0, margin − sign · (s_i − s_j)))``; ``sign`` None: the ranking head's verdict on
        (i, j), without gradient (rank consistency: ``max(0, δ + sign(p_ij − 0.5)(s_j − s_i))``)."""
        verdict = sign is None
        sign = np.zeros(len(i), np.float32) if verdict else np.asarray(sign, np.float32)
        self._add(self.hinge, name, (np.full(len(i), head == "fcdb"), np.full(len(i), verdict), i, j, sign,
                                     np.full(len(i), margin, np.float32)), weight)

    def add_bce(self, name: str, i: np.ndarray, j: np.ndarray, labels: np.ndarray, weight: float) -> None:
        """``weight · mean(BCE(rank_logits(f_i, f_j), labels))``."""
        self._add(self.bce, name, (i, j, np.asarray(labels, np.float32)), weight)

    def evaluate(self, model, cf: torch.Tensor) -> dict:
        """The terms (name → scalar tensor) for crop features ``cf`` (rows as added)."""
        dev = cf.device

        def columns(store):  # every term's entries in one tensor per column, and each term's count
            names = list(store)
            counts = [sum(len(a) for a in store[k][0]) for k in names]
            cols = [torch.from_numpy(np.concatenate([a for k in names for a in store[k][c]])).to(dev, non_blocking=True)
                    for c in range(len(store[names[0]]))]
            return names, counts, cols

        def sums(names, counts, per_entry):
            return dict(zip(names, (v.sum() for v in torch.split(per_entry, counts))))

        mos = model.mos_scores(cf)
        own = getattr(model.config, "fcdb_head", False)
        fcdb = model.fcdb_scores(cf) if own else mos

        def scores(is_fcdb, idx):
            return torch.where(is_fcdb, fcdb[idx], mos[idx]) if own else mos[idx]

        parts = {}
        if self.smooth:
            names, counts, (is_f, rows, t, w) = columns(self.smooth)
            parts.update(sums(names, counts, F.smooth_l1_loss(scores(is_f, rows), t, reduction="none") * w))
        if self.centred:
            names, counts, (is_f, rows, t, group, level, w) = columns(self.centred)
            s = scores(is_f, rows)
            n = torch.zeros(self.n_groups, device=dev, dtype=s.dtype).index_add_(0, group, torch.ones_like(s))
            m = torch.zeros_like(n).index_add_(0, group, s) / n.clamp(min=1)
            tm = torch.zeros_like(n).index_add_(0, group, t.to(s.dtype)) / n.clamp(min=1)
            loss = F.smooth_l1_loss(s - m[group], t - tm[group], reduction="none") * w
            # each group's level term, carried by its entries: w·n_group = the group's weight
            loss = loss + level * w * F.smooth_l1_loss(m[group], tm[group], reduction="none")
            parts.update(sums(names, counts, loss))
        if self.listwise:
            names, counts, (is_f, rows, q, group, w) = columns(self.listwise)
            z = scores(is_f, rows).float() / LIST_TEMP
            top = z.detach().max()  # one shift for every group: scores lie within a few units of each other
            lse = torch.zeros(self.n_groups, device=dev).index_add_(0, group, torch.exp(z - top)).log() + top
            parts.update(sums(names, counts, -q * (z - lse[group]) * w))
        if self.hinge:
            names, counts, (is_f, verdict, i, j, sign, margin, w) = columns(self.hinge)
            if verdict.any():  # rank consistency's labels: one pass of the ranking head, without gradient
                with torch.no_grad():
                    sign = sign.clone()
                    sign[verdict] = torch.sign(model.rank_logits(cf[i[verdict]], cf[j[verdict]]).float())
            loss = torch.relu(margin - sign * (scores(is_f, i) - scores(is_f, j))) * w
            parts.update(sums(names, counts, loss))
        if self.bce:
            names, counts, (i, j, label, w) = columns(self.bce)
            logits = model.rank_logits(cf[i], cf[j])
            parts.update(sums(names, counts, F.binary_cross_entropy_with_logits(logits, label, reduction="none") * w))
        return parts
