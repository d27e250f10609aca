"""Generic tensor operations on boxes and feature maps, used by the model: RoIAlign, RoDAlign and crop masks.

Everything is plain PyTorch (``grid_sample`` and pooling), so it runs on any device without compiled
extensions.  Boxes are ``(N, 4)`` tensors ``x1, y1, x2, y2`` in input-image pixels; a feature map of stride
``s`` has cell ``i`` covering ``[i·s, (i+1)·s)`` of the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sample_grid(boxes: torch.Tensor, out_size: int, sampling: int, stride: float, fh: int, fw: int) -> torch.Tensor:
    """Normalised ``grid_sample`` coordinates (N, S, S, 2) of ``sampling``² points per bin of each box.

    Feature pixel ``i`` covers ``[i, i+1)`` in feature units (image / stride), so its centre is ``i + 0.5``:
    the convention of ``grid_sample(align_corners=False)`` and of torchvision's ``roi_align(aligned=True)``.
    """
    n = boxes.shape[0]
    s = out_size * sampling
    t = (torch.arange(s, device=boxes.device, dtype=boxes.dtype) + 0.5) / s  # (S,) in (0, 1)
    b = boxes / stride
    xs = b[:, 0:1] + (b[:, 2:3] - b[:, 0:1]) * t  # (N, S)
    ys = b[:, 1:2] + (b[:, 3:4] - b[:, 1:2]) * t
    gx = xs / fw * 2 - 1
    gy = ys / fh * 2 - 1
    return torch.stack([gx[:, None, :].expand(n, s, s), gy[:, :, None].expand(n, s, s)], dim=-1)


def roi_align(feat: torch.Tensor, boxes: torch.Tensor, out_size: int = 9, stride: float = 16.0,
              sampling: int = 2) -> torch.Tensor:
    """RoIAlign of ``boxes`` (N, 4) on ``feat`` (1, C, H, W) → (N, C, S, S).

    Each output bin is the mean of ``sampling``×``sampling`` bilinear samples (zero outside the map).
    """
    _, c, fh, fw = feat.shape
    grid = _sample_grid(boxes, out_size, sampling, stride, fh, fw)
    out = F.grid_sample(feat.expand(boxes.shape[0], c, fh, fw), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(out, sampling) if sampling > 1 else out


def box_masks(boxes: torch.Tensor, height: int, width: int, stride: float) -> torch.Tensor:
    """Soft masks (N, 1, H, W): the share of each cell of an H×W map (cell = stride pixels) inside each box."""
    b = boxes / stride
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    cover_x = (torch.minimum(xs + 1, b[:, 2:3]) - torch.maximum(xs, b[:, 0:1])).clamp(0, 1)  # (N, W)
    cover_y = (torch.minimum(ys + 1, b[:, 3:4]) - torch.maximum(ys, b[:, 1:2])).clamp(0, 1)  # (N, H)
    return (cover_y[:, :, None] * cover_x[:, None, :])[:, None]


def rod_align(feat: torch.Tensor, boxes: torch.Tensor, out_size: int = 9, stride: float = 16.0,
              sampling: int = 2) -> torch.Tensor:
    """RoDAlign: the whole map with each crop zeroed out, aligned to ``out_size``² → (N, C, S, S)."""
    _, c, fh, fw = feat.shape
    keep = 1.0 - box_masks(boxes, fh, fw, stride)  # (N, 1, H, W)
    whole = feat.new_tensor([[0.0, 0.0, fw * stride, fh * stride]]).expand(boxes.shape[0], 4)
    grid = _sample_grid(whole, out_size, sampling, stride, fh, fw)
    out = F.grid_sample(feat * keep, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(out, sampling) if sampling > 1 else out


def crop_mask_axes(boxes: torch.Tensor, input_size: tuple[int, int], s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors ``(rows (N, s), columns (N, s))`` of :func:`crop_masks`: 1 where a cell's centre lies
    inside the box along that axis."""
    w, h = input_size
    c = (torch.arange(s, device=boxes.device, dtype=boxes.dtype) + 0.5) / s
    cx, cy = c * w, c * h
    inx = (cx[None, :] >= boxes[:, 0:1]) & (cx[None, :] <= boxes[:, 2:3])
    iny = (cy[None, :] >= boxes[:, 1:2]) & (cy[None, :] <= boxes[:, 3:4])
    return iny.to(boxes.dtype), inx.to(boxes.dtype)


def crop_masks(boxes: torch.Tensor, input_size: tuple[int, int], s: int) -> torch.Tensor:
    """Binary crop masks (N, 1, s, s): cells of an s×s grid over the input whose centre lies in the box."""
    rows, cols = crop_mask_axes(boxes, input_size, s)
    return (rows[:, :, None] * cols[:, None, :])[:, None]


def conv_crop_masks(rows: torch.Tensor, cols: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(crop_masks, weight, padding=k // 2)`` → (N, C, s, s) for a one-channel ``weight`` (C, 1, k, k),
    computed from the mask's two factors (a box mask is separable): about 7× fewer operations than the 2-D
    convolution, equal to it up to float rounding."""
    k = weight.shape[-1]
    p = k // 2
    col_win = F.pad(cols, (p, p)).unfold(1, k, 1)  # (N, s, k): the window of columns around each column
    row_win = F.pad(rows, (p, p)).unfold(1, k, 1)
    t = torch.einsum("cuv,njv->ncuj", weight[:, 0], col_win)  # (N, C, k, s): each kernel row along x
    return torch.matmul(row_win[:, None], t)  # (N, C, s, s): summed over the kernel rows along y


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(x, k)`` (stride k, no padding); in inference, when ``k`` divides the map, as two 1-D
    maxima over views: the same values without the argmax bookkeeping, measured 2.6× faster on a CPU for the
    spatial-aware encoder's (N, 16, 64, 64) maps.  Training keeps ``max_pool2d`` (its gradient on ties)."""
    n, c, h, w = x.shape
    if k == 1 or h % k or w % k or (x.requires_grad and torch.is_grad_enabled()):
        return F.max_pool2d(x, k)
    x = x.reshape(n, c, h, w // k, k).amax(-1)
    return x.reshape(n, c, h // k, k, w // k).amax(3)
