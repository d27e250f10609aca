import numpy as np
import pytest

torch = pytest.importorskip("torch")

from smartcrop.data import list_images, read_fcdb, read_gaicd  # noqa: E402
from smartcrop.model import ModelConfig, SACNet  # noqa: E402
from smartcrop.training import (TrainConfig, TrainData, Trainer, fcdb_candidates, pair_indices,  # noqa: E402
                                prepare_samples, rank_consistency_loss, run_training, split_validation)


def make_trainer(frozen=14, seed=0, **kw):
    torch.manual_seed(seed)
    net = SACNet(ModelConfig(short_side=64, max_long_side=128))
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


def test_fcdb_iou_regression_variant_targets_per_image_zscores(tiny_gaicd, tiny_fcdb, tiny_album):
    """The ablation's alternative FCDB loss regresses the score head to the per-image z-score of IoU."""
    tr = make_trainer(fcdb_loss="iou", fcdb_crops=10_000)  # every candidate each step
    _, f, _ = samples(tr, tiny_gaicd, tiny_fcdb, tiny_album)
    s = f[0]

    class NoFlipAllCandidates:  # no mirroring, and the candidate draw returns all of them (expert box first)
        def __init__(self, g):
            self.g = g

        def random(self, size=None):
            return 0.9 if size is None else self.g.random(size)

        def choice(self, n, size=None, replace=True):
            if size == n == len(s.boxes) and not replace:
                return np.arange(n)[::-1].copy()
            return self.g.choice(n, size, replace=replace)

        def __getattr__(self, name):
            return getattr(self.g, name)

    tr.rng = NoFlipAllCandidates(tr.rng)
    assert set(tr.labeled_loss(s)) == {"fcdb_reg", "fcdb_cls"}
    z = torch.from_numpy(((s.targets - s.targets.mean()) / s.targets.std()).astype(np.float32))
    tr.model.score_features = lambda cf: z.clone()
    assert float(tr.labeled_loss(s)["fcdb_reg"]) < 1e-6
    tr.model.score_features = lambda cf: z + 1.0  # off by one everywhere: smooth-L1 = 0.5
    assert float(tr.labeled_loss(s)["fcdb_reg"]) == pytest.approx(0.5, abs=1e-5)


@pytest.fixture
def one_thread():
    """Threaded CPU reductions sum in varying order (runs differ by ~1e-4 after Adam); one thread is exact."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_pair_indices_and_fcdb_candidates():
    rng = np.random.default_rng(0)
    t = np.array([1.0, 2.0, 3.5, 3.6])
    pairs = pair_indices(t, 0.5, 100, rng)
    got = {tuple(sorted(p)) for p in pairs.tolist()}
    assert got == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)}  # 2-3 differ by only 0.1
    cands, ious = fcdb_candidates(200, 100, (20, 10, 120, 90))
    assert ious[-1] == pytest.approx(1.0) and cands[-1].tolist() == [20, 10, 120, 90]
    assert ((ious >= 0) & (ious <= 1)).all()


def test_rank_consistency_loss_follows_the_ranking_head():
    yi = torch.tensor([1.0, 0.0])
    yj = torch.tensor([0.0, 1.0])
    logits = torch.tensor([3.0, 3.0])  # head says i beats j in both pairs
    # pair 1 agrees (hinge 0.1 + (0 - 1) < 0 -> 0); pair 2 disagrees: 0.1 + 1 = 1.1
    assert rank_consistency_loss((yi, yj), logits, 0.1).item() == pytest.approx(1.1 / 2)


def test_split_validation_is_deterministic_and_disjoint(tiny_gaicd):
    items = read_gaicd(tiny_gaicd, "train")
    a, b = split_validation(items, 0.34)
    a2, b2 = split_validation(items, 0.34)
    assert [i.name for i in b] == [i.name for i in b2] and len(b) == 1
    assert not {i.name for i in a} & {i.name for i in b}
