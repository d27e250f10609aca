"""Every training loss, shared by :mod:`smartcrop.training` and :mod:`smartcrop.finetune`.

* :func:`gaicd_loss` — dense human scores (GAICD layout): ``L_reg`` smooth-L1 between the score head and the
  normalised MOS, plus ``λ_cls · L_cls``: binary cross-entropy of the pairwise ranking head on up to ``P``
  pairs whose MOS differ by more than ``η``.
* :func:`fcdb_loss` — one expert box per photo (FCDB layout): candidate crops carry their IoU with the expert
  box.  IoU is not a MOS, so it is never regressed: pairs whose IoU differ by more than ``τ`` give a margin
  ranking loss on the score head and BCE on the ranking head, weighted by ``λ_fcdb``.  (``mode="iou"``: the
  alternative we measured against, a smooth-L1 to the per-image z-score of IoU; ablation only.)
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


def gaicd_loss(model, cf: torch.Tensor, scores: torch.Tensor, targets: np.ndarray, rng: np.random.Generator, *,
               eta: float, max_pairs: int, lambda_cls: float, rank_weight: float = 0.0,
               rank_margin: float = 0.25) -> dict:
    """``{"reg": L_reg, "cls": λ_cls · L_cls}`` for crops with normalised MOS ``targets``; with ``rank_weight``
    > 0 also ``"rank"``: a margin ranking loss on the score head itself over the same pairs,
    ``rank_weight · mean(max(0, m − sign(t_i − t_j)(ŷ_i − ŷ_j)))`` (``m = rank_margin``, normalised MOS units;
    the pairs differ by more than ``η`` ≥ m, so a perfect regression satisfies it)."""
    dev = scores.device
    parts = {"reg": F.smooth_l1_loss(scores, torch.from_numpy(np.asarray(targets, np.float32)).to(dev))}
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


def fcdb_loss(model, cf: torch.Tensor, scores: torch.Tensor, ious: np.ndarray, rng: np.random.Generator, *,
              tau: float, max_pairs: int, margin: float, weight: float, lambda_cls: float, mode: str = "rank",
              image_ious: np.ndarray | None = None) -> dict:
    """Ranking losses for candidate crops whose IoU with the expert box is ``ious``.

    ``mode="iou"`` regresses the per-image z-score of IoU instead (``image_ious``: the IoU of every candidate
    of the image, for the z-score's mean and spread).
    """
    dev = scores.device
    pairs = pair_indices(ious, tau, max_pairs, rng)
    if not len(pairs):
        return {}
    pi, pj = _split(pairs, dev)
    better = torch.from_numpy(np.where(ious[pairs[:, 0]] > ious[pairs[:, 1]], 1.0, -1.0).astype(np.float32)).to(dev)
    parts = {}
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
