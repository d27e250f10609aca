"""Cropping metrics, exactly as GAIC (Zeng et al.) and FCDB (Chen et al.) define them.  numpy only.

GAICD: per-image Spearman (SRCC) and Pearson (PCC) correlation between predicted and human scores, averaged
over images; Acc K/N: the share of the top-K predicted crops whose human score is at least the N-th highest
human score of the image (ties counted in), averaged over images, in percent; Acc5 / Acc10 are the means over
K = 1..4.  FCDB: IoU and boundary displacement of the chosen crop against the expert crop.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata(method="average")`` for
    finite values; :func:`srcc` refuses NaN)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """Both score vectors as float64; a length mismatch or a NaN/infinite score (which no ranking metric is
    defined for: it ranked first in SRCC, last in Acc and gave PCC 0) is a ValueError."""
    a = np.asarray(pred, dtype=np.float64).ravel()
    b = np.asarray(gt, dtype=np.float64).ravel()
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} predictions for {len(b)} ground-truth scores")
    for name, v in (("predicted", a), ("ground-truth", b)):
        if not np.isfinite(v).all():
            raise ValueError(f"{int((~np.isfinite(v)).sum())} {name} scores are NaN or infinite")
    return a, b


def _constant(x: np.ndarray) -> bool:
    return len(x) < 2 or bool(np.all(x == x[0]))


def pcc(pred, gt) -> float:
    """Pearson correlation.

    Returns 0.0 when either vector is constant (or has fewer than two entries): the correlation is undefined
    there and the prediction carries no ordering information.  The check is exact, so float round-off in the
    mean of a constant vector cannot produce a spurious correlation.
    """
    a, b = _pair(pred, gt)
    if _constant(a) or _constant(b):
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    a /= np.abs(a).max()  # scaled to 1 (neither is constant): the product below cannot under- or overflow
    b /= np.abs(b).max()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if not den > 0:
        return 0.0
    return float(np.clip((a * b).sum() / den, -1.0, 1.0))


def srcc(pred, gt) -> float:
    """Spearman rank correlation: the Pearson correlation of the average ranks (ties share their mean rank).

    Returns 0.0 when either vector is constant (all tied), like :func:`pcc`.
    """
    a, b = _pair(pred, gt)
    return pcc(rankdata(a), rankdata(b))


def acc_kn(pred, gt, k: int, n: int) -> float:
    """GAIC's Acc K/N for one image, in 0..1.

    The top-K crops by prediction (ties broken by the lower index) count as hits when their ground-truth
    score is at least the N-th highest ground-truth score (ties at that score counted in), i.e. the threshold
    is ``sorted(gt, descending)[N-1]``; with fewer than N crops the threshold is ``min(gt)``.  With fewer than
    K crops, all of them are the top-K.
    """
    p, g = _pair(pred, gt)
    if len(g) == 0:
        raise ValueError("no crops")
    if k < 1 or n < 1:
        raise ValueError(f"K and N must be at least 1, got K={k}, N={n}")
    threshold = np.sort(g)[::-1][min(n, len(g)) - 1]
    top = np.argsort(-p, kind="stable")[: min(k, len(p))]
    return float((g[top] >= threshold).mean())


GAICD_KEYS = ("n_images", "srcc", "pcc", "acc1_5", "acc2_5", "acc3_5", "acc4_5", "acc1_10", "acc2_10", "acc3_10",
              "acc4_10", "acc5", "acc10")


def gaicd_metrics(pairs: Iterable[tuple]) -> dict:
    """Averages over images of ``(pred, gt)`` score pairs (one pair of arrays per image).

    Keys, in order: ``n_images``, ``srcc``, ``pcc`` (per image, then averaged), ``acc1_5`` … ``acc4_5``,
    ``acc1_10`` … ``acc4_10`` (Acc K/N averaged over images, in percent 0-100), ``acc5`` and ``acc10`` (means
    of the four Acc K/5 resp. Acc K/10).  With no images every value but ``n_images`` is NaN.
    """
    rows = []
    for pred, gt in pairs:
        row = {"srcc": srcc(pred, gt), "pcc": pcc(pred, gt)}
        for n in (5, 10):
            for k in (1, 2, 3, 4):
                row[f"acc{k}_{n}"] = 100.0 * acc_kn(pred, gt, k, n)
        rows.append(row)
    out: dict = {"n_images": len(rows)}
    for key in GAICD_KEYS[1:11]:
        out[key] = float(np.mean([r[key] for r in rows])) if rows else float("nan")
    out["acc5"] = float(np.mean([out[f"acc{k}_5"] for k in (1, 2, 3, 4)]))
    out["acc10"] = float(np.mean([out[f"acc{k}_10"] for k in (1, 2, 3, 4)]))
    return out


def iou(box_a, box_b) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (continuous pixel coordinates, area =
    ``(x2 - x1) * (y2 - y1)``); 0.0 when both are empty."""
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def boundary_displacement(box, gt, width: float, height: float) -> float:
    """Mean of the four side offsets, horizontal ones divided by the width, vertical ones by the height."""
    x1, y1, x2, y2 = (float(v) for v in box)
    g1, h1, g2, h2 = (float(v) for v in gt)
    return (abs(x1 - g1) / width + abs(x2 - g2) / width + abs(y1 - h1) / height + abs(y2 - h2) / height) / 4.0


def fcdb_metrics(items: Iterable[tuple]) -> dict:
    """Means over ``(pred_box, gt_box, width, height)``: n_images, iou, disp."""
    ious, disps = [], []
    for box, gt, w, h in items:
        ious.append(iou(box, gt))
        disps.append(boundary_displacement(box, gt, w, h))
    return {"n_images": len(ious), "iou": float(np.mean(ious)) if ious else float("nan"),
            "disp": float(np.mean(disps)) if disps else float("nan")}
