"""Shared fixtures: tiny datasets drawn by the tests themselves (nothing from ../shared is used here)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one test process per usable core, at most 4.  Many tests start a
    `smartcrop run -j 2` or a training run of their own, so more processes than that only queue for the cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def sha(p: Path) -> str:
    """sha256 of a file's bytes (to prove a file was not touched)."""
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def draw_photo(path: Path, size=(160, 120), seed: int = 0, fmt: str | None = None) -> Path:
    """A synthetic 'photo': a gradient sky, a ground band and a bright subject at a seeded position."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    sky = np.array([90, 140, 220]) * (1 - y) + np.array([230, 200, 170]) * y
    arr = np.broadcast_to(sky, (h, w, 3)).copy()
    arr[int(h * 0.7):] = [60, 110, 50]
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy = rng.integers(w // 5, 4 * w // 5), rng.integers(h // 4, 3 * h // 4)
    r = max(2, min(w, h) // 8)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 60, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def tiny_gaicd(tmp_path):
    """GAICD layout, split 'train', 3 images with grid-anchor annotations (y1 x1 y2 x2 MOS)."""
    from smartcrop.anchors import gaic_anchors

    root = tmp_path / "gaicd"
    rng = np.random.default_rng(1)
    for k in range(3):
        p = draw_photo(root / "images" / "train" / f"img{k}.jpg", seed=k)
        w, h = Image.open(p).size
        a = gaic_anchors(w, h)
        mos = rng.uniform(1, 5, len(a))
        lines = [f"{b[1]:.0f} {b[0]:.0f} {b[3]:.0f} {b[2]:.0f} {m:.2f}" for b, m in zip(a, mos)]
        (root / "annotations" / "train").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / "train" / f"img{k}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_fcdb(tmp_path):
    root = tmp_path / "fcdb"
    entries = []
    for k in range(5):
        draw_photo(root / "images" / f"{k}_x_b.jpg", seed=10 + k)
        entries.append({"url": f"https://example.invalid/{k}_x_b.jpg", "flickr_photo_id": k, "crop": [20, 10, 100, 80]})
    (root / "cropping_training_set.json").write_text(json.dumps(entries[:3]))
    (root / "cropping_testing_set.json").write_text(json.dumps(entries[3:]))  # apart, as FCDB's lists are
    return root


@pytest.fixture
def tiny_album(tmp_path):
    d = tmp_path / "album"
    for k in range(5):
        draw_photo(d / ("sub" if k % 2 else "") / f"p{k}.jpg", seed=20 + k)
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    return d


@pytest.fixture
def clean_album(tiny_album):
    """:func:`tiny_album` without its unreadable photo: a `finetune` or `train` on it leaves nothing out (exit 0)."""
    (tiny_album / "broken.jpg").unlink()
    return tiny_album


@contextlib.contextmanager
def _torch_threads(n: int):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a machine whose cores are busy, more threads make tiny models ~15x slower."""
    with _torch_threads(1):
        yield


@pytest.fixture
def small_model():
    """An untrained SAC-Net that sees 64-px inputs (fast on any CPU)."""
    torch = pytest.importorskip("torch")
    from smartcrop.model import ModelConfig, SACNet

    torch.manual_seed(0)
    return SACNet(ModelConfig(short_side=64, max_long_side=128)).eval()


@pytest.fixture
def small_model_file(tmp_path, small_model):
    from smartcrop.weights import save_model

    p = tmp_path / "models" / "small.safetensors"
    save_model(small_model, p, {"training": {"note": "untrained test model"}})
    return p


@pytest.fixture
def input_size_model_file(tmp_path):
    """An untrained model of the shipped input size (short side 256): faces are searched at the model's input
    size, where the small test model's 64 px would hold no face the cascade can see."""
    torch = pytest.importorskip("torch")
    from smartcrop.model import ModelConfig, SACNet
    from smartcrop.weights import save_model

    torch.manual_seed(0)
    p = tmp_path / "models" / "untrained256.safetensors"
    save_model(SACNet(ModelConfig()).eval(), p, {"training": {"note": "untrained test model"}})
    return p


@pytest.fixture
def one_thread():
    """Threaded CPU reductions sum in varying order (runs differ by ~1e-4 after Adam); one thread is exact."""
    with _torch_threads(1):
        yield
