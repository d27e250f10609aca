import json

import numpy as np
import pytest
from PIL import Image

from smartcrop.data import list_images, read_fcdb, read_gaicd


def make_gaicd(root, split="val"):
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for name in ("b", "a", "c"):
        Image.new("RGB", (40, 30)).save(root / "images" / split / f"{name}.jpg")
    (root / "annotations" / split / "a.txt").write_text("1 2 20 30 3.5\n0 0 30 40 -2\n\n2 3 25 35 2.25\n")
    (root / "annotations" / split / "b.txt").write_text("0 0 30 40 4\n")
    # c has no annotation: unlabeled, skipped


def test_read_gaicd_swaps_y_x_and_skips_unrated(tmp_path):
    make_gaicd(tmp_path, "val")
    items = read_gaicd(tmp_path, "val")
    assert [it.name for it in items] == ["a", "b"]
    a = items[0]
    assert a.boxes.tolist() == [[2, 1, 30, 20], [3, 2, 35, 25]]  # x1 y1 x2 y2
    assert a.mos.tolist() == pytest.approx([3.5, 2.25])
    assert a.boxes.dtype == np.float32


def test_read_gaicd_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/test"):
        read_gaicd(tmp_path, "test")
    make_gaicd(tmp_path, "train")
    (tmp_path / "annotations" / "train" / "b.txt").write_text("0 0 30\n")
    with pytest.raises(ValueError, match=r"b.txt:1"):
        read_gaicd(tmp_path, "train")


def test_read_fcdb(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "123_abc_b.jpg")
    entries = [{"url": "https://x/y/123_abc_b.jpg", "flickr_photo_id": 123, "crop": [4, 5, 30, 20]},
               {"url": "https://x/y/missing.jpg", "flickr_photo_id": 9, "crop": [0, 0, 1, 1]}]
    (tmp_path / "cropping_testing_set.json").write_text(json.dumps(entries))
    with pytest.warns(UserWarning, match="1 listed photos"):
        items = read_fcdb(tmp_path, "test")
    assert len(items) == 1
    assert items[0].box == (4, 5, 34, 25)
    assert items[0].image_path.name == "123_abc_b.jpg"
    with pytest.raises(FileNotFoundError):
        read_fcdb(tmp_path, "train")
    with pytest.raises(ValueError):
        read_fcdb(tmp_path, "dev")


def test_list_images(tmp_path):
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    for p in ["x.JPG", "sub/y.png", "sub/.hidden/z.jpg", "notes.txt", ".dot.jpg"]:
        (tmp_path / p).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])]
    assert found == ["x.JPG", "sub/y.png"] or sorted(found) == ["sub/y.png", "x.JPG"]
    assert [p.name for p in list_images([tmp_path], recursive=False)] == ["x.JPG"]
    assert list_images([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]  # explicit files as given
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images([tmp_path / "nope"])


@pytest.mark.skipif(not __import__("pathlib").Path(__file__).resolve().parents[2].joinpath(
    "shared", "data", "gaicd").is_dir(), reason="needs ../shared/data (not part of the project)")
def test_real_gaicd_dev_layout():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    items = read_gaicd(root / "gaicd", "dev")
    assert len(items) == 100
    assert all(50 <= len(it.mos) <= 90 for it in items)
    assert len(read_fcdb(root / "fcdb", "test")) == 167
