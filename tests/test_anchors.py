import numpy as np
import pytest

from smartcrop.anchors import (
    anchors_for, border_anchors, box_iou_matrix, free_anchors, gaic_anchors, parse_ratio, ratio_anchors, ratio_label,
)


@pytest.mark.parametrize("w,h,count", [(1024, 683, 83), (683, 1024, 83), (1024, 1024, 90), (1024, 556, 52)])
def test_gaic_counts_and_geometry(w, h, count):
    a = gaic_anchors(w, h)
    assert len(a) == count
    step_w, step_h = w / 12, h / 12
    # corners at the centres of the 4x4 corner cells
    for col, step, lo in ((0, step_w, 0), (1, step_h, 0), (2, step_w, 8), (3, step_h, 8)):
        idx = a[:, col] / step - 0.5
        assert np.allclose(idx, np.round(idx), atol=1e-4)
        idx = np.round(idx)
        assert idx.min() >= lo and idx.max() <= lo + 3
    cells = ((a[:, 2] - a[:, 0]) / step_w) * ((a[:, 3] - a[:, 1]) / step_h)
    assert (cells >= 72 - 1e-3).all()  # at least half of the 144 cells
    r = (a[:, 2] - a[:, 0]) / (a[:, 3] - a[:, 1])
    assert ((r > 0.5) & (r < 2.0)).all()


def test_gaic_first_boxes_match_gaicd_annotation_order():
    # first lines of a real GAICD annotation of a 1024x683 image, converted to x1 y1 x2 y2 (rounded pixels)
    a = np.round(gaic_anchors(1024, 683))
    assert a[0].tolist() == [43, 28, 811, 484]
    assert a[1].tolist() == [43, 28, 896, 484]


def test_gaic_extreme_panorama_still_gives_a_crop():
    a = gaic_anchors(30000, 200)
    assert len(a) >= 1
    assert (a[:, 0] >= 0).all() and (a[:, 2] <= 30000).all()


@pytest.mark.parametrize("ratio", ["16:9", "1:1", "4:5", "9:16", "3:2", "21:9", "1.91:1"])
@pytest.mark.parametrize("w,h", [(4000, 3000), (3000, 4000), (1024, 683), (30000, 200), (200, 30000), (1, 1),
                                 (7, 5), (64, 64)])
def test_ratio_anchors_exact_ratio_bounds_and_largest_first(ratio, w, h):
    r = float(parse_ratio(ratio))
    a = ratio_anchors(w, h, ratio)
    assert len(a) >= 1
    assert (a[:, 0] >= 0).all() and (a[:, 1] >= 0).all() and (a[:, 2] <= w).all() and (a[:, 3] <= h).all()
    bw, bh = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    assert (bw >= 1).all() and (bh >= 1).all()
    assert np.allclose(a, np.round(a))
    # exact ratio to within one pixel on either side
    assert (np.minimum(np.abs(bw - bh * r), np.abs(bh - bw / r)) <= 1.0 + 1e-6).all()
    # the largest crop of that ratio comes first and touches two opposite sides
    assert bw[0] * bh[0] == (bw * bh).max()
    if w >= 8 and h >= 8:
        assert bw[0] >= w - 1 or bh[0] >= h - 1
    # no duplicates
    assert len({tuple(b) for b in a.tolist()}) == len(a)


def test_ratio_anchors_cover_a_range_of_scales_and_positions():
    a = ratio_anchors(4000, 3000, "16:9")
    areas = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) / (4000 * 3000)
    assert areas.max() == pytest.approx(0.75, abs=0.01)
    assert areas.min() == pytest.approx(0.5, abs=0.03)  # down to about half of the image
    assert len(np.unique(np.round(areas, 3))) >= 5
    assert len(np.unique(a[:, 1])) >= 3  # several vertical positions
    assert 30 <= len(a) <= 200


def test_same_ratio_as_image_gives_whole_image_first():
    a = ratio_anchors(1600, 900, "16:9")
    assert a[0].tolist() == [0, 0, 1600, 900]


@pytest.mark.parametrize("bad", ["16:0", "0:9", "-1:2", "abc", "", "16:9:1", "1000:1"])
def test_parse_ratio_rejects_bad(bad):
    with pytest.raises(ValueError):
        parse_ratio(bad)


@pytest.mark.parametrize("bad", ["1e9:1", "1:1e9", "+16:9", "1e3"])
def test_a_ratio_in_a_form_not_read_says_which_numbers_are(bad):
    """"1e9:1" is in W:H form: "expected W:H such as 16:9" alone did not say what was wrong with it."""
    with pytest.raises(ValueError, match="without a sign or an exponent"):
        parse_ratio(bad)


def test_parse_ratio_forms_and_labels():
    assert parse_ratio("16:9") == parse_ratio("16x9") == parse_ratio("32/18")
    assert float(parse_ratio("1.5")) == 1.5
    assert ratio_label("16:9") == "16x9"
    assert ratio_label("any") == "any"


def test_anchors_for_dispatch_and_iou():
    assert len(anchors_for(1024, 683, "any")) == len(anchors_for(1024, 683, None)) == 153  # the default grid
    assert np.array_equal(anchors_for(1024, 683, "any"), border_anchors(1024, 683))
    assert np.array_equal(anchors_for(1024, 683, "any", "gaic"), gaic_anchors(1024, 683))
    assert len(gaic_anchors(1024, 683)) == 83
    with pytest.raises(ValueError, match="free grid"):
        free_anchors(1024, 683, "dense")
    b = anchors_for(1024, 683, "1:1")
    assert box_iou_matrix(b[:1], b[:1])[0, 0] == pytest.approx(1.0)
    iou = box_iou_matrix(np.array([[0, 0, 2, 2]]), np.array([[1, 0, 3, 2], [5, 5, 6, 6]]))
    assert iou[0].tolist() == pytest.approx([1 / 3, 0.0])


def test_fuse_box_averages_the_best_overlapping_anchors_below_the_chosen_one():
    from smartcrop.anchors import ratio_anchors
    from smartcrop.cropper import fuse_box

    boxes = np.array([[0, 0, 100, 100], [10, 0, 110, 100], [0, 10, 100, 110], [300, 300, 400, 400],
                      [5, 5, 105, 105]], dtype=np.float64)
    scores = np.array([0.9, 0.8, 0.7, 0.85, 0.95])
    np.testing.assert_array_equal(fuse_box(boxes, scores, 0, k=1), boxes[0])
    # box 0's neighbours: 4 scores higher (not used), 3 does not overlap, 1 and 2 are the next best overlapping
    np.testing.assert_allclose(fuse_box(boxes, scores, 0, k=3), boxes[[0, 1, 2]].mean(0))
    np.testing.assert_allclose(fuse_box(boxes, scores, 0, k=2), boxes[[0, 1]].mean(0))
    np.testing.assert_allclose(fuse_box(boxes, scores, 3, k=3), boxes[3])  # nobody overlaps it
    np.testing.assert_allclose(fuse_box(boxes, scores, 4, k=3), boxes[[4, 0, 1]].mean(0))
    # the score-weighted vote: every overlapping box scoring no higher, weights exp((s_j - s_i) / T)
    w = np.exp((scores[[4, 0, 1, 2]] - 0.95) / 0.1)
    np.testing.assert_allclose(fuse_box(boxes, scores, 4, k=3, temperature=0.1),
                               (w[:, None] * boxes[[4, 0, 1, 2]]).sum(0) / w.sum())
    np.testing.assert_allclose(fuse_box(boxes, scores, 4, k=1, temperature=0.1), boxes[4])
    np.testing.assert_allclose(fuse_box(boxes, scores, 4, k=3, temperature=1e-4), boxes[4], atol=1e-6)
    # anchors of one ratio average to that ratio (to within a pixel once rounded)
    anchors = ratio_anchors(4000, 3000, 16 / 9)
    worst = np.abs((anchors[:, 2] - anchors[:, 0]) / (anchors[:, 3] - anchors[:, 1]) - 16 / 9).max()
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.normal(size=len(anchors))
        for t in (None, 0.1):
            x1, y1, x2, y2 = fuse_box(anchors, s, int(np.argmax(s)), temperature=t)
            assert abs((x2 - x1) / (y2 - y1) - 16 / 9) <= worst + 1e-9
            w, h = round(x2) - round(x1), round(y2) - round(y1)
            assert abs(w - h * 16 / 9) <= 16 / 9 + 1


@pytest.mark.parametrize("ratio", ["1:1", "16:9", "4:5", "3:1", "1:3"])
def test_ratio_box_gives_a_vote_its_ratio_in_whole_pixels_and_keeps_anchors_as_they_are(ratio):
    """A ratio crop averaged over anchors (box voting) has fractional corners; ``ratio_box`` sizes it as the
    anchors are sized (a 1:1 crop is square, 16:9 within a pixel), keeps its centre and area and the image."""
    from fractions import Fraction

    from smartcrop.anchors import parse_ratio, ratio_anchors, ratio_box
    from smartcrop.cropper import fuse_box

    r = float(parse_ratio(ratio))
    rng = np.random.default_rng(3)
    for w, h in [(640, 427), (427, 640), (300, 300), (4032, 3024), (97, 61)]:
        anchors = ratio_anchors(w, h, ratio)
        for a in anchors:  # an anchor is already such a box
            assert ratio_box(a, ratio, w, h) == tuple(int(v) for v in a)
        for _ in range(10):
            s = rng.normal(size=len(anchors))
            vote = fuse_box(anchors, s, int(np.argmax(s)), temperature=0.5)
            x1, y1, x2, y2 = ratio_box(vote, ratio, w, h)
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            bw, bh = x2 - x1, y2 - y1
            if ratio == "1:1":
                assert bw == bh
            assert abs(bw - bh * r) <= max(r, 1) and abs(bw / r - bh) <= max(1 / r, 1)
            assert abs((x1 + x2) / 2 - (vote[0] + vote[2]) / 2) <= 1 and abs((y1 + y2) / 2 - (vote[1] + vote[3]) / 2) <= 1
            assert bw * bh == pytest.approx((vote[2] - vote[0]) * (vote[3] - vote[1]), rel=0.02, abs=2 * (bw + bh))
    assert ratio_box((0, 0, 50, 50), Fraction(16, 9), 640, 360) == ratio_box((0, 0, 50, 50), "16:9", 640, 360)
    assert ratio_box((600, 300, 700, 420), "1:1", 640, 360)[2:] == (640, 360)  # moved back inside the image


@pytest.mark.parametrize("w,h", [(1024, 683), (683, 1024), (4000, 3000), (300, 300)])
def test_refine_anchors_move_each_edge_by_half_a_cell_within_gaics_rules(w, h):
    from smartcrop.anchors import REFINE_STEP, refine_anchors

    for box in gaic_anchors(w, h)[[0, 40, -1]]:
        r = refine_anchors(box, w, h)
        assert 0 < len(r) <= 80 and r.dtype == np.float32
        r = r.astype(np.float64)
        bw, bh = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
        assert (r[:, :2] >= 0).all() and (r[:, 2] <= w + 1e-3).all() and (r[:, 3] <= h + 1e-3).all()
        assert (bw * bh > 0.4999 * w * h).all() and (bw / bh > 0.5).all() and (bw / bh < 2).all()
        assert not any(np.allclose(b, box, atol=1e-3) for b in r)  # the box itself is not repeated
        moves = (r - box) / np.array([w, h, w, h]) / REFINE_STEP
        clipped = np.isclose(r[:, [0, 1, 2, 3]], [0, 0, w, h], atol=1e-3)  # an edge stopped by the border
        assert np.all(np.isclose(moves, np.round(moves), atol=1e-4) | clipped)
        assert set(np.round(moves[~clipped]).astype(int).tolist()) <= {-1, 0, 1}
    # a centred box of 80 % of each side has all 80 neighbours
    box = np.array([0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])
    assert len(refine_anchors(box, w, h)) == 80


@pytest.mark.parametrize("w,h", [(1024, 683), (683, 1024), (1000, 1000), (1600, 900), (997, 661)])
def test_border_anchors_reach_the_border_on_the_grid_lines(w, h):
    b = border_anchors(w, h).astype(np.float64)
    g = gaic_anchors(w, h).astype(np.float64)
    sw, sh = w / 12, h / 12
    # every edge on a grid line: 0..3 cells from its border
    for k, (step, side) in enumerate([(sw, 0), (sh, 0), (sw, w), (sh, h)]):
        cells = np.abs(b[:, k] - side) / step
        assert np.allclose(cells, np.round(cells), atol=1e-3)
        assert set(np.round(cells).astype(int)) == {0, 1, 2, 3}
        assert np.min(np.abs(g[:, k] - side)) >= step / 2 - 1e-3  # GAIC's never nearer than half a cell
    share = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
    assert share.min() >= 0.5 - 1e-6 and share.max() <= 0.9
    ratio = (b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1])
    assert ratio.min() > 0.5 and ratio.max() < 2.0
    assert len(np.unique(b.round(3), axis=0)) == len(b)
    # the whole frame and anything over 90 % left out, unless asked for
    whole = border_anchors(w, h, max_share=1.0)
    assert len(whole) > len(b) and [0, 0, w, h] in np.round(whole).astype(int).tolist()


def test_border_anchors_extreme_panorama_falls_back_to_gaic():
    assert np.array_equal(border_anchors(5000, 500), gaic_anchors(5000, 500))
