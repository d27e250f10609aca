"""Golden boxes of the shipped model on a photo drawn by the test.

When the shipped model changes on purpose, these boxes change: look at the new crops, then update GOLDEN
(python -c in the docstring of test_shipped_model_golden_boxes prints them).
"""

import pytest

pytest.importorskip("torch")

from conftest import draw_photo  # noqa: E402

# ratio → (box, score) from weights/sacnet_mobilenetv2.safetensors (sha256 7b4567d3…, thirteenth session) on
# draw_photo(size=(640, 427), seed=7): a gradient sky, a green ground band and a red disc centred near (490, 239),
# radius 53.  Box voting (Cropper.fuse): the free crop is the mean of the 3 best overlapping anchors, each ratio
# crop the score-weighted mean of all of them (cropper.VOTE_T), in whole pixels of that ratio (anchors.ratio_box);
# free crops are chosen among the border grid (anchors.border_anchors).  The best anchors alone (fuse=1) are
# any (0, 71, 640, 391) (also the crop with Cropper(refine=True)), 16:9 (0, 34, 640, 394), 1:1 (270, 28, 640, 398),
# 4:5 (334, 45, 640, 427); among GAIC's grid (`--free-grid gaic`) "any" is (80, 77, 613, 374), score 0.3676 (with
# refine=True, (62, 83, 640, 380), 0.5746).
GOLDEN = {
    "any": ((0, 47, 640, 380), 0.6659),
    "16:9": ((52, 59, 639, 389), 0.5845),
    "1:1": ((263, 30, 640, 407), 0.2991),
    "4:5": ((327, 23, 640, 414), 0.5169),
}
SUBJECT = (437, 186, 543, 292)


def test_shipped_model_golden_boxes(tmp_path):
    """Reprint with: cd tests && python -c "from pathlib import Path; from conftest import draw_photo;
    from smartcrop import Cropper; p = draw_photo(Path('/tmp/g.png'), size=(640, 427), seed=7);
    [print(c.ratio, c.box, round(c.score, 4)) for c in Cropper(device='cpu').crop(p, list(GOLDEN))]"
    """
    from smartcrop import Cropper
    from smartcrop.weights import shipped_model_path

    if shipped_model_path() is None:
        pytest.fail("the shipped model is missing from weights/")
    photo = draw_photo(tmp_path / "golden.png", size=(640, 427), seed=7)
    crops = Cropper(device="cpu").crop(photo, list(GOLDEN))
    got = {c.ratio: (c.box, round(c.score, 4)) for c in crops}
    for ratio, (box, score) in GOLDEN.items():
        assert got[ratio][0] == box, (ratio, got[ratio])
        assert got[ratio][1] == pytest.approx(score, abs=2e-3), (ratio, got[ratio])
        x1, y1, x2, y2 = box
        assert x1 <= SUBJECT[0] and y1 <= SUBJECT[1] and x2 >= SUBJECT[2] and y2 >= SUBJECT[3]  # subject kept
