"""The face-aware choice (``run --faces``): detection on a face the test draws, the penalty, and the choice."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from smartcrop import faces as faces_mod
from smartcrop.faces import FACE_KEEP, FACE_WEIGHT, face_penalty, kept_share

cv2 = pytest.importorskip("cv2", reason="the faces extra (opencv-python-headless) is not installed")


def draw_face(path: Path, size=(600, 300), centre=(300, 140), r=45, seed=0) -> tuple[Path, np.ndarray]:
    """A photo with one drawn frontal face (skin oval, hair, eyes, brows, nose, mouth) that OpenCV's frontal
    cascade finds; returns the path and the face's box (the oval's extent, hair included)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(60, 160, 3)))
    d = ImageDraw.Draw(img)
    fx, fy = centre
    d.rectangle([0, int(h * 0.75), w, h], fill=(70, 110, 60))
    d.ellipse([fx - r, fy - int(r * 1.3), fx + r, fy + int(r * 1.3)], fill=(225, 190, 160))
    d.ellipse([fx - r - 5, fy - int(r * 1.45), fx + r + 5, fy - int(r * 0.7)], fill=(60, 40, 30))
    for ex in (fx - r * 0.4, fx + r * 0.4):
        d.ellipse([ex - r * 0.2, fy - r * 0.25, ex + r * 0.2, fy - r * 0.05], fill=(250, 250, 250))
        d.ellipse([ex - r * 0.09, fy - r * 0.24, ex + r * 0.09, fy - r * 0.06], fill=(30, 20, 20))
        d.rectangle([ex - r * 0.25, fy - r * 0.42, ex + r * 0.25, fy - r * 0.34], fill=(70, 50, 40))
    d.polygon([(fx, fy - r * 0.05), (fx - r * 0.12, fy + r * 0.35), (fx + r * 0.12, fy + r * 0.35)],
              fill=(200, 150, 125))
    d.ellipse([fx - r * 0.35, fy + r * 0.55, fx + r * 0.35, fy + r * 0.75], fill=(150, 60, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.filter(ImageFilter.GaussianBlur(2)).save(path, quality=95)
    return path, np.array([fx - r - 5, fy - r * 1.45, fx + r + 5, fy + r * 1.3])


def test_penalty_counts_each_cut_face_by_its_size_relative_to_the_largest():
    faces = np.array([[10, 10, 50, 50], [100, 10, 120, 30]], float)  # areas 1600 and 400
    boxes = np.array([[0, 0, 200, 100],      # keeps both
                      [0, 0, 60, 60],        # cuts away the small one entirely
                      [30, 0, 200, 100],     # keeps half of the large one
                      [0, 0, 48, 100]])      # keeps 95 % of the large one (≥ FACE_KEEP: not cut), not the small
    share = kept_share(boxes, faces)
    assert share.shape == (4, 2) and np.allclose(share[:, 0], [1, 1, 0.5, 0.95]) and np.allclose(share[:, 1], [1, 0, 1, 0])
    assert FACE_KEEP == 0.9
    assert np.allclose(face_penalty(boxes, faces), FACE_WEIGHT * np.array([0, 0.25, 1.0, 0.25]))
    assert np.allclose(face_penalty(boxes, faces, weight=2.0), 2 * face_penalty(boxes, faces))
    assert np.array_equal(face_penalty(boxes, np.zeros((0, 4))), np.zeros(4))


def test_detect_faces_finds_a_drawn_face_in_full_size_pixels(tmp_path):
    path, truth = draw_face(tmp_path / "f.jpg", size=(1200, 600), centre=(400, 280), r=90)
    im = Image.open(path)
    found = faces_mod.detect_faces(im)
    assert found.shape == (1, 4)
    assert kept_share(found, truth[None])[0, 0] > 0.5 and kept_share(truth[None], found)[0, 0] > 0.8
    # on a reduced decode (what `run` scores), in the full image's pixels all the same
    small = im.resize((300, 150))
    again = faces_mod.detect_faces(small, im.size)
    assert again.shape == (1, 4) and np.abs(again - found).max() < 40
    # searched at another size (the model's input size), still in full-size pixels
    third = faces_mod.detect_faces(small, im.size, search_size=(400, 200))
    assert third.shape == (1, 4) and np.abs(third - found).max() < 40
    assert faces_mod.detect_faces(Image.new("RGB", (400, 300), (120, 130, 140))).shape == (0, 4)
    assert faces_mod.detect_faces(Image.new("RGB", (12, 9))).shape == (0, 4)  # smaller than any face


def test_the_choice_avoids_the_face_and_reports_the_models_score(small_model, monkeypatch):
    from smartcrop.cropper import Cropper

    c = Cropper(net=small_model, device="cpu", fuse=1)
    assert not c.faces and c.find_faces(Image.new("RGB", (8, 8)), None) is None  # opt-in
    threads = cv2.getNumThreads()
    Cropper(net=small_model, device="cpu", faces=True).find_faces(Image.new("RGB", (300, 200)), None)
    assert cv2.getNumThreads() == threads  # the library leaves OpenCV's process-wide settings alone
    boxes = np.array([[0, 0, 100, 100], [50, 0, 150, 100], [100, 0, 200, 100]], float)
    scores = np.array([0.2, 0.9, 0.5], np.float32)
    face = np.array([[130, 20, 170, 60]], float)  # cut by the first two boxes (kept: 0 and half)
    plain = c._pick({"1:1": boxes}, {"1:1": scores}, ["1:1"], 1, (300, 200))
    assert plain[0].box == (50, 0, 150, 100)  # the best-scoring box: it keeps only half of the face
    chosen = c._pick({"1:1": boxes}, {"1:1": scores}, ["1:1"], 1, (300, 200), face)
    assert chosen[0].box == (100, 0, 200, 100) and chosen[0].score == pytest.approx(0.5)
    assert np.array_equal(c.choice_scores(boxes, scores, None), scores)


def test_decoding_workers_find_the_same_faces_as_the_scorer(tmp_path, small_model):
    """``run`` finds faces in its decoding workers (``prepare(..., faces=True)``): the same faces as
    ``Cropper.find_faces`` on that image, and ``best_crops_batch`` uses the ones it is given."""
    from smartcrop.cropper import Cropper
    from smartcrop.model import ModelConfig, SACNet
    from smartcrop.stages import prepare

    path, _ = draw_face(tmp_path / "f.jpg", size=(480, 240), centre=(150, 116), r=44)
    p = prepare(str(path), 256, 768, faces=True)
    assert prepare(str(path), 256, 768).faces is None  # only when asked
    c = Cropper(net=SACNet(ModelConfig()).eval(), device="cpu", faces=True, fuse=1)
    assert p.faces.shape == (1, 4) and np.array_equal(p.faces, c.find_faces(p.image, p.full_size))
    given = c.best_crops_batch([(p.image, p.full_size)], ["1:1"], faces=[p.faces])[0]
    assert given == c.best_crops_batch([(p.image, p.full_size)], ["1:1"])[0]
    c.faces = False
    plain = c.best_crops_batch([(p.image, p.full_size)], ["1:1"], faces=[p.faces])[0]  # faces off: not used
    c.faces = True
    assert plain == c.best_crops_batch([(p.image, p.full_size)], ["1:1"], faces=[np.zeros((0, 4))])[0]


@pytest.mark.parametrize("scoring", ["main", "workers"])
def test_run_faces_keeps_the_drawn_faces_whole(tmp_path, input_size_model_file, scoring):
    from typer.testing import CliRunner

    from smartcrop.cli import app

    src = tmp_path / "in"
    truth = {}
    # faces where many 1:1 and 4:5 crops cut them
    for k, x in enumerate((50, 80, 120, 150, 165)):
        p, box = draw_face(src / f"p{k}.jpg", size=(240, 120), centre=(x, 58), r=22, seed=k)
        truth[p.name] = box
    before = {p: p.read_bytes() for p in src.iterdir()}
    cut = {}
    for flag in ("--no-faces", "--faces"):
        r = CliRunner().invoke(app, ["run", str(src), "--ratio", "1:1", "--ratio", "4:5", "--json", "--dry-run",
                                     "--fuse", "1", flag, "--scoring", scoring, "-j", "2",
                                     "--weights", str(input_size_model_file)])
        assert r.exit_code == 0, r.stderr
        recs = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        assert len(recs) == 10
        cut[flag] = sum(kept_share(np.array([rec["box"]], float), truth[Path(rec["input"]).name][None])[0, 0]
                        < FACE_KEEP for rec in recs)
    assert cut["--no-faces"] > 0  # the untrained model alone cuts some of them…
    assert cut["--faces"] == 0  # …and with --faces no crop does
    assert {p: p.read_bytes() for p in src.iterdir()} == before


def test_without_opencv_faces_is_a_one_line_usage_error(tmp_path, small_model_file, monkeypatch):
    from typer.testing import CliRunner

    from smartcrop.cli import app
    from tests.conftest import draw_photo

    real_import = builtins.__import__

    def no_cv2(name, *a, **k):
        if name == "cv2" or name.startswith("cv2."):
            raise ImportError("No module named 'cv2'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(faces_mod, "_cascade", None)
    monkeypatch.setattr(builtins, "__import__", no_cv2)
    assert not faces_mod.available()
    photo = draw_photo(tmp_path / "a.jpg")
    r = CliRunner().invoke(app, ["run", str(photo), "--faces", "--dry-run", "--weights", str(small_model_file)])
    assert r.exit_code == 2
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "pip install 'opencv-python-headless>=4.8,<5'" in msg


def test_refine_centres_on_the_best_anchor_by_the_face_aware_scores(small_model):
    """With ``--refine --faces`` the free crop's neighbours are those of the best anchor once faces count."""
    from smartcrop.anchors import gaic_anchors, refine_anchors
    from smartcrop.cropper import Cropper

    c = Cropper(net=small_model, device="cpu", refine=True, faces=True)
    photo = Image.new("RGB", (400, 300), (90, 120, 150))
    grid = gaic_anchors(400, 300)
    plain = c.score_boxes_batch([(photo, None)], [{"any": grid.copy()}])[0]["any"]
    best = grid[int(np.argmax(plain))]
    face = np.array([[best[2] - 10, best[1] + 10, best[2] + 30, best[1] + 50]])  # cut by the model's best anchor
    want = grid[int(np.argmax(c.choice_scores(grid, plain, face)))]
    assert not np.array_equal(want, best)
    sets = [{"any": grid.copy()}]
    c.score_boxes_batch([(photo, None)], sets, refine=["any"], faces=[face])
    assert np.allclose(sets[0]["any"][len(grid):], refine_anchors(want, 400, 300))


_FACES_THEN_A_POOL = """
import sys

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from smartcrop import faces
from smartcrop.cropper import Choice
from smartcrop.plan import plan_run
from smartcrop.runner import crop_photos

if __name__ == "__main__":
    src = Path(sys.argv[1])
    for k in range(4):
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(src / f"p{k}.png")
    cv2.setNumThreads(4)  # OpenCV's thread pool running, as on a machine of several cores
    for _ in range(3):
        faces.detect_faces(Image.open(src / "p0.png"))
    plan = plan_run([str(src)], ratios=["1:1"], dry_run=True, workers=2, choice=Choice(faces=True))
    summary = crop_photos(plan, weights=sys.argv[2], on_record=lambda r: print(r.ratio))
"""


def test_worker_processes_after_faces_were_searched_here_do_not_deadlock(tmp_path, small_model_file):
    """`Cropper(faces=True)` used in this process (OpenCV's thread pool started), then a run with worker
    processes: a worker forked from it hung for ever in its first OpenCV call (`cv2.setNumThreads`, the pool's
    lock copied held; seen as a hung test).  The pool now starts its workers from a fork server then."""
    import subprocess
    import sys

    script = tmp_path / "faces_then_pool.py"
    script.write_text(_FACES_THEN_A_POOL)
    (tmp_path / "in").mkdir()
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "in"), str(small_model_file)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["1:1"] * 4, r.stderr
