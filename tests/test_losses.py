import numpy as np
import pytest

torch = pytest.importorskip("torch")

from smartcrop.losses import (LIST_SIGMA, LIST_TEMP, StepLosses, fcdb_loss, gaicd_loss,  # noqa: E402
                              listwise_targets, pair_indices, rank_consistency, rank_consistency_loss, top_weights)


class Heads:
    """A stand-in model whose ranking head prefers the crop with the larger first feature."""

    def rank_logits(self, fi, fj):
        return (fi[:, 0] - fj[:, 0]) * 10


def test_pair_indices_keep_only_gaps_beyond_the_threshold_in_both_orders():
    rng = np.random.default_rng(0)
    t = np.array([1.0, 2.0, 3.5, 3.6])
    pairs = pair_indices(t, 0.5, 100, rng)
    assert {tuple(sorted(p)) for p in pairs.tolist()} == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)}
    better_first = [t[i] > t[j] for i, j in pairs.tolist()]
    assert any(better_first) and not all(better_first)  # both label values occur
    assert len(pair_indices(t, 0.5, 2, rng)) == 2
    assert pair_indices(np.ones(5), 0.5, 10, rng).shape == (0, 2)


def test_gaicd_loss_is_zero_when_scores_equal_targets_and_the_head_ranks_right():
    t = np.array([-1.0, 0.0, 1.5], np.float32)
    cf = torch.from_numpy(t)[:, None]  # the stand-in head ranks by this feature: right
    parts = gaicd_loss(Heads(), cf, torch.from_numpy(t), t, np.random.default_rng(0), eta=0.5, max_pairs=10,
                       lambda_cls=1.0)
    assert parts["reg"].item() == pytest.approx(0.0)
    assert parts["cls"].item() < 1e-3
    wrong = gaicd_loss(Heads(), -cf, torch.from_numpy(t) + 1, t, np.random.default_rng(0), eta=0.5, max_pairs=10,
                       lambda_cls=2.0)
    assert wrong["reg"].item() == pytest.approx(0.5)  # smooth-L1 of an error of 1
    assert wrong["cls"].item() > 10  # 2 × BCE of confident wrong verdicts
    assert set(gaicd_loss(Heads(), cf, torch.from_numpy(t), t, np.random.default_rng(0), eta=0.5, max_pairs=10,
                          lambda_cls=0.0)) == {"reg"}


def test_gaicd_rank_term_is_a_margin_on_the_score_head_over_mos_ordered_pairs():
    t = np.array([-1.0, 0.0, 1.5], np.float32)
    cf = torch.from_numpy(t)[:, None]
    kw = dict(eta=0.5, max_pairs=10, lambda_cls=1.0, rank_margin=0.25)
    # off by default, and the draws are the same with it on (the paper's recipe is unchanged)
    off = gaicd_loss(Heads(), cf, torch.from_numpy(t), t, np.random.default_rng(0), **kw)
    right = gaicd_loss(Heads(), cf, torch.from_numpy(t), t, np.random.default_rng(0), rank_weight=2.0, **kw)
    assert "rank" not in off and torch.equal(off["cls"], right["cls"])
    assert right["rank"].item() == 0.0  # every pair ordered right by more than the margin
    flat = torch.zeros(3, requires_grad=True)  # every pair tied: the margin is missed by 0.25 on each
    parts = gaicd_loss(Heads(), cf, flat, t, np.random.default_rng(0), rank_weight=2.0, **kw)
    assert parts["rank"].item() == pytest.approx(2.0 * 0.25)
    parts["rank"].backward()
    assert flat.grad[2] < 0 < flat.grad[0]  # pushes the best crop up and the worst down


def test_centred_regression_is_blind_to_a_shift_common_to_the_image_but_for_its_level_term():
    t = np.array([-1.0, 0.0, 1.5, 0.5], np.float32)
    cf = torch.from_numpy(t)[:, None]
    kw = dict(eta=0.5, max_pairs=10, lambda_cls=0.0)
    shifted = torch.from_numpy(t) + 3.0  # right order and spacing, 3 units too high
    assert gaicd_loss(Heads(), cf, shifted, t, np.random.default_rng(0), centred=0.0, **kw)["reg"].item() == 0.0
    level = gaicd_loss(Heads(), cf, shifted, t, np.random.default_rng(0), centred=0.1, **kw)["reg"].item()
    assert level == pytest.approx(0.1 * 2.5)  # smooth-L1 of the means' error of 3
    plain = gaicd_loss(Heads(), cf, shifted, t, np.random.default_rng(0), **kw)["reg"].item()
    assert plain == pytest.approx(2.5)
    # a wrong order still costs: the last two crops swapped
    y = torch.tensor([-1.0, 0.0, 0.5, 1.5], requires_grad=True)
    reg = gaicd_loss(Heads(), cf, y, t, np.random.default_rng(0), centred=0.0, **kw)["reg"]
    assert reg.item() == pytest.approx(2 * 0.5 / 4)  # two errors of 1 (smooth-L1 0.5 each) around unchanged means
    reg.backward()
    assert y.grad[2] < 0 < y.grad[3] and abs(float(y.grad.sum())) < 1e-6  # no push on the image's level


def test_top_weighted_regression_counts_an_images_best_quarter_more():
    t = np.array([0.1, 2.0, -1.0, 0.5, 1.0, -0.5, 0.0, 1.5], np.float32)  # best quarter: 2.0 and 1.5
    w = top_weights(t, 2.0)
    assert w.mean() == pytest.approx(1.0) and w[1] == w[7] == pytest.approx(3 * w[0])
    assert set(np.flatnonzero(w > w.min())) == {1, 7} and top_weights(t, 0.0) is None
    cf = torch.from_numpy(t)[:, None]
    kw = dict(eta=0.5, max_pairs=10, lambda_cls=0.0)
    err = torch.zeros(8)
    err[1] = 1.0  # an error of 1 on a best crop costs 3× one on another crop
    top = gaicd_loss(Heads(), cf, torch.from_numpy(t) + err, t, np.random.default_rng(0), top_weight=2.0, **kw)
    other = gaicd_loss(Heads(), cf, torch.from_numpy(t) + err.roll(1), t, np.random.default_rng(0), top_weight=2.0,
                       **kw)
    assert top["reg"].item() == pytest.approx(3 * other["reg"].item())
    plain = gaicd_loss(Heads(), cf, torch.from_numpy(t) + err, t, np.random.default_rng(0), **kw)
    assert plain["reg"].item() == pytest.approx(0.5 / 8)
    with pytest.raises(ValueError):
        gaicd_loss(Heads(), cf, torch.from_numpy(t), t, np.random.default_rng(0), top_weight=2.0, centred=0.1, **kw)


def test_fcdb_rank_loss_is_a_margin_on_iou_ordered_pairs():
    ious = np.array([0.9, 0.5, 0.1], np.float32)
    cf = torch.from_numpy(ious)[:, None]
    kw = dict(tau=0.2, max_pairs=10, margin=0.25, weight=2.0, lambda_cls=0.0)
    good = fcdb_loss(Heads(), cf, torch.tensor([1.0, 0.5, 0.0]), ious, np.random.default_rng(0), **kw)
    assert set(good) == {"fcdb_rank"} and good["fcdb_rank"].item() == pytest.approx(0.0)  # gaps ≥ margin
    flat = fcdb_loss(Heads(), cf, torch.zeros(3), ious, np.random.default_rng(0), **kw)
    assert flat["fcdb_rank"].item() == pytest.approx(2.0 * 0.25)  # every pair violates the margin by 0.25
    assert fcdb_loss(Heads(), cf, torch.zeros(3), np.full(3, 0.5, np.float32), np.random.default_rng(0), **kw) == {}


def test_fcdb_iou_mode_regresses_the_per_image_zscore():
    image_ious = np.array([0.9, 0.5, 0.1, 0.3], np.float32)
    ious = image_ious[:3]
    z = torch.from_numpy(((ious - image_ious.mean()) / image_ious.std()).astype(np.float32))
    kw = dict(tau=0.2, max_pairs=10, margin=0.25, weight=1.0, lambda_cls=0.0, mode="iou", image_ious=image_ious)
    cf = torch.zeros(3, 1)
    assert fcdb_loss(Heads(), cf, z, ious, np.random.default_rng(0), **kw)["fcdb_reg"].item() < 1e-6
    assert fcdb_loss(Heads(), cf, z + 1, ious, np.random.default_rng(0), **kw)["fcdb_reg"].item() == \
        pytest.approx(0.5, abs=1e-5)
    with pytest.raises(ValueError, match="unknown FCDB loss"):
        fcdb_loss(Heads(), cf, z, ious, np.random.default_rng(0), **{**kw, "mode": "l2"})


def test_fcdb_listwise_term_is_the_cross_entropy_of_score_and_iou_softmaxes():
    ious = np.array([1.0, 0.9, 0.5, 0.1], np.float32)
    q = listwise_targets(ious)
    assert q.sum() == pytest.approx(1.0) and list(np.argsort(-q)) == [0, 1, 2, 3]
    assert q[0] / q[1] == pytest.approx(np.exp(0.1 / LIST_SIGMA), rel=1e-5)
    kw = dict(tau=0.2, max_pairs=10, margin=0.25, weight=2.0, lambda_cls=0.0, listwise=0.5)
    cf = torch.zeros(4, 1)
    s = torch.tensor([0.3, -0.2, 0.8, 0.1])
    got = fcdb_loss(Heads(), cf, s, ious, np.random.default_rng(0), **kw)
    want = -(torch.from_numpy(q) * torch.log_softmax(s / LIST_TEMP, 0)).sum() * 2.0 * 0.5
    assert set(got) == {"fcdb_rank", "fcdb_list"} and got["fcdb_list"].item() == pytest.approx(want.item(), rel=1e-5)
    # scores ordered as IoU, and spread wider, lower it; it needs no pair beyond tau, and is off by default
    ordered = fcdb_loss(Heads(), cf, torch.from_numpy(ious * 4), ious, np.random.default_rng(0), **kw)
    assert ordered["fcdb_list"].item() < got["fcdb_list"].item()
    assert set(fcdb_loss(Heads(), cf, s, np.full(4, 0.5, np.float32), np.random.default_rng(0), **kw)) == {"fcdb_list"}
    assert "fcdb_list" not in fcdb_loss(Heads(), cf, s, ious, np.random.default_rng(0), **{**kw, "listwise": 0.0})


def test_step_losses_listwise_groups_are_each_images_own_softmax():
    class Net:
        config = None

        def mos_scores(self, cf):
            return cf[:, 0]

    cf = torch.tensor([[0.3], [-0.2], [0.8], [1.5], [0.0], [0.4], [-1.0]], requires_grad=True)
    acc = StepLosses()
    acc.add_centred_smooth_l1("c", "mos", acc.rows(2), np.zeros(2, np.float32), 0.0, 0.0)  # another group first
    a, b = acc.rows(3), acc.rows(2)
    qa, qb = listwise_targets(np.array([0.2, 0.9, 0.5])), listwise_targets(np.array([0.7, 0.1]))
    acc.add_listwise("l", "mos", a, qa, 0.5)
    acc.add_listwise("l", "mos", b, qb, 0.25)
    acc.add_listwise("l", "mos", np.array([0]), np.ones(1, np.float32), 1.0)  # one candidate: nothing to rank
    got = acc.evaluate(Net(), cf)["l"]

    def one(rows, q):
        return -(torch.from_numpy(q) * torch.log_softmax(cf[rows, 0] / LIST_TEMP, 0)).sum()

    want = 0.5 * one(a, qa) + 0.25 * one(b, qb)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    g_got, = torch.autograd.grad(got, cf, retain_graph=True)
    g_want, = torch.autograd.grad(want, cf)
    assert torch.allclose(g_got, g_want, atol=1e-6)


def test_rank_consistency_loss_follows_the_ranking_head():
    yi = torch.tensor([1.0, 0.0])
    yj = torch.tensor([0.0, 1.0])
    logits = torch.tensor([3.0, 3.0])  # head says i beats j in both pairs
    # pair 1 agrees (hinge 0.1 + (0 - 1) < 0 -> 0); pair 2 disagrees: 0.1 + 1 = 1.1
    assert rank_consistency_loss((yi, yj), logits, 0.1).item() == pytest.approx(1.1 / 2)


def test_rank_consistency_over_all_pairs_and_no_gradient_through_the_verdict():
    cf = torch.tensor([[3.0], [2.0], [1.0]], requires_grad=True)  # head: 0 > 1 > 2
    y = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)  # score head disagrees on pairs (0,2) and (1,2)
    loss = rank_consistency(Heads(), cf, y, 0.1)
    assert loss.item() == pytest.approx((0.1 + 1.1 + 1.1) / 3)
    loss.backward()
    assert cf.grad is None or cf.grad.abs().sum() == 0
    assert y.grad.abs().sum() > 0
    assert rank_consistency(Heads(), cf[:1], y[:1], 0.1) is None
