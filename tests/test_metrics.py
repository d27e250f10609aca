import numpy as np
import pytest

from smartcrop.metrics import (acc_kn, boundary_displacement, fcdb_metrics, gaicd_metrics, iou, pcc, rankdata,
                               srcc)


def test_rankdata_average_ties():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_srcc_hand_computed_with_ties():
    # pred ranks: [1, 2, 3, 4]; gt [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4]
    # Pearson of ranks: dx = [-1.5, -.5, .5, 1.5], dy = [-1.5, 0, 0, 1.5]; sum dxdy = 4.5;
    # sum dx^2 = 5, sum dy^2 = 4.5 -> 4.5 / sqrt(22.5) = 0.948683
    assert srcc([0.1, 0.2, 0.3, 0.4], [1, 2, 2, 3]) == pytest.approx(0.9486833, abs=1e-6)
    assert srcc([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert srcc([1, 1, 1], [1, 2, 3]) == 0.0
    assert srcc([1, 2, 3], [7, 7, 7]) == 0.0


def test_srcc_ties_on_both_sides():
    # pred [1, 1, 2, 3] -> ranks [1.5, 1.5, 3, 4]; gt [3, 1, 1, 2] -> ranks [4, 1.5, 1.5, 3]; mean rank 2.5
    # dx = [-1, -1, .5, 1.5], dy = [1.5, -1, -1, .5]: sum dxdy = -1.5 + 1 - .5 + .75 = -0.25
    # sum dx^2 = 1 + 1 + .25 + 2.25 = 4.5 = sum dy^2 -> -0.25 / 4.5 = -0.0555...
    assert srcc([1, 1, 2, 3], [3, 1, 1, 2]) == pytest.approx(-0.25 / 4.5)
    # monotone transforms do not change it
    assert srcc([1, 2, 3, 4, 5], [10, 20, 30, 1000, 1e6]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        srcc([1, 2], [1, 2, 3])


def test_pcc_known_value():
    # x = [1,2,3], y = [1,3,2]: dx = [-1,0,1], dy = [-1,1,0] -> 1 / sqrt(2*2) = 0.5
    assert pcc([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # x = [1,2,3,4], y = [2,4,5,9]: dx = [-1.5,-.5,.5,1.5], dy = [-3,-1,0,4]; sum dxdy = 4.5+.5+0+6 = 11;
    # sum dx^2 = 5, sum dy^2 = 26 -> 11 / sqrt(130) = 0.964764
    assert pcc([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / np.sqrt(130))
    assert pcc([1, 2, 3], [-2, -4, -6]) == pytest.approx(-1.0)
    # constant vectors (also ones whose float mean is not exactly the value) and single entries give 0.0
    assert pcc([0.1] * 7, [3, 1, 4, 1, 5, 9, 2]) == 0.0
    assert pcc([1, 2, 3], [1.1, 1.1, 1.1]) == 0.0
    assert pcc([1.0], [2.0]) == 0.0
    with pytest.raises(ValueError):
        pcc([1, 2], [1, 2, 3])


def test_srcc_matches_scipy_if_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 6, 40).astype(float)
        b = rng.normal(size=40)
        assert srcc(a, b) == pytest.approx(stats.spearmanr(a, b).correlation, abs=1e-12)


def test_acc_kn_ties_counted_in():
    gt = np.array([5.0, 4.0, 4.0, 4.0, 3.0, 1.0])
    # N = 2: threshold = 2nd highest = 4.0, so every crop with 4.0 counts
    pred = np.array([0.0, 0.1, 0.2, 0.9, 0.8, 0.7])  # top-3: idx 3 (4.0), 4 (3.0), 5 (1.0)
    assert acc_kn(pred, gt, 1, 2) == 1.0
    assert acc_kn(pred, gt, 2, 2) == 0.5
    assert acc_kn(pred, gt, 3, 2) == pytest.approx(1 / 3)
    # N larger than the number of crops: threshold is the minimum, every crop is a hit
    assert acc_kn(pred, gt, 4, 10) == 1.0
    # ties in the prediction are broken by the lower index
    assert acc_kn([1.0, 1.0, 0.0], [1.0, 5.0, 2.0], 1, 1) == 0.0
    assert acc_kn([1.0, 1.0, 0.0], [5.0, 1.0, 2.0], 1, 1) == 1.0


def test_acc_kn_k_larger_than_n_and_crops():
    gt = np.array([5.0, 4.0, 4.0, 4.0, 3.0, 1.0])
    perfect = gt.copy()
    # K = 5 > N = 2: threshold 4.0; top-5 gt = 5, 4, 4, 4, 3 -> 4 hits of 5
    assert acc_kn(perfect, gt, 5, 2) == pytest.approx(0.8)
    # N = 1: only the best crop counts; K larger than the number of crops -> all 6 are "top-K", 1 hit
    assert acc_kn(perfect, gt, 10, 1) == pytest.approx(1 / 6)
    # tie at the N-th place, N = 5: sorted gt desc = 5, 4, 4, 4, [3], 1 -> threshold 3.0
    assert acc_kn(-gt, gt, 2, 5) == 0.5  # top-2 of the reversed prediction: gt 1.0 (miss), 3.0 (hit)
    g2 = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 5.0, 5.0, 1.0])  # 5th highest = 5.0, shared by three crops
    assert acc_kn([0, 0, 0, 0, 3, 2, 1, 0], g2, 3, 5) == 1.0  # top-3 are the three 5.0 crops: all counted in
    with pytest.raises(ValueError):
        acc_kn([1, 2], [1, 2], 0, 5)
    with pytest.raises(ValueError):
        acc_kn([], [], 1, 5)


def test_gaicd_metrics_average_and_percent():
    g1 = (np.array([3.0, 2.0, 1.0, 0.0, -1.0, -2.0]), np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))  # perfect
    g2 = (np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]), np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))  # reversed
    m = gaicd_metrics([g1, g2])
    assert list(m) == ["n_images", "srcc", "pcc", "acc1_5", "acc2_5", "acc3_5", "acc4_5", "acc1_10", "acc2_10",
                       "acc3_10", "acc4_10", "acc5", "acc10"]
    assert m["n_images"] == 2
    assert m["srcc"] == pytest.approx(0.0)  # (1 + -1) / 2
    assert m["pcc"] == pytest.approx(0.0)
    # image 1: all top-K in the top-5; image 2: the top-1 prediction is the worst crop (outside the top-5)
    # image 2, N=5 (threshold 2.0): top-1 = gt 1.0 -> 0; top-2 adds 2.0 -> 1/2; top-3 -> 2/3; top-4 -> 3/4
    assert m["acc1_5"] == pytest.approx(50.0)
    assert m["acc2_5"] == pytest.approx(75.0)
    assert m["acc3_5"] == pytest.approx((100 + 200 / 3) / 2)
    assert m["acc4_5"] == pytest.approx((100 + 75) / 2)
    assert m["acc5"] == pytest.approx(np.mean([m["acc1_5"], m["acc2_5"], m["acc3_5"], m["acc4_5"]]))
    assert m["acc5"] == pytest.approx((50 + 75 + (100 + 200 / 3) / 2 + 87.5) / 4)
    assert m["acc1_10"] == 100.0 and m["acc10"] == 100.0  # 6 crops < 10: threshold = min(gt), all hits
    # generators work; srcc / pcc are per-image means, not pooled
    m = gaicd_metrics(((np.arange(3.0), np.array([1.0, 2.0, 4.0])) for _ in range(3)))
    assert m["n_images"] == 3 and m["srcc"] == pytest.approx(1.0)
    assert m["pcc"] == pytest.approx(pcc([0, 1, 2], [1, 2, 4]))


def test_gaicd_metrics_empty():
    m = gaicd_metrics([])
    assert m["n_images"] == 0 and np.isnan(m["srcc"]) and np.isnan(m["acc10"])


def test_iou_and_disp():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)  # half of each overlaps
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert iou((0, 0, 10, 10), (0, 0, 5, 5)) == pytest.approx(0.25)  # contained
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    # offsets 10/100, 0, 5/50, 5/50 -> mean 0.075
    assert boundary_displacement((10, 0, 100, 45), (0, 0, 100, 50), 100, 50) == pytest.approx((0.1 + 0 + 0 + 0.1) / 4)
    # |2-0|/20 + |18-20|/20 + |1-0|/10 + |9-10|/10 = .1 + .1 + .1 + .1 -> mean 0.1
    assert boundary_displacement((2, 1, 18, 9), (0, 0, 20, 10), 20, 10) == pytest.approx(0.1)
    m = fcdb_metrics([((0, 0, 10, 10), (0, 0, 10, 10), 10, 10), ((0, 0, 10, 10), (5, 0, 15, 10), 20, 10)])
    assert m["n_images"] == 2
    assert m["iou"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["disp"] == pytest.approx((0 + (5 / 20 + 5 / 20) / 4) / 2)
    assert list(m) == ["n_images", "iou", "disp"]


def test_non_finite_scores_are_refused_not_ranked():
    """A NaN ranked first in SRCC, last in Acc and made PCC 0: a NaN-scoring model got plausible figures."""
    nan, inf = float("nan"), float("inf")
    for bad in ([nan, 1, 2, 3], [inf, 1, 2, 3]):
        for f in (srcc, pcc):
            with pytest.raises(ValueError, match="NaN or infinite"):
                f(bad, [4, 1, 2, 3])
            with pytest.raises(ValueError, match="ground-truth"):
                f([4, 1, 2, 3], bad)
        with pytest.raises(ValueError, match="NaN or infinite"):
            acc_kn(bad, [4, 1, 2, 3], 1, 1)
    with pytest.raises(ValueError, match="6 predicted"):
        gaicd_metrics([([nan] * 6, [5, 4, 3, 2, 1, 0])])


def test_pcc_of_tiny_or_huge_scores():
    """The denominator under- or overflowed (PCC 0.0) for spreads outside about 1e-154..1e154."""
    want = pcc([1, 2, 4], [1, 2, 3])
    assert want == pytest.approx(0.98198050606, abs=1e-10)
    for scale in (1e-200, 1e-160, 1e160):
        assert pcc([scale, 2 * scale, 4 * scale], [1, 2, 3]) == pytest.approx(want, abs=1e-12)
        assert pcc([1, 2, 4], [scale, 2 * scale, 3 * scale]) == pytest.approx(want, abs=1e-12)
