from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from smartcrop.anchors import gaic_anchors  # noqa: E402
from smartcrop.data import list_images, read_fcdb, read_gaicd  # noqa: E402
from smartcrop.model import ModelConfig, SACNet  # noqa: E402
from smartcrop.training import (TrainConfig, TrainData, Trainer, fcdb_candidates, prepare_samples,  # noqa: E402
                                run_training, size_batches, split_validation)


def make_trainer(frozen=14, seed=0, fcdb_head=False, **kw):
    torch.manual_seed(seed)
    net = SACNet(ModelConfig(short_side=64, max_long_side=128, fcdb_head=fcdb_head))
    return Trainer(net, TrainConfig(epochs=2, frozen_layers=frozen, seed=seed, gaicd_share=0.5, **kw), "cpu",
                   log=lambda s: None)


def samples(tr, tiny_gaicd, tiny_fcdb, tiny_album):
    data = TrainData(gaicd=read_gaicd(tiny_gaicd, "train"), fcdb=read_fcdb(tiny_fcdb, "train"),
                     unlabeled=list_images([tiny_album]))
    g, f, u, skipped = prepare_samples(tr, data, lambda s: None, progress=False)
    assert skipped == 1  # broken.jpg
    return g, f, u


@pytest.mark.parametrize("frozen", [14, 0])
def test_each_loss_takes_a_step(tiny_gaicd, tiny_fcdb, tiny_album, frozen):
    tr = make_trainer(frozen)
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    assert len(g) == 3 and len(f) == 3 and len(u) == 5
    for s, keys in ((g[0], {"reg", "cls"}), (f[0], {"fcdb_rank", "fcdb_cls"}), (u[0], {"rc"})):
        tr.model.train()
        parts = tr.consistency_loss(s) if s.kind == "unlabeled" else tr.labeled_loss(s)
        assert set(parts) == keys
        loss = sum(parts.values())
        assert torch.isfinite(loss)
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
        tr.opt.zero_grad()
        loss.backward()
        tr.opt.step()
        changed = [n for n, p in tr.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert any(n.startswith("score_head") for n in changed) or s.kind == "unlabeled"
        assert any(n.startswith("region_fc") for n in changed)
    frozen_params = [p for n, p in tr.model.named_parameters() if n.startswith("backbone.features.0.")]
    assert all(not p.requires_grad for p in frozen_params) == (frozen > 0)


def test_a_separate_fcdb_head_keeps_fcdb_off_the_mos_and_ranking_heads(tiny_gaicd, tiny_fcdb, tiny_album):
    tr = make_trainer(fcdb_head=True)
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    tr.model.train()

    def grads(parts):
        tr.opt.zero_grad()
        sum(parts.values()).backward()
        return {n.split(".")[0] for n, p in tr.model.named_parameters()
                if p.grad is not None and p.grad.abs().sum() > 0}

    fcdb_parts = tr.labeled_loss(f[0])
    assert set(fcdb_parts) == {"fcdb_rank"}  # no ranking-head term
    touched = grads(fcdb_parts)
    assert "fcdb_head" in touched and "region_fc" in touched
    assert "score_head" not in touched and "rank_head" not in touched
    touched = grads(tr.labeled_loss(g[0]))
    assert {"score_head", "rank_head"} <= touched and "fcdb_head" not in touched
    assert "fcdb_head" not in grads(tr.consistency_loss(u[0]))
    # a crop's score is the MOS head's plus fcdb_mix times the FCDB head's
    tr.model.eval()
    cf = torch.randn(5, tr.model.head_in)
    with torch.no_grad():
        mos, fc = tr.model.mos_scores(cf), tr.model.fcdb_scores(cf)
        tr.model.config.fcdb_mix = 0.5
        assert torch.allclose(tr.model.score_features(cf), mos + 0.5 * fc)
        tr.model.config.fcdb_mix = 0.0
        assert torch.equal(tr.model.score_features(cf), mos)


def test_resume_reproduces_an_uninterrupted_run(tiny_gaicd, tiny_fcdb, tiny_album, tmp_path, one_thread):
    tr = make_trainer()
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    for _ in range(2):
        tr.train_epoch(tr.epoch_plan(g, f), u)
    straight = {k: v.clone() for k, v in tr.model.state_dict().items()}

    tr1 = make_trainer()
    g, f, u = samples(tr1, tiny_gaicd, tiny_fcdb, tiny_album)
    tr1.train_epoch(tr1.epoch_plan(g, f), u)
    tr1.save_checkpoint(tmp_path / "x.ckpt")
    tr2 = make_trainer(seed=123)  # different seed: everything must come from the checkpoint
    tr2.load_checkpoint(tmp_path / "x.ckpt")
    assert tr2.epoch == 1
    tr2.train_epoch(tr2.epoch_plan(g, f), u)
    for k, v in tr2.model.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_run_training_writes_model_checkpoint_and_log(tiny_gaicd, tiny_fcdb, tiny_album, tmp_path):
    from smartcrop.weights import load_model, read_card

    torch.manual_seed(0)
    net = SACNet(ModelConfig(short_side=64, max_long_side=128))
    data = TrainData(gaicd=read_gaicd(tiny_gaicd, "train"), fcdb=read_fcdb(tiny_fcdb, "train"),
                     unlabeled=list_images([tiny_album]))
    data.gaicd, data.val_gaicd = split_validation(data.gaicd, 0.34)
    out = tmp_path / "m.safetensors"
    card = run_training(net, data, TrainConfig(epochs=1), out, log=lambda s: None, progress=False)
    assert out.is_file() and out.with_suffix(".ckpt").is_file() and out.with_suffix(".log.jsonl").is_file()
    assert card["validation"]["gaicd"]["n_images"] == 1
    assert read_card(out)["sha256"] == card["sha256"]
    m = load_model(out)
    assert m.config.short_side == 64


def test_fcdb_candidates_include_the_expert_box():
    cands, ious = fcdb_candidates(200, 100, (20, 10, 120, 90))
    assert ious[-1] == pytest.approx(1.0) and cands[-1].tolist() == [20, 10, 120, 90]
    assert ((ious >= 0) & (ious <= 1)).all() and (ious[:-1] < 1).any()


def test_fcdb_candidates_with_the_border_grid():
    from smartcrop.anchors import border_anchors, box_iou_matrix, gaic_anchors

    box = (0, 10, 150, 100)  # the expert's crop on the left and bottom borders
    plain, _ = fcdb_candidates(240, 120, box)
    cands, ious = fcdb_candidates(240, 120, box, border=True)
    g, b = gaic_anchors(240, 120), border_anchors(240, 120)
    assert len(cands) == len(plain) + len(b)
    assert np.array_equal(cands[: len(g)], g) and np.array_equal(cands[len(g) : len(g) + len(b)], b)
    assert np.allclose(ious, box_iou_matrix(cands, np.asarray([box], np.float32))[:, 0])
    assert ious[len(g) : len(g) + len(b)].max() > ious[: len(g)].max()  # the border grid reaches the expert


def test_config_for_device_freezes_the_prefix_on_cpu_only():
    assert TrainConfig.for_device("cpu").frozen_layers == 14
    assert TrainConfig.for_device("cpu", "efficientnet_lite0").frozen_layers == 12  # through its stride-16 stage
    assert TrainConfig.for_device("cuda").frozen_layers == 0
    assert TrainConfig.for_device("cuda", "efficientnet_lite0").frozen_layers == 0
    cpu, gpu = TrainConfig.for_device("cpu"), TrainConfig.for_device("cuda")
    assert (cpu.batch_size, cpu.amp, cpu.size_step, cpu.fixed_shapes) == (1, False, 0, False)
    assert (gpu.batch_size, gpu.amp, gpu.size_step, gpu.fixed_shapes) == (8, True, 16, True)
    assert TrainConfig.for_device("cuda", batch_size=2, amp=False).batch_size == 2
    assert TrainConfig.for_device("cuda", frozen_layers=5, epochs=None).frozen_layers == 5
    assert TrainConfig.for_device("cuda", epochs=None).epochs == TrainConfig().epochs


def test_split_validation_is_deterministic_and_disjoint(tiny_gaicd):
    items = read_gaicd(tiny_gaicd, "train")
    a, b = split_validation(items, 0.34)
    a2, b2 = split_validation(items, 0.34)
    assert [i.name for i in b] == [i.name for i in b2] and len(b) == 1
    assert not {i.name for i in a} & {i.name for i in b}


def test_a_photo_reached_twice_is_trained_on_once_and_never_on_both_sides_of_the_split(tiny_gaicd, tiny_fcdb,
                                                                                        tmp_path):
    """`--gaicd R:train --gaicd R/:train`, or a link to a photo with its own annotation: every image counted
    twice (and a validation image could also be trained on through its twin)."""
    import shutil

    from smartcrop.training import load_train_data

    imgs, anns = tiny_gaicd / "images" / "train", tiny_gaicd / "annotations" / "train"
    (imgs / "zz.jpg").symlink_to(imgs / "img0.jpg")
    shutil.copy(anns / "img0.txt", anns / "zz.txt")
    notes = []
    data = load_train_data([f"{tiny_gaicd}:train", f"{tiny_gaicd}/:train"], [tiny_fcdb, tiny_fcdb],
                           val_fraction=0.34, on_note=notes.append)
    names = [it.name for it in data.gaicd + data.val_gaicd]
    assert sorted(names) == ["img0", "img1", "img2"] and len(data.fcdb) + len(data.val_fcdb) == 3
    assert "note: 5 GAICD photo(s) reached more than once (the same file): each is used once, with its first " \
        "annotation" in notes
    assert "note: 3 FCDB photo(s) reached more than once (the same file): each is used once, with its first " \
        "annotation" in notes


def test_what_a_killed_run_left_does_not_block_the_next(tmp_path):
    """A run killed in its first epoch left an empty OUT.log.jsonl (its start record not yet flushed), which the
    next run refused as "not a smartcrop training log", --force or not; and its checkpoint's temporary file
    stayed for good."""
    import subprocess
    import sys

    from smartcrop.errors import UsageError
    from smartcrop.training import check_outputs, output_lock

    out = tmp_path / "m.safetensors"
    log = out.with_suffix(".log.jsonl")
    log.write_bytes(b"")
    check_outputs(out, None, False)  # an empty log is appended to: nothing of anyone's lost
    log.write_text("my notes\n")
    with pytest.raises(UsageError, match="not a smartcrop training log"):
        check_outputs(out, None, True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".smartcrop-{dead.pid}-0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    deeper = tmp_path / "sub" / stale.name  # another folder's: not this output's to clean
    deeper.parent.mkdir()
    deeper.write_bytes(b"x")
    with output_lock(out):
        assert not stale.exists() and deeper.exists()


def test_a_validation_photo_that_cannot_be_read_is_named_and_no_nan_is_recorded(tiny_gaicd, small_model):
    """Its only held-out photo unreadable: the epoch line said `srcc=nan` without naming it, and the card (JSON)
    held NaN, which strict JSON readers refuse."""
    import json

    from smartcrop.training import _epoch_line, validate

    items = read_gaicd(tiny_gaicd, "train")
    items[0].image_path.write_bytes(b"not a jpeg")
    errors = []
    res = validate(small_model, TrainData(val_gaicd=items[:1]), "cpu", on_error=errors.append)
    assert res["gaicd"]["srcc"] is None and res["gaicd"]["n_images"] == 0
    assert len(errors) == 1 and str(items[0].image_path) in errors[0]
    json.dumps(res, allow_nan=False)
    assert _epoch_line({"epoch": 1, "seconds": 1.0, "loss": {}, "val": res}).endswith("val GAICD: no photo read")


def test_weight_average_follows_the_steps_and_survives_a_resume(tiny_gaicd, tiny_fcdb, tiny_album, tmp_path,
                                                                 one_thread):
    """--ema: the average moves towards the trained weights but lags them, it is what validation and the saved
    model see, and a resumed run carries the same average as an uninterrupted one."""
    tr = make_trainer(ema=0.9)
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    start = {n: p.detach().clone() for n, p in tr.ema.params.items()}
    tr.train_epoch(tr.epoch_plan(g, f), u)
    tr.save_checkpoint(tmp_path / "x.ckpt")
    tr.train_epoch(tr.epoch_plan(g, f), u)
    assert tr.ema.updates == 2 * len(tr.epoch_plan(g, f))
    name = "score_head.2.weight"
    avg, now, first = tr.ema.shadow[name].clone(), tr.ema.params[name].detach().clone(), start[name]
    assert not torch.equal(avg, now) and not torch.equal(avg, first)
    assert (avg - now).norm() < (first - now).norm()  # closer to where training went than where it started
    with tr.ema.swapped():
        assert torch.equal(tr.model.state_dict()[name], avg)
    assert torch.equal(tr.model.state_dict()[name], now)

    tr2 = make_trainer(ema=0.9, seed=5)
    tr2.load_checkpoint(tmp_path / "x.ckpt")
    tr2.train_epoch(tr2.epoch_plan(g, f), u)
    for n, t in tr.ema.shadow.items():
        assert torch.equal(tr2.ema.shadow[n], t), n
    tr2.ema.apply()
    assert torch.equal(tr2.model.state_dict()[name], avg)


def test_run_training_saves_the_averaged_weights(tiny_gaicd, tiny_fcdb, tiny_album, tmp_path):
    from smartcrop.weights import load_model

    data = TrainData(gaicd=read_gaicd(tiny_gaicd, "train"), fcdb=read_fcdb(tiny_fcdb, "train"),
                     unlabeled=list_images([tiny_album]))
    saved = {}
    for ema in (0.0, 0.5):
        torch.manual_seed(0)
        net = SACNet(ModelConfig(short_side=64, max_long_side=128))
        out = tmp_path / f"m{ema}.safetensors"
        run_training(net, data, TrainConfig(epochs=1, ema=ema), out, log=lambda s: None, progress=False)
        saved[ema] = load_model(out).state_dict()["score_head.2.weight"]
    assert not torch.equal(saved[0.0], saved[0.5])


def test_size_batches_group_equal_sizes_and_keep_every_sample_once():
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    plan = [SimpleNamespace(size=[(256, 384), (384, 256), (256, 341)][int(k)], id=i)
            for i, k in enumerate(rng.integers(0, 3, 50))]
    assert [b[0].id for b in size_batches(plan, 1)] == list(range(50))
    steps = size_batches(plan, 4)
    assert sorted(s.id for b in steps for s in b) == list(range(50))
    assert all(len({s.size for s in b}) == 1 and 1 <= len(b) <= 4 for b in steps)
    assert sum(len(b) < 4 for b in steps) <= 3  # only the last part-filled batch of each size
    for b in steps:
        assert [s.id for s in b] == sorted(s.id for s in b)  # plan order kept inside a batch


def test_size_batches_with_fill_are_all_full_and_keep_every_sample():
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    plan = [SimpleNamespace(size=[(256, 384), (384, 256), (256, 341)][int(k)], id=i)
            for i, k in enumerate(rng.integers(0, 3, 50))]
    plan.append(SimpleNamespace(size=(512, 256), id=50))  # a size with one sample: repeated to fill its batch
    steps = size_batches(plan, 4, np.random.default_rng(1))
    assert all(len(b) == 4 and len({s.size for s in b}) == 1 for b in steps)
    assert {s.id for b in steps for s in b} == set(range(51))
    assert any([s.id for s in b] == [50] * 4 for b in steps)
    assert len(steps) == len(size_batches(plan, 4))  # topped up, not more steps
    for b in steps:  # the topping-up repeats no sample inside a batch while others of its size exist
        if b[0].size != (512, 256):
            assert len({s.id for s in b}) == 4


def test_fixed_shapes_give_one_backbone_pass_shape_per_size(tiny_gaicd, tiny_fcdb, tiny_album, one_thread):
    """The GPU recipe (fixed_shapes): every backbone pass is 2 x batch_size images of one size, labeled ones
    first and unlabeled photos of that size after them; all losses are there and the network trains."""
    tr = make_trainer(frozen=0, batch_size=2, fixed_shapes=True)
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    sizes = [(64, 64), (96, 64)]
    for k, s in enumerate(g + f + u):  # two network sizes, each with labeled and unlabeled photos
        w, h = sizes[k % 2]
        s.size = (w, h)
        s.image = torch.nn.functional.interpolate(s.image[None].float(), size=(h, w))[0].to(torch.uint8)
        if s.boxes is not None:
            s.boxes = np.array([[0, 0, w, h], [0, 0, w / 2, h], [w / 4, 0, w, h], [0, 0, w, h / 2]], np.float32)
            s.targets = s.targets[: len(s.boxes)] if len(s.targets) >= 4 else np.resize(s.targets, 4)
    shapes = []
    orig = tr.model.image_features
    tr.model.image_features = lambda x: shapes.append(tuple(x.shape)) or orig(x)
    plan = tr.epoch_plan(g, f)
    tr.model.train()
    rec = tr.train_epoch(plan, u)
    assert set(shapes) <= {(4, 3, h, w) for w, h in sizes} and len(shapes) == rec["steps"]
    assert {"reg", "rc"} <= set(rec["loss"]) and all(np.isfinite(v) for v in rec["loss"].values())


def test_batched_end_to_end_steps_share_one_backbone_pass(tiny_gaicd, tiny_fcdb, tiny_album, one_thread):
    """batch_size > 1 (the GPU recipe): images of one size go through the backbone together, each loss term is
    the batch mean, and one epoch trains every part."""
    tr = make_trainer(frozen=0, batch_size=3)
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    for s in g + f + u:  # one network size for all, so that batches fill up
        s.size = (64, 64)
        s.image = s.image[:, :64, :64].contiguous()
        if s.boxes is not None:
            s.boxes = np.clip(s.boxes, 0, 64)
            s.boxes[:, 2:] = np.maximum(s.boxes[:, 2:], s.boxes[:, :2] + 8)
    passes = []
    orig = tr.model.image_features
    tr.model.image_features = lambda x: passes.append(x.shape[0]) or orig(x)
    plan = tr.epoch_plan(g, f)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.model.train()
    rec = tr.train_epoch(plan, u)
    assert rec["images"] == len(plan) and rec["steps"] == -(-len(plan) // 3)
    assert max(passes) == 3 and sum(passes) == 2 * len(plan)  # labeled and unlabeled images, batched
    assert all(np.isfinite(v) for v in rec["loss"].values()) and {"reg", "rc"} <= set(rec["loss"])
    changed = {n.split(".")[0] for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert {"backbone", "region_fc", "score_head"} <= changed


def _per_image_batch_loss(tr, labeled, unlabeled, fixed):
    """The batched step as it was computed before StepLosses, image by image: the reference."""
    def mean(parts, n):
        out = {}
        for p in parts:
            for k, v in p.items():
                out[k] = out[k] + v if k in out else v
        return {k: v / n for k, v in out.items()}

    flips = [bool(tr.rng.random() < 0.5) for _ in labeled]
    if fixed:
        u_flips = [bool(tr.rng.random() < 0.5) for _ in unlabeled]
        feats = tr._features_batch([*labeled, *unlabeled], flips + u_flips)
        n = len(labeled)
        parts = mean([tr._labeled_loss(s, f, feats.select(k)) for k, (s, f) in enumerate(zip(labeled, flips))], n)
        parts.update(mean([tr._consistency_loss(s, feats.select(n + k), f)
                           for k, (s, f) in enumerate(zip(unlabeled, u_flips))], len(unlabeled)))
        return parts
    feats = tr._features_batch(labeled, flips)
    parts = mean([tr._labeled_loss(s, f, feats.select(k)) for k, (s, f) in enumerate(zip(labeled, flips))],
                 len(labeled))
    by_size = {}
    for s in unlabeled:
        by_size.setdefault(s.size, []).append(s)
    rc = []
    for group in by_size.values():
        u_flips = [bool(tr.rng.random() < 0.5) for _ in group]
        feats = tr._features_batch(group, u_flips)
        rc += [tr._consistency_loss(s, feats.select(k), f) for k, (s, f) in enumerate(zip(group, u_flips))]
    parts.update(mean(rc, len(unlabeled)))
    return parts


@pytest.mark.parametrize("fixed,fcdb_head,extra", [
    (True, False, {}), (False, False, {}), (True, True, {"gaicd_rank_weight": 0.5}),
    (False, False, {"fcdb_loss": "iou", "rc_anchors": 6}), (True, False, {"jitter": 0.0, "lambda_cls": 0.0}),
    (False, False, {"centred_mos": 0.1}), (True, False, {"top_weight": 2.0}),
    (False, False, {"fcdb_listwise": 0.5}), (True, True, {"fcdb_listwise": 1.0, "fcdb_loss": "iou"}),
])
def test_a_batched_steps_losses_are_the_mean_of_the_per_image_losses(tiny_gaicd, tiny_fcdb, tiny_album, one_thread,
                                                                     fixed, fcdb_head, extra):
    """batch_loss computes every crop of a step in one crop-feature call and each term at once (StepLosses):
    the terms and their gradients must be those of the per-image losses averaged over the batch, with the
    same random draws (crops, pairs, flips, jitter), teachers' distillation targets included."""
    tr = make_trainer(frozen=0, batch_size=3, fixed_shapes=fixed, fcdb_head=fcdb_head, **extra)
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    for k, s in enumerate(g + f + u):
        w = 64 if fixed or s.kind != "unlabeled" or k % 2 else 96  # without fixed shapes: two unlabeled sizes
        s.size = (w, 64)
        s.image = torch.nn.functional.interpolate(s.image[None].float(), size=(64, w))[0].to(torch.uint8)
        if s.boxes is not None:
            s.boxes = np.clip(s.boxes, 0, 64)
            s.boxes[:, 2:] = np.maximum(s.boxes[:, 2:], s.boxes[:, :2] + 8)
        if s.kind == "unlabeled" and k % 3 == 0:  # some photos with teachers' targets (distillation)
            s.targets = np.random.default_rng(k).normal(size=(2, len(gaic_anchors(*s.size)))).astype(np.float32)
    labeled, unlabeled = [g[0], f[0], g[1]], u[:4]
    tr.model.eval()  # no dropout: both ways must see the same network (gradients still flow)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    results = []
    for fn in (lambda: tr.batch_loss(labeled, unlabeled), lambda: _per_image_batch_loss(tr, labeled, unlabeled, fixed)):
        tr.rng = np.random.default_rng(7)
        parts = fn()
        grads = torch.autograd.grad(sum(parts.values()), params, allow_unused=True)
        results.append(({k: float(v.detach()) for k, v in parts.items()}, grads, tr.rng.bit_generator.state))
    (got, g_got, st_got), (want, g_want, st_want) = results
    assert st_got == st_want  # the same random draws, in the same order
    assert set(got) == set(want) and {"reg", "rc", "distill"} <= set(got)
    assert ("cls" in got) == (tr.cfg.lambda_cls > 0) and ("rank" in got) == (tr.cfg.gaicd_rank_weight > 0)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_prepare_samples_in_worker_processes_gives_the_same_samples(tiny_gaicd, tiny_fcdb, tiny_album):
    data = TrainData(gaicd=read_gaicd(tiny_gaicd, "train"), fcdb=read_fcdb(tiny_fcdb, "train"),
                     unlabeled=list_images([tiny_album]))
    runs = []
    for workers in (1, 2):
        tr = make_trainer()
        runs.append(prepare_samples(tr, data, lambda s: None, progress=False, workers=workers))
    (g1, f1, u1, sk1), (g2, f2, u2, sk2) = runs
    assert sk1 == sk2 == 1
    for a, b in zip(g1 + f1 + u1, g2 + f2 + u2):
        assert (a.kind, a.name, a.size) == (b.kind, b.name, b.size)
        assert torch.equal(a.prefix[0].x, b.prefix[0].x) and torch.equal(a.prefix[1].x, b.prefix[1].x)


def test_size_step_rounds_network_sizes_and_scales_boxes_with_them(tiny_gaicd, tiny_fcdb, tiny_album):
    tr = make_trainer(frozen=0, batch_size=4, size_step=16)
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    exact = make_trainer(frozen=0)
    g1, _, _ = samples(exact, tiny_gaicd, tiny_fcdb, tiny_album)
    assert any(s.size != s1.size for s, s1 in zip(g, g1))  # the exact sizes are not all multiples of 16
    for s, s1 in zip(g + f + u, g1 + [None] * 99):
        assert s.size[0] % 16 == 0 and s.size[1] % 16 == 0 and tuple(s.image.shape[1:]) == (s.size[1], s.size[0])
        if s.boxes is not None:
            assert (s.boxes >= 0).all() and (s.boxes[:, [0, 2]] <= s.size[0] + 1e-3).all()
            assert (s.boxes[:, [1, 3]] <= s.size[1] + 1e-3).all()
        if s1 is not None:  # the same boxes, relative to the image
            rel = s.boxes / np.array([s.size[0], s.size[1]] * 2)
            rel1 = s1.boxes / np.array([s1.size[0], s1.size[1]] * 2)
            assert np.allclose(rel, rel1, atol=1e-5)


def test_scale_augmentation_prepares_each_scale_and_draws_among_them(tiny_gaicd, tiny_fcdb, tiny_album):
    tr = make_trainer(scales=(0.75,))
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    plain = make_trainer()
    g0, f0, u0 = samples(plain, tiny_gaicd, tiny_fcdb, tiny_album)
    for s, s0 in zip(g + f + u, g0 + f0 + u0):
        assert s.size == s0.size and not s0.alternates and len(s.alternates) == 1
        a = s.alternates[0]
        assert a.size == (max(32, round(s.size[0] * 0.75)), max(32, round(s.size[1] * 0.75)))
        assert len(a.prefix) == 2 and a.prefix[0].input_size != s.prefix[0].input_size
        if s.boxes is not None:  # the same boxes relative to the image
            rel = s.boxes / np.array(s.size * 2)
            assert np.allclose(a.boxes / np.array(a.size * 2), rel, atol=2e-2)
            assert a.targets is s.targets or np.array_equal(a.targets, s.targets)
    seen = []
    orig = tr._labeled_loss
    tr._labeled_loss = lambda s, flip, feats: seen.append(s.size) or orig(s, flip, feats)
    tr.model.train()
    for _ in range(12):
        tr.labeled_loss(g[0])
    assert set(seen) == {g[0].size, g[0].alternates[0].size}
    state = plain.rng.bit_generator.state  # without scales no random number is drawn for them
    plain.rng.random()
    after_one = plain.rng.bit_generator.state
    plain.rng.bit_generator.state = state
    plain._at_scale(g0[0])
    assert plain.rng.bit_generator.state == state != after_one


def test_crop_view_keeps_exactly_the_boxes_inside_its_rectangle():
    from smartcrop.anchors import gaic_anchors
    from smartcrop.training import crop_view

    full, pixels = (1200, 800), (300, 200)  # annotated at full size, decoded at a quarter
    boxes = gaic_anchors(*full)
    rng = np.random.default_rng(5)
    cuts, kept = set(), []
    for _ in range(200):
        (x0, y0, x1, y1), keep = crop_view(pixels, full, boxes, 0.125, rng)
        assert 0 <= x0 <= 0.125 * 300 and 0 <= y0 <= 0.125 * 200 and x1 >= 300 * 0.875 and y1 >= 200 * 0.875
        assert x1 <= 300 and y1 <= 200
        inside = [(b[0] >= x0 * 4 - 1e-3) and (b[1] >= y0 * 4 - 1e-3) and (b[2] <= x1 * 4 + 1e-3)
                  and (b[3] <= y1 * 4 + 1e-3) for b in boxes]
        assert keep.tolist() == inside
        cuts.add((x0 > 0, y0 > 0, x1 < 300, y1 < 200))
        kept.append(keep.mean())
    assert len(cuts) == 16  # every side is sometimes moved in, sometimes not
    assert min(kept) < 0.6 < 0.9 < max(kept) == 1.0
    state = rng.bit_generator.state
    assert crop_view(pixels, full, boxes, 0.0, rng)[0] == (0, 0, 300, 200)  # no margin: the whole image
    rng.bit_generator.state = state
    rng.random(8)
    after = rng.bit_generator.state
    rng.bit_generator.state = state
    crop_view(pixels, full, boxes[:0], 0.3, rng)
    assert rng.bit_generator.state == after  # always eight draws, whatever the boxes


def test_crop_views_are_gaicd_sub_images_with_their_scored_crops_moved(tiny_gaicd, tiny_fcdb, tiny_album):
    import zlib

    from PIL import Image

    from smartcrop.training import crop_view

    tr = make_trainer(crop_views=3, crop_margin=0.3)
    state = tr.rng.bit_generator.state
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    assert tr.rng.bit_generator.state == state  # drawn from each image's own generator
    assert all(not s.alternates for s in f + u)  # GAICD images only
    assert all(1 <= len(s.alternates) <= 3 for s in g) and sum(len(s.alternates) for s in g) >= 4
    for s in g:
        image = Image.open(tiny_gaicd / "images" / "train" / f"{s.name}.jpg")
        full = s.boxes * np.array([image.width / s.size[0], image.height / s.size[1]] * 2)  # annotation pixels
        own = np.random.default_rng([0, zlib.crc32(f"crop:{s.name}".encode())])
        views = [crop_view(image.size, image.size, full, 0.3, own) for _ in range(3)]
        views = [(r, keep) for r, keep in views if keep.sum() >= 16]
        assert len(views) == len(s.alternates)
        for a, ((x0, y0, x1, y1), keep) in zip(s.alternates, views):
            assert len(a.prefix) == 2
            assert len(a.boxes) == keep.sum() <= len(s.boxes) and np.array_equal(a.targets, s.targets[keep])
            # the image's own scored crops, moved by the view's corner and scaled to its network size
            want = (full[keep] - [x0, y0, x0, y0]) * np.array([a.size[0] / (x1 - x0), a.size[1] / (y1 - y0)] * 2)
            assert np.allclose(a.boxes, want, atol=1e-2)
            assert (a.boxes >= -1e-3).all() and (a.boxes[:, 2:] <= np.array(a.size) + 1e-3).all()
    again = make_trainer(crop_views=3, crop_margin=0.3)
    g2, _, _ = samples(again, tiny_gaicd, tiny_fcdb, tiny_album)
    for s, s2 in zip(g, g2):  # the same views when prepared again (a resumed run)
        assert [a.size for a in s.alternates] == [a.size for a in s2.alternates]
        assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(s.alternates, s2.alternates))


def test_jitter_views_cache_jittered_copies_of_labeled_images_and_draw_among_them(tiny_gaicd, tiny_fcdb,
                                                                                   tiny_album, monkeypatch):
    import smartcrop.training as training

    tr = make_trainer(jitter_views=2)
    g, f, u = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    plain = make_trainer()
    g0, f0, u0 = samples(plain, tiny_gaicd, tiny_fcdb, tiny_album)
    for s, s0 in zip(g + f, g0 + f0):
        assert len(s0.prefix) == 2 and len(s.prefix) == 6  # [plain, flipped] of the image and of 2 jittered views
        assert torch.equal(s.prefix[0].x, s0.prefix[0].x) and torch.equal(s.prefix[1].x, s0.prefix[1].x)
        xs = [p.x.float() for p in s.prefix]
        assert not torch.allclose(xs[2], xs[0], atol=1e-2) and not torch.allclose(xs[4], xs[2], atol=1e-2)
    assert all(len(s.prefix) == 2 for s in u)  # unlabeled photos keep their one view
    # the views come from each image's own generator: preparing again (e.g. when resuming) gives the same
    # views, and preparation leaves the trainer's generator as it was (a resumed run draws as the first did)
    again = make_trainer(jitter_views=2)
    state = again.rng.bit_generator.state
    g2, f2, _ = samples(again, tiny_gaicd, tiny_fcdb, tiny_album)
    assert again.rng.bit_generator.state == state
    for s, s2 in zip(g + f, g2 + f2):
        assert all(torch.equal(a.x, b.x) for a, b in zip(s.prefix, s2.prefix))
    used = []
    full = training._full
    monkeypatch.setattr(training, "_full", lambda p, device: used.append(p) or full(p, device))
    for flip in [False, True] * 30:
        tr._features(g[0], flip)
    used = [next(i for i, q in enumerate(g[0].prefix) if q is p) for p in used]
    assert set(used[0::2]) == {0, 2, 4} and set(used[1::2]) == {1, 3, 5}  # every view, flipped when asked
    state = plain.rng.bit_generator.state  # without jittered views no random number is drawn for them
    plain._features(g0[0], False)
    assert plain.rng.bit_generator.state == state


def test_teacher_targets_are_a_single_teachers_own_scores_and_an_ensembles_z_average():
    from smartcrop.training import teacher_targets

    torch.manual_seed(0)
    a = SACNet(ModelConfig(short_side=64, max_long_side=128)).eval()
    b = SACNet(ModelConfig(short_side=64, max_long_side=128)).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # b scores every crop 3 y + 1: the same ranking on another scale
        b.score_head[-1].weight.mul_(3)
        b.score_head[-1].bias.mul_(3).add_(1)
    x = torch.rand(1, 3, 48, 80) * 255
    boxes = torch.from_numpy(gaic_anchors(80, 48))
    with torch.no_grad():
        own = [a.score_boxes(a.image_features(v), boxes).numpy() for v in (x, x.flip(-1))]
    t = teacher_targets([a], x, (80, 48))
    assert t.shape == (2, len(boxes))
    np.testing.assert_allclose(t, np.stack(own), atol=1e-5)  # row 1: the anchors of the mirrored photo
    t2 = teacher_targets([a, b], x, (80, 48))
    for row, y in zip(t2, own):  # mean offset + mean spread: (y + 3 y + 1) / 2 exactly
        np.testing.assert_allclose(row, 2 * y + 0.5, atol=1e-4)
    assert teacher_targets([a], torch.rand(1, 3, 32, 1000) * 255, (1000, 32)) is None  # no two anchors


@pytest.mark.parametrize("rc", [True, False])
def test_distillation_from_a_copy_of_the_student_is_zero_and_trains_the_score_head(tiny_gaicd, tiny_fcdb,
                                                                                   tiny_album, rc):
    tr = make_trainer(0, rc=rc, jitter=0.0)  # end to end, no jitter: the student sees exactly the teacher's input
    teacher = SACNet(tr.model.config).eval()
    teacher.load_state_dict(tr.model.state_dict())
    data = TrainData(gaicd=read_gaicd(tiny_gaicd, "train"), fcdb=read_fcdb(tiny_fcdb, "train"),
                     unlabeled=list_images([tiny_album]))
    g, f, u, _ = prepare_samples(tr, data, lambda s: None, progress=False, teachers=[teacher])
    assert all(s.targets is None for s in g + f if s.kind == "unlabeled")
    assert all(s.targets.shape[0] == 2 for s in u)
    tr.model.eval()  # no dropout: the student is the teacher, either way round the photo is shown
    for flip in (False, True):
        parts = tr._consistency_loss(u[0], tr._features(u[0], flip), flip)
        assert set(parts) == ({"rc", "distill"} if rc else {"distill"})
        right = float(parts["distill"].detach())
        s = u[0]
        with torch.no_grad():
            y = tr.model.mos_scores(tr.model.crop_features(tr._features(s, flip),
                                                           torch.from_numpy(gaic_anchors(*s.size))))
        wrong = float(torch.nn.functional.smooth_l1_loss(y, torch.from_numpy(s.targets[1 - int(flip)])))
        assert right < 1e-10 and wrong > 1000 * right  # the other row is the other way round
    with torch.no_grad():
        tr.model.score_head[-1].bias.add_(1.0)  # every score one too high: smooth-L1 of 1 is 0.5
    parts = tr._consistency_loss(u[0], tr._features(u[0], True), True)
    assert float(parts["distill"].detach()) == pytest.approx(0.5, abs=1e-4)
    tr.opt.zero_grad()
    parts["distill"].backward()
    assert tr.model.score_head[-1].bias.grad.abs().sum() > 0
    # an epoch without the rank-consistency loss still pairs each labeled image with an unlabeled photo
    rec = tr.train_epoch(tr.epoch_plan(g, f), u)
    assert "distill" in rec["loss"] and ("rc" in rec["loss"]) == rc


def test_distillation_draws_its_own_anchor_count_and_rank_consistency_keeps_its_pairs(tiny_gaicd, tiny_fcdb,
                                                                                      tiny_album, monkeypatch):
    import smartcrop.losses as L

    tr = make_trainer(distill_anchors=40, rc_anchors=6)
    teacher = SACNet(tr.model.config).eval()
    data = TrainData(gaicd=read_gaicd(tiny_gaicd, "train"), unlabeled=list_images([tiny_album]))
    _, _, u, _ = prepare_samples(tr, data, lambda s: None, progress=False, teachers=[teacher])
    seen = {}
    real_cf, real_rc = tr.model.crop_features, L.rank_consistency
    monkeypatch.setattr(tr.model, "crop_features", lambda f, b: seen.setdefault("boxes", len(b)) and real_cf(f, b))
    monkeypatch.setattr(L, "rank_consistency", lambda m, cf, y, d: seen.setdefault("rc", len(y)) and real_rc(m, cf, y, d))
    s = max(u, key=lambda s: s.targets.shape[1])
    parts = tr.consistency_loss(s)
    assert set(parts) == {"rc", "distill"}
    assert seen == {"boxes": min(40, s.targets.shape[1]), "rc": 6} and s.targets.shape[1] > 6
    u[0].targets = None  # without targets, rank consistency's own draw
    seen.clear()
    tr.consistency_loss(u[0])
    assert seen["boxes"] == 6


def test_gaicd_crops_sets_how_many_scored_crops_a_step_draws_and_more_than_there_are_draws_them_all(
        tiny_gaicd, tiny_fcdb, tiny_album):
    g = samples(make_trainer(), tiny_gaicd, tiny_fcdb, tiny_album)[0][0]
    n = len(g.boxes)
    assert n > 4
    for k, want in ((4, 4), (n - 1, n - 1), (n + 30, n)):
        tr = make_trainer(crops_per_image=k)
        boxes, targets = tr._labeled_draw(g, flip=False)
        assert len(boxes) == len(targets) == want
        rows = {tuple(b) for b in boxes.tolist()}
        assert len(rows) == want and rows <= {tuple(b) for b in g.boxes.tolist()}
        assert {(tuple(b), t) for b, t in zip(boxes.tolist(), targets.tolist())} <= \
            {(tuple(b), t) for b, t in zip(g.boxes.tolist(), g.targets.tolist())}


def test_cuda_setup_turns_cudnn_off_for_training_and_on_for_scoring():
    """cuDNN's first training step at each new network size took 8–13 s on an H200: the GPU recipe trains
    without it and scoring keeps it (``cropper.cuda_setup``); neither autotunes."""
    from smartcrop.cropper import cuda_setup

    flags = torch.backends.cudnn
    before = flags.enabled, flags.benchmark
    try:
        flags.benchmark = True
        cuda_setup(TrainConfig.for_device("cuda").cudnn)
        assert (flags.enabled, flags.benchmark) == (False, False)
        cuda_setup(True)
        assert (flags.enabled, flags.benchmark) == (True, False)
    finally:
        flags.enabled, flags.benchmark = before


def test_training_skips_a_photo_whose_annotations_lie_outside_it(tiny_gaicd, tiny_fcdb, tiny_album):
    """Crops that do not fit their photo (another photo's annotation, a resized copy) are not trained on as if
    they did: the photo is skipped with a warning naming it."""
    import json

    ann = tiny_gaicd / "annotations" / "train" / "img2.txt"
    ann.write_text(ann.read_text() + "-30 0 100 100 4.00\n")  # y1 = -30
    js = tiny_fcdb / "cropping_training_set.json"
    entries = json.loads(js.read_text())
    entries[0]["crop"] = [0, 0, 300, 50]  # x2 = 300 on a 160 px wide photo
    js.write_text(json.dumps(entries))
    data = TrainData(gaicd=read_gaicd(tiny_gaicd, "train"), fcdb=read_fcdb(tiny_fcdb, "train"),
                     unlabeled=list_images([tiny_album]))
    logged = []
    gaicd, fcdb, unl, skipped = prepare_samples(make_trainer(), data, logged.append, progress=False)
    assert [s.name for s in gaicd] == ["img0", "img1"] and len(fcdb) == 2 and len(unl) == 5
    assert skipped == 3  # the two above and broken.jpg
    outside = [line for line in logged if "outside" in line]
    assert len(outside) == 2 and "img2.jpg" in outside[0] and "0_x_b.jpg" in outside[1], logged


def test_adamw_decays_weight_matrices_apart_from_the_gradient_and_leaves_biases_and_batchnorm():
    tr = make_trainer(frozen=14, adamw=True, weight_decay=0.5, backbone_lr_mult=0.1)
    assert isinstance(tr.opt, torch.optim.AdamW)
    trainable = [p for p in tr.model.parameters() if p.requires_grad]
    grouped = [p for g in tr.opt.param_groups for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    for g in tr.opt.param_groups:
        assert g["weight_decay"] == (0.5 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
        assert all(p.ndim >= 2 for p in g["params"]) or all(p.ndim < 2 for p in g["params"])
    assert sorted({g["lr"] for g in tr.opt.param_groups}) == pytest.approx([1e-5, 1e-4])
    # a step with zero gradients: only the decay moves the weights, by lr * weight_decay, biases stay
    for p in trainable:
        p.grad = torch.zeros_like(p)
    before = {id(p): p.detach().clone() for p in trainable}
    tr.opt.step()
    for g in tr.opt.param_groups:
        for p in g["params"]:
            expect = before[id(p)] * (1 - g["lr"] * g["weight_decay"])
            assert torch.allclose(p.detach(), expect, rtol=0, atol=1e-9)
    w = tr.model.score_head[0].weight
    assert w.requires_grad and not torch.equal(w.detach(), before[id(w)])
    assert {g["weight_decay"] for g in tr.opt.param_groups} == {0.0, 0.5}
    # the paper's Adam keeps its coupled L2 term on every parameter
    plain = make_trainer(frozen=14)
    assert type(plain.opt) is torch.optim.Adam and {g["weight_decay"] for g in plain.opt.param_groups} == {1e-4}


def test_resuming_with_another_optimizer_or_architecture_is_one_line(tmp_path):
    """A checkpoint resumed with options that make another optimizer or model is refused in one line naming it
    (it was a traceback from load_state_dict), before any image is prepared."""
    from smartcrop.errors import UsageError

    adam, adamw = tmp_path / "adam.ckpt", tmp_path / "adamw.ckpt"
    make_trainer().save_checkpoint(adam)
    make_trainer(adamw=True).save_checkpoint(adamw)
    with pytest.raises(UsageError, match="adam.ckpt: its run trained with Adam: resume it without --adamw"):
        make_trainer(adamw=True).load_checkpoint(adam)
    with pytest.raises(UsageError, match="its run trained with AdamW: resume it with --adamw"):
        make_trainer().load_checkpoint(adamw)
    make_trainer(adamw=True).load_checkpoint(adamw)  # like for like resumes
    torch.manual_seed(0)
    basic = Trainer(SACNet(ModelConfig(short_side=64, max_long_side=128, saf=False)), TrainConfig(), "cpu",
                    log=lambda s: None)
    with pytest.raises(UsageError, match="does not fit the model and optimizer") as e:
        basic.load_checkpoint(adam)
    assert "\n" not in str(e.value)


def test_a_step_whose_loss_is_not_a_number_stops_training_before_it_moves_the_weights():
    from smartcrop.errors import TrainingError
    from smartcrop.training import LossMeter, optimizer_step

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    meter = LossMeter()
    optimizer_step(opt, {"reg": (w * 2).sum()}, meter)
    before = w.detach().clone()
    with pytest.raises(TrainingError, match="reg nan"):
        optimizer_step(opt, {"reg": (w * float("nan")).sum(), "cls": w.sum()}, meter)
    assert torch.equal(w.detach(), before) and meter.counts == {"reg": 1}



def test_gaicd_specs_read_as_a_person_means_them(tmp_path, monkeypatch):
    from smartcrop.errors import UsageError
    from smartcrop.training import gaicd_spec

    monkeypatch.chdir(tmp_path)
    assert gaicd_spec("data/gaicd:dev") == (Path("data/gaicd"), "dev")
    assert gaicd_spec("data/gaicd") == (Path("data/gaicd"), "train")
    assert gaicd_spec("data/gaicd:") == (Path("data/gaicd"), "train")  # a trailing colon, no split
    (tmp_path / "odd:").mkdir()
    assert gaicd_spec("odd:") == (Path("odd:"), "train")  # unless a folder is named so
    assert gaicd_spec("C:/data/gaicd") == (Path("C:/data/gaicd"), "train")  # a drive, not a split
    for empty in ("", "  "):
        with pytest.raises(UsageError, match="--gaicd is empty"):
            gaicd_spec(empty)
