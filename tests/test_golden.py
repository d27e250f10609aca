"""Golden boxes of the shipped model on a photo drawn by the test.

When the shipped model changes on purpose, these boxes change: look at the new crops, then update GOLDEN
(python -c in the docstring of test_shipped_model_golden_boxes prints them).
"""

import pytest

pytest.importorskip("torch")

from conftest import draw_photo  # noqa: E402

# ratio → (box, score) from weights/sacnet_mobilenetv2.safetensors on draw_photo(size=(640, 427), seed=7):
# a gradient sky, a green ground band and a red disc centred near (490, 239), radius 53
# (box voting, Cropper.fuse: the free crop is the mean of the 3 best overlapping anchors, each ratio crop the
# score-weighted mean of all of them, cropper.VOTE_T, in whole pixels of that ratio, anchors.ratio_box, since the
# tenth session; the best anchors alone, fuse=1, were
# any (133, 89, 613, 374), 16:9 (0, 34, 640, 394), 1:1 (270, 57, 640, 427), 4:5 (334, 45, 640, 427)).  Free crops
# are chosen among the border grid since the eleventh session (anchors.border_anchors; the best anchor alone is
# (0, 71, 640, 391), which is also the crop with Cropper(refine=True)); among GAIC's grid (`--free-grid gaic`) "any" is
# (133, 89, 613, 385), score 0.7246 (with refine=True, (116, 107, 640, 385), 0.9089).
GOLDEN = {
    "any": ((36, 71, 640, 391), 0.9542),
    "16:9": ((67, 74, 639, 396), 0.9004),
    "1:1": ((256, 32, 639, 415), 0.7944),
    "4:5": ((324, 26, 639, 420), 0.965),
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
