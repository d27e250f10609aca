"""The library API as a caller uses it (`Cropper.crop`, `Cropper.score_boxes`): images of any mode scored as the
same pixels read from a file are, and bad arguments refused in one line before any work."""

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from conftest import draw_photo  # noqa: E402
from smartcrop.cropper import Choice, Cropper  # noqa: E402


@pytest.fixture()
def cropper(small_model):
    return Cropper(net=small_model, device="cpu")


def _gray(tmp_path):
    draw_photo(tmp_path / "p.jpg", size=(120, 90), seed=3)
    return Image.open(tmp_path / "p.jpg").convert("L")


def test_sixteen_bit_and_float_images_are_scored_as_their_eight_bit_content(cropper, tmp_path):
    gray = _gray(tmp_path)
    a = np.asarray(gray)
    sixteen = Image.fromarray(a.astype(np.uint16) * 257)  # mode I;16: convert("RGB") saturates it to white
    unit = Image.fromarray(a.astype(np.float32) / 255)  # mode F in 0..1: convert("RGB") makes it black
    assert (sixteen.mode, unit.mode) == ("I;16", "F")
    want = cropper.crop(gray, ["1:1", "any"])
    for im in (sixteen, unit):
        got = cropper.crop(im, ["1:1", "any"])
        assert [c.box for c in got] == [c.box for c in want], im.mode
        assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-4), im.mode
    boxes = {"b": [[0, 0, 90, 90], [10, 5, 110, 80]]}
    np.testing.assert_allclose(cropper.score_boxes(sixteen, None, boxes)["b"],
                               cropper.score_boxes(gray, None, boxes)["b"], atol=1e-4)


def test_a_transparent_image_is_scored_over_white_as_its_file_is(cropper, tmp_path):
    rgb = np.asarray(Image.open(draw_photo(tmp_path / "p.jpg", size=(120, 90), seed=4)).convert("RGB"))
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 40:] = 255  # the left third transparent
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    rgba.save(tmp_path / "half.png")
    from_file = cropper.crop(tmp_path / "half.png", ["1:1", "any"])
    from_pil = cropper.crop(rgba, ["1:1", "any"])
    assert [c.box for c in from_pil] == [c.box for c in from_file]
    dropped = cropper.crop(rgba.convert("RGB"), ["1:1", "any"])  # what the alpha's loss would have scored
    assert [c.score for c in dropped] != pytest.approx([c.score for c in from_pil], abs=1e-4)
    # premultiplied modes too ("La" raised "conversion from La to L not supported")
    for pre in (rgba.convert("RGBa"), rgba.convert("LA").convert("La")):
        want = cropper.crop(pre.convert("RGBA" if pre.mode == "RGBa" else "LA"), ["1:1", "any"])
        assert [c.box for c in cropper.crop(pre, ["1:1", "any"])] == [c.box for c in want], pre.mode


@pytest.mark.parametrize("ratio, words", [(0, "must be positive"), (-1.5, "must be positive"),
                                          (float("nan"), "expected a positive number"),
                                          (float("inf"), "expected a positive number"), (1e6, "between 1:10"),
                                          (True, "expected a positive number"), ("0:1", "positive"),
                                          ("9" * 4000 + ":1", "between 1:10")])
def test_a_bad_ratio_is_a_one_line_value_error(cropper, tmp_path, ratio, words):
    with pytest.raises(ValueError, match=words) as e:
        cropper.crop(_gray(tmp_path), ["1:1", ratio])
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_numeric_ratios_crop_as_their_text_does(cropper, tmp_path):
    from fractions import Fraction

    gray = _gray(tmp_path)
    text = cropper.crop(gray, ["3:2", "4:5"])
    assert [c.box for c in cropper.crop(gray, [1.5, Fraction(4, 5)])] == [c.box for c in text]
    assert [c.box for c in cropper.crop(gray, None)] == [c.box for c in cropper.crop(gray, "any")]


def test_one_number_is_one_ratio_and_what_is_no_ratio_is_a_type_error(cropper, tmp_path):
    gray = _gray(tmp_path)
    assert [c.box for c in cropper.crop(gray, 1.5)] == [c.box for c in cropper.crop(gray, "3:2")]
    assert [c.box for c in cropper.crop(gray, np.float64(1.5))] == [c.box for c in cropper.crop(gray, [1.5])]
    for ratios in (b"16:9", {"16:9": 1}, object()):
        with pytest.raises(TypeError, match="ratios must be a ratio .* or a list of them") as e:
            cropper.crop(gray, ratios)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("call", ["best_crops", "best_crops_batch"])
def test_best_crops_checks_ratios_and_top_k_as_crop_does(cropper, tmp_path, call):
    """The lower-level calls took top_k 0 for every distinct crop and read "16" as the ratios "1" and "6"."""
    gray = _gray(tmp_path).convert("RGB")

    def best(ratios, top_k=1):
        if call == "best_crops":
            return cropper.best_crops(gray, None, ratios, top_k)
        return cropper.best_crops_batch([(gray, None)], ratios, top_k)[0]

    for top_k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="top_k must be a whole number"):
            best(["1:1"], top_k)
    with pytest.raises(ValueError, match="bad aspect ratio '16': must lie between"):
        best("16")
    assert [c.box for c in best("16:9")] == [c.box for c in cropper.crop(gray, "16:9")]
    assert [c.ratio for c in best("16:9")] == ["16:9"]


def test_what_is_not_an_image_is_a_type_error_that_says_what_is(cropper, tmp_path):
    arr = np.zeros((90, 120, 3), np.uint8)
    with pytest.raises(TypeError, match=r"must be a path, bytes or a PIL image, not ndarray \(PIL.Image.fromarray"):
        cropper.crop(arr, "1:1")
    with pytest.raises(TypeError, match=r"must be a PIL image \(crop\(\) also takes a path or bytes\), not str"):
        cropper.score_boxes(str(tmp_path / "p.jpg"), None, {"m": [[0, 0, 10, 10]]})
    with pytest.raises(TypeError, match="must be a PIL image .*not ndarray"):
        cropper.best_crops(arr, None, ["1:1"])
    with pytest.raises(TypeError, match="box_sets must map names to boxes"):
        cropper.score_boxes(_gray(tmp_path), None, [[0, 0, 10, 10]])


@pytest.mark.parametrize("kwargs, words", [({"fuse": 2.5}, "fuse must be a whole number"),
                                           ({"fuse": "3"}, "fuse must be a whole number"),
                                           ({"fuse": 0}, "fuse must be a whole number"),
                                           ({"fuse": True}, "fuse must be a whole number"),
                                           ({"refine": "no"}, "refine must be True or False"),
                                           ({"faces": 1}, "faces must be True or False"),
                                           ({"tta": None}, "tta must be True or False")])
def test_bad_choices_are_refused_when_the_cropper_is_made(small_model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        Cropper(net=small_model, device="cpu", **kwargs)


def test_choice_takes_numpy_integers_and_booleans():
    c = Choice(np.int64(2), np.bool_(True))
    assert c.fuse == 2 and type(c.fuse) is int


@pytest.mark.parametrize("top_k", [0, 2.5, "2", None])
def test_a_bad_top_k_is_refused(cropper, tmp_path, top_k):
    with pytest.raises(ValueError, match="top_k"):
        cropper.crop(_gray(tmp_path), "1:1", top_k=top_k)


@pytest.mark.parametrize("box, words", [([0, 0, float("nan"), 50], "nan"), ([0, 0, float("inf"), 50], "inf"),
                                        ([50, 10, 20, 60], "not a box inside the 120x90"),
                                        ([10, 10, 10, 60], "not a box inside"),
                                        ([200, 10, 300, 60], "not a box inside"),
                                        ([-30, 0, 60, 60], "not a box inside")])
def test_score_boxes_refuses_what_is_not_a_box_on_the_image(cropper, tmp_path, box, words):
    gray = _gray(tmp_path)
    with pytest.raises(ValueError, match=words) as e:
        cropper.score_boxes(gray, None, {"mine": [[0, 0, 60, 60], box]})
    assert str(e.value).startswith("'mine': box 1 (")


def test_score_boxes_takes_boxes_to_the_border_and_empty_sets(cropper, tmp_path):
    gray = _gray(tmp_path)
    out = cropper.score_boxes(gray, None, {"edge": [[0, 0, 120, 90], [0.5, 0, 120.5, 90]], "none": []})
    assert out["edge"].shape == (2,) and np.isfinite(out["edge"]).all() and out["none"].shape == (0,)
    with pytest.raises(ValueError, match="rows"):
        cropper.score_boxes(gray, None, {"x": [[0, 0, 60]]})
    with pytest.raises(ValueError, match="at least 1x1"):
        cropper.score_boxes(gray, (0, 0), {"x": [[0, 0, 1, 1]]})


def test_a_photo_that_cannot_be_read_is_named_in_the_error(cropper, tmp_path):
    from smartcrop.imageio import ImageError

    with pytest.raises(ImageError, match=r"^.*nope\.jpg: file not found$"):
        cropper.crop(tmp_path / "nope.jpg")
    (tmp_path / "text.jpg").write_text("not a photo")
    with pytest.raises(ImageError, match="text.jpg: "):
        cropper.crop(str(tmp_path / "text.jpg"))


def test_many_boxes_are_scored_in_chunks_with_the_same_scores(cropper, tmp_path, monkeypatch):
    import smartcrop.cropper

    gray = _gray(tmp_path)
    rng = np.random.default_rng(0)
    x1, y1 = rng.uniform(0, 50, 40), rng.uniform(0, 40, 40)
    boxes = np.stack([x1, y1, x1 + rng.uniform(20, 70, 40), y1 + rng.uniform(20, 50, 40)], axis=1)
    whole = cropper.score_boxes(gray, None, {"b": boxes})["b"]
    calls = []
    real = cropper.scorer.score_boxes
    monkeypatch.setattr(cropper.scorer, "score_boxes", lambda f, b: calls.append(len(b)) or real(f, b))
    monkeypatch.setattr(smartcrop.cropper, "SCORE_CHUNK", 16)
    chunked = cropper.score_boxes(gray, None, {"b": boxes})["b"]
    assert calls == [16, 16, 8]
    np.testing.assert_allclose(chunked, whole, atol=1e-5)



def test_top_k_crops_stay_distinct_once_fused(cropper, tmp_path):
    """The top-K anchors were distinct (IoU <= 0.6) but their fused boxes could nearly coincide (IoU 0.87 - 0.98
    as written): a crop fused that close to a better one is passed over for the next distinct anchor."""
    from smartcrop.metrics import iou

    worst = 0.0
    for seed in range(6):
        photo = draw_photo(tmp_path / f"p{seed}.jpg", size=(240, 160), seed=seed)
        crops = cropper.crop(photo, ["16:9", "1:1", "4:5", "any"], top_k=5)
        for r in ("16:9", "1:1", "4:5", "any"):
            boxes = [c.box for c in crops if c.ratio == r]
            assert 1 <= len(boxes) <= 5 and len(set(boxes)) == len(boxes)
            worst = max([worst] + [iou(a, b) for k, a in enumerate(boxes) for b in boxes[:k]])
    assert worst <= 0.6  # cropper.DISTINCT_IOU
