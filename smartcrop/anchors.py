"""Candidate crops ("anchors").

Two families:

* :func:`gaic_anchors` — GAIC's free-ratio grid anchors (Zeng et al., CVPR 2019 / TPAMI 2020): the image is
  split into a 12×12 grid, the top-left corner lies at the centre of one of the 4×4 top-left cells and the
  bottom-right corner at the centre of one of the 4×4 bottom-right cells; crops covering at least half of the
  grid with an aspect ratio in [0.5, 2] are kept (87-90 crops on usual photos).  These are exactly the crops
  GAICD's annotations score.
* :func:`refine_anchors` — the free crops around one crop, each edge moved by half a grid cell: with
  ``--refine`` a free crop is chosen among the GAIC anchors and these neighbours of the best one, which can
  reach the photo's border (GAIC's corners stop half a cell short of it).
* :func:`ratio_anchors` — crops of one requested aspect ratio ``W:H``: several scales from the largest crop of
  that ratio down to about half of the image area, each at several positions.  Every anchor has exactly that
  ratio to within one pixel and the largest crop of that ratio is always the first anchor.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the (upright) image, as ``float32`` numpy arrays of shape (N, 4).
This module only needs numpy.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np

GRID_BINS = 12


def _grid_anchors(width: int, height: int, bins: int, inset: float, max_share: float = 1.0,
                  corner: int | None = None, min_share: float = 0.5) -> list[tuple]:
    """The free anchors of a ``bins`` × ``bins`` grid: left/top edges ``inset`` + 0..corner-1 cells in from the
    border and right/bottom edges as far in from theirs (``corner`` default ``bins // 3``; ``inset`` ½: the
    cells' centres, GAIC's; 0: the grid's lines), kept when they cover at least ``min_share`` of the image (GAIC:
    half) and at most ``max_share`` of it with an aspect ratio within (0.5, 2), in GAICD's annotation order."""
    step_w = width / bins
    step_h = height / bins
    corner = bins // 3 if corner is None else corner  # 4 cells for a 12 grid
    boxes = []
    for r1 in range(corner):  # top row index
        for c1 in range(corner):  # left column index
            for r2 in range(bins - corner, bins):
                for c2 in range(bins - corner, bins):
                    rows, cols = r2 + 1 - 2 * inset - r1, c2 + 1 - 2 * inset - c1  # the crop's size in cells
                    area_cells = rows * cols
                    if area_cells <= (min_share - 1e-4) * bins * bins or area_cells > max_share * bins * bins + 1e-9:
                        continue
                    ratio = cols * step_w / (rows * step_h)  # width / height in pixels
                    if not 0.5 < ratio < 2.0:
                        continue
                    boxes.append((step_w * (c1 + inset), step_h * (r1 + inset), step_w * (c2 + 1 - inset),
                                  step_h * (r2 + 1 - inset)))
    return boxes


def gaic_anchors(width: int, height: int, bins: int = GRID_BINS) -> np.ndarray:
    """GAIC's free-ratio grid anchors for a ``width`` × ``height`` image, in GAICD's annotation order.

    The order (x1, y1, x2, y2 indices nested as in the GAIC reference code, rows first) matches the line
    order of GAICD's annotation files.
    """
    boxes = _grid_anchors(width, height, bins, 0.5)
    if not boxes:  # extreme panoramas: no grid crop has a ratio in (0.5, 2); fall back to the grid's extent
        step_w, step_h = width / bins, height / bins
        boxes.append((step_w * 0.5, step_h * 0.5, step_w * (bins - 0.5), step_h * (bins - 0.5)))
    return np.asarray(boxes, dtype=np.float32)


#: :func:`border_anchors` leaves out crops covering more than this share of the image (a "crop" of 90 % or more
#: of the photo, up to the whole frame, is not what a free crop is asked for)
BORDER_MAX_SHARE = 0.9

#: the free-ratio candidate sets: ``border`` (the default since the eleventh session) or ``gaic`` (the paper's)
FREE_GRIDS = ("border", "gaic")
FREE_GRID = "border"


def border_anchors(width: int, height: int, bins: int = GRID_BINS, max_share: float = BORDER_MAX_SHARE
                   ) -> np.ndarray:
    """GAIC's grid anchors with their corners on the grid's lines instead of the cells' centres, so that a crop
    can reach the photo's border: in the top-left / bottom-right ``bins // 3`` cells each edge lies at 0, 1, 2
    or 3 twelfths of the side from its border (GAIC: ½, 1½, 2½, 3½), same rules (at least half the photo,
    aspect ratio within (0.5, 2)), and none covering more than ``max_share`` of the photo.

    FCDB's experts crop to the photo's border on 43-52 % of their photos for the left and right edges (25-27 %
    top and bottom), where no GAIC anchor reaches (docs/results.md, eleventh session)."""
    boxes = _grid_anchors(width, height, bins, 0.0, max_share)
    if not boxes:  # extreme panoramas: as gaic_anchors
        return gaic_anchors(width, height, bins)
    return np.asarray(boxes, dtype=np.float32)


def check_free_grid(grid: str) -> str:
    """``grid`` if it names a free-ratio candidate set (:data:`FREE_GRIDS`), else ValueError."""
    if grid not in FREE_GRIDS:
        raise ValueError(f"free grid must be one of {', '.join(FREE_GRIDS)}, not {grid!r}")
    return grid


def free_anchors(width: int, height: int, grid: str = FREE_GRID) -> np.ndarray:
    """The free-ratio candidates: :func:`border_anchors` (``grid="border"``) or :func:`gaic_anchors` (``"gaic"``)."""
    if check_free_grid(grid) == "border":
        return border_anchors(width, height)
    return gaic_anchors(width, height)


#: :func:`refine_anchors` moves each edge of a crop by this fraction of the image's side (half a grid cell)
REFINE_STEP = 1 / (2 * GRID_BINS)


def refine_anchors(box, width: int, height: int, step: float = REFINE_STEP) -> np.ndarray:
    """The free crops around ``box``: each of its four edges moved by −``step``, 0 or +``step`` of the image's
    side (3⁴ − 1 = 80 moves at most, ``box`` itself left out), kept by GAIC's rules — inside the image, covering
    at least half of it, aspect ratio within (0.5, 2).

    Scoring these neighbours of the best GAIC anchor and choosing among both sets raised FCDB's free-ratio IoU
    for five fold models out of five on both held-out photo sets (+0.006 ± 0.002 and +0.008 ± 0.002), for
    1.9× the anchors.  The gain comes from the moves that take an edge to the photo's border, where no GAIC
    anchor reaches: kept within the grid's extent the neighbours gain nothing, and the chosen crops grow (on
    FCDB test from 0.69 to 0.77 of the photo on average; experts' crops 0.63) — a more conservative free crop,
    at times the whole photo with its frame: opt-in (``run --refine``; docs/results.md, eighth session)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = step * width, step * height
    m = np.arange(-1, 2, dtype=np.float64)
    a, b, c, d = np.meshgrid(m, m, m, m, indexing="ij")
    moves = np.stack([a.ravel(), b.ravel(), c.ravel(), d.ravel()], axis=1)
    moves = moves[np.any(moves != 0, axis=1)]
    boxes = np.array([x1, y1, x2, y2]) + moves * np.array([dx, dy, dx, dy])
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    boxes = boxes.astype(np.float32).astype(np.float64)  # the rules hold for the float32 boxes returned
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ok = (w >= 1) & (h >= 1)
    ok &= w * h > 0.4999 * width * height
    ratio = np.where(ok, w / np.maximum(h, 1e-9), 0)
    ok &= (ratio > 0.5) & (ratio < 2.0)
    return boxes[ok].astype(np.float32)


#: Most elongated aspect ratio accepted (either way): beyond 10:1 a "crop" is a strip, not a photo.
MAX_RATIO = 10

_RATIO_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[:xX/]\s*(\d+(?:\.\d+)?)\s*$")
_NUMBER_RE = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")  # a plain ratio such as 1.5 (no sign, exponent or "_")


def parse_ratio(text: str) -> Fraction:
    """Parse ``"16:9"``, ``"16x9"``, ``"4/5"``, ``"1.91:1"`` or a plain number such as ``"1.5"``.

    Raises ``ValueError`` with a one-line message for anything else (zero, negative, garbage, ratios beyond
    :data:`MAX_RATIO`:1 either way).
    """
    s = str(text).strip()
    m = _RATIO_RE.match(s)
    try:
        if m:
            w, h = Fraction(m.group(1)), Fraction(m.group(2))
        elif _NUMBER_RE.match(s):
            w, h = Fraction(s), Fraction(1)
        else:
            raise ValueError
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"bad aspect ratio {_short_repr(text)}: expected W:H such as 16:9 (plain numbers, "
                         "without a sign or an exponent)") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"bad aspect ratio {_short_repr(text)}: width and height must be positive")
    return _in_range(w / h, text)


def as_ratio(ratio: str | float | Fraction) -> Fraction:
    """``ratio`` as a Fraction: text as :func:`parse_ratio` reads it, or a number (width / height), checked the
    same way (positive, finite, within :data:`MAX_RATIO`:1 either way); anything else is a one-line
    ``ValueError``."""
    if isinstance(ratio, str):
        return parse_ratio(ratio)
    try:
        if isinstance(ratio, bool):
            raise TypeError
        r = ratio if isinstance(ratio, Fraction) else Fraction(float(ratio))
    except (TypeError, ValueError, OverflowError):  # not a number; NaN and infinities have no Fraction
        raise ValueError(f"bad aspect ratio {_short_repr(ratio)}: expected a positive number or W:H such as "
                         "16:9") from None
    if r <= 0:
        raise ValueError(f"bad aspect ratio {_short_repr(ratio)}: must be positive")
    return _in_range(r, ratio)


def _in_range(r: Fraction, given) -> Fraction:
    if not Fraction(1, MAX_RATIO) <= r <= MAX_RATIO:
        raise ValueError(f"bad aspect ratio {_short_repr(given)}: must lie between 1:{MAX_RATIO} and "
                         f"{MAX_RATIO}:1")
    return r


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def ratio_label(text: str) -> str:
    """File-name friendly label of a ratio string: ``"16:9"`` → ``"16x9"``, ``"any"`` → ``"any"``."""
    s = str(text).strip().lower()
    if s == "any":
        return "any"
    m = _RATIO_RE.match(s)
    if m:
        return f"{m.group(1)}x{m.group(2)}"
    return s.replace(".", "_")


def _positions(slack: float, n: int) -> np.ndarray:
    if n <= 1 or slack <= 0:
        return np.array([slack / 2.0])
    return np.linspace(0.0, slack, n)


def ratio_anchors(
    width: int,
    height: int,
    ratio: float | Fraction | str,
    n_scales: int = 6,
    max_positions: int = 7,
    min_area: float = 0.5,
) -> np.ndarray:
    """Crops of aspect ratio ``ratio`` (width / height) inside a ``width`` × ``height`` image.

    Scales run from the largest crop of that ratio down to one whose area is ``min_area`` of the image (or,
    when the largest crop is already smaller than that, down to 80% of its side).  At each scale the crop is
    placed at up to ``max_positions`` positions per axis, spaced about one GAIC grid cell (1/12 of the side)
    apart.  Coordinates are integers; each box's ``w / h`` equals ``ratio`` to within one pixel of either side.
    The first box is the largest crop of that ratio, centred.
    """
    r = float(as_ratio(ratio))
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")

    # largest crop of that ratio
    if width / height > r:
        h_max = float(height)
        w_max = h_max * r
    else:
        w_max = float(width)
        h_max = w_max / r
    max_area_frac = (w_max * h_max) / (width * height)
    s_min = math.sqrt(min(max(min_area / max_area_frac, 0.5), 0.8))
    scales = np.linspace(1.0, s_min, n_scales) if n_scales > 1 else np.array([1.0])

    boxes: list[tuple[int, int, int, int]] = []
    seen: set[tuple[int, int, int, int]] = set()
    for s in scales:
        w, h = _ratio_size(width, height, r, (h_max if r >= 1 else w_max) * s)
        slack_x, slack_y = width - w, height - h
        nx = min(max_positions, 1 + round(slack_x / (width / GRID_BINS)))
        ny = min(max_positions, 1 + round(slack_y / (height / GRID_BINS)))
        xs = _positions(slack_x, nx)
        ys = _positions(slack_y, ny)
        # centre first at the largest scale, so boxes[0] is the centred largest crop
        order_x = np.argsort(np.abs(xs - slack_x / 2.0), kind="stable")
        order_y = np.argsort(np.abs(ys - slack_y / 2.0), kind="stable")
        for iy in order_y:
            for ix in order_x:
                x1 = int(round(xs[ix]))
                y1 = int(round(ys[iy]))
                b = (x1, y1, x1 + w, y1 + h)
                if b not in seen:
                    seen.add(b)
                    boxes.append(b)
    return np.asarray(boxes, dtype=np.float32)


def _ratio_size(width: int, height: int, r: float, length: float) -> tuple[int, int]:
    """Integer (w, h) with ``w / h`` equal to ``r`` to within one pixel, at least 1×1, inside the image;
    ``length`` is the height when ``r`` >= 1, else the width."""
    if r >= 1:
        h = max(1, min(height, round(length)))
        w = max(1, min(width, round(h * r)))
        if w == width:  # width-limited: recompute h from w so the ratio stays within one pixel
            h = max(1, min(height, round(w / r)))
    else:
        w = max(1, min(width, round(length)))
        h = max(1, min(height, round(w / r)))
        if h == height:
            w = max(1, min(width, round(h * r)))
    return w, h


def ratio_box(box, ratio: float | Fraction | str, width: int, height: int) -> tuple[int, int, int, int]:
    """The integer box of aspect ratio ``ratio``, sized as :func:`ratio_anchors` sizes its anchors (``w / h``
    within one pixel of it; a 1:1 box is square), with the area and centre of ``box`` (floats, e.g. a vote
    over anchors of that ratio), moved inside the ``width`` × ``height`` image if it would leave it."""
    r = float(as_ratio(ratio))
    x1, y1, x2, y2 = (float(v) for v in box)
    area = max(x2 - x1, 1e-9) * max(y2 - y1, 1e-9)
    w, h = _ratio_size(int(width), int(height), r, math.sqrt(area / r) if r >= 1 else math.sqrt(area * r))
    left = min(max(round((x1 + x2) / 2 - w / 2), 0), int(width) - w)
    top = min(max(round((y1 + y2) / 2 - h / 2), 0), int(height) - h)
    return left, top, left + w, top + h


def is_free(ratio: str | float | Fraction | None) -> bool:
    """Whether ``ratio`` asks for a crop of free aspect ratio (``None`` or ``"any"``)."""
    return ratio is None or (isinstance(ratio, str) and ratio.strip().lower() == "any")


def anchors_for(width: int, height: int, ratio: str | float | Fraction | None, grid: str = FREE_GRID
                ) -> np.ndarray:
    """:func:`free_anchors` of ``grid`` for ``ratio`` ``None``/``"any"``, otherwise :func:`ratio_anchors`."""
    if is_free(ratio):
        return free_anchors(width, height, grid)
    return ratio_anchors(width, height, ratio)


def check_boxes(boxes, width: float, height: float, slack: float = 1.0) -> np.ndarray:
    """``boxes`` as an (N, 4) float32 array of (x1, y1, x2, y2), each a real box inside the ``width`` ×
    ``height`` image (up to ``slack`` pixels beyond it); anything else — another shape, a NaN or an
    infinity, an empty or inverted box, one outside the image — is a one-line ``ValueError`` naming the first."""
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("boxes must be numbers (x1, y1, x2, y2)") from None
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if b.ndim not in (1, 2) or b.shape[-1] != 4:
        raise ValueError(f"boxes must be (x1, y1, x2, y2) rows, not an array of shape {b.shape}")
    b = b.reshape(-1, 4)
    bad = ~np.isfinite(b).all(axis=1)
    bad |= (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    bad |= (b[:, 0] < -slack) | (b[:, 1] < -slack) | (b[:, 2] > width + slack) | (b[:, 3] > height + slack)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"box {i} ({', '.join(f'{v:g}' for v in b[i])}) is not a box inside the "
                         f"{width:g}x{height:g} image (x1 < x2, y1 < y2, finite)")
    return b.astype(np.float32)


def scale_boxes(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Scale (N, 4) boxes by ``sx`` horizontally and ``sy`` vertically."""
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, [0, 2]] *= sx
    out[:, [1, 3]] *= sy
    return out


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror (N, 4) boxes horizontally inside an image ``width`` pixels wide."""
    b = np.asarray(boxes)
    out = b.copy()
    out[:, 0] = width - b[:, 2]
    out[:, 2] = width - b[:, 0]
    return out


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of ``a`` (N, 4) and every box of ``b`` (M, 4)."""
    a = np.asarray(a, dtype=np.float64)[:, None, :]
    b = np.asarray(b, dtype=np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-12)
