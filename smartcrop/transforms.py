"""Image and target transforms shared by inference, training and fine-tuning.

* :func:`network_size` — the size the network sees (short side ``short_side``, long side capped);
* :func:`image_tensor` — a PIL image → float tensor (1, 3, h, w) in 0..255 at that size;
* :func:`photometric_jitter` — random brightness, contrast and saturation (training augmentation);
* :func:`normalize_mos` — GAICD mean opinion scores → the score head's target units.

The model's own input normalisation ((x − mean) / std, from :class:`~smartcrop.model.ModelConfig`) happens
inside the model, so every tensor produced here is plain 0..255 RGB.
"""

from __future__ import annotations

import numpy as np


def network_size(width: int, height: int, short_side: int = 256, max_long_side: int = 768) -> tuple[int, int]:
    """Size (w, h) the network sees: short side ``short_side``, long side capped, at least 32 px each."""
    s = short_side / min(width, height)
    if max(width, height) * s > max_long_side:
        s = max_long_side / max(width, height)
    return max(32, round(width * s)), max(32, round(height * s))


def image_tensor(image, size: tuple[int, int]):
    """PIL image (RGB, or any mode as :func:`~smartcrop.imageio.as_rgb` reads it) → float tensor (1, 3, h, w)
    in 0..255 at ``size`` (w, h)."""
    import torch
    from PIL import Image

    if image.mode != "RGB":
        from .imageio import as_rgb

        image = as_rgb(image)
    if image.size != tuple(size):
        image = image.resize(size, Image.BILINEAR, reducing_gap=2.0)
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float()


def photometric_jitter(x, amount: float, rng: np.random.Generator):
    """Random brightness, contrast and saturation (each ×U(1−a, 1+a)) on a 0..255 batch (B, 3, H, W)."""
    b, c, s = (float(rng.uniform(1 - amount, 1 + amount)) for _ in range(3))
    x = x * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * s + gray
    return x.clamp(0, 255)


def normalize_mos(mos: np.ndarray, mean: float, std: float) -> np.ndarray:
    """GAICD MOS → score-head targets ``(mos − mean) / std`` (GAIC normalises with 2.95 / 0.8)."""
    return (np.asarray(mos, dtype=np.float32) - mean) / std
