"""`smartcrop train` and `smartcrop eval` through the command line, on tiny data drawn by the tests."""

import json

import pytest

torch = pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from smartcrop.cli import app  # noqa: E402


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_train_from_init_writes_a_model_with_its_card(tmp_path, tiny_gaicd, tiny_fcdb, tiny_album, small_model_file):
    from smartcrop.weights import load_model, read_card

    out = tmp_path / "runs" / "m.safetensors"
    out.parent.mkdir()
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--fcdb", tiny_fcdb, "--unlabeled", tiny_album,
                       "--init", small_model_file, "--epochs", "1", "--val-fraction", "0.34", "--device", "cpu",
                       "--fcdb-tau", "0.1", "--fcdb-border", "--out", out)
    # the unreadable unlabeled photo is named and left out; the model is written, and the exit status says one
    # photo was left out, as `run` and `eval` do
    assert code == 1 and "broken.jpg" in err, err
    assert err.strip().splitlines()[-1] == ("smartcrop: 1 photo left out (named above): the model was trained "
                                            "without them")
    card = read_card(out)
    tr = card["training"]
    assert tr["n_gaicd"] == 2 and tr["n_fcdb"] == 3 and tr["n_unlabeled"] == 5  # one GAICD image held out
    assert tr["config"]["frozen_layers"] == 14  # the CPU recipe
    assert tr["config"]["fcdb_tau"] == 0.1 and tr["config"]["fcdb_border"] is True  # FCDB pair options as given
    assert card["command"].startswith("smartcrop train") and card["validation"]["gaicd"]["n_images"] == 1
    assert load_model(out).config.short_side == 64  # the --init model's architecture
    lines = [json.loads(x) for x in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["epoch"] == 1


def test_train_partial_unfreezing_with_a_lower_backbone_learning_rate(tmp_path, tiny_gaicd, tiny_fcdb,
                                                                     small_model_file):
    from smartcrop.weights import load_model, read_card

    out = tmp_path / "m.safetensors"
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--fcdb", tiny_fcdb, "--init", small_model_file,
                       "--epochs", "1", "--val-fraction", "0", "--device", "cpu", "--frozen-layers", "10",
                       "--backbone-lr-mult", "0.1", "--out", out)
    assert code == 0, err
    cfg = read_card(out)["training"]["config"]
    assert cfg["frozen_layers"] == 10 and cfg["backbone_lr_mult"] == 0.1
    before, after = load_model(small_model_file).state_dict(), load_model(out).state_dict()
    changed = {k.split(".")[2] for k in before if k.startswith("backbone.features.")
               and not torch.equal(before[k], after[k])}
    assert changed and min(int(i) for i in changed) == 10  # layers 0-9 frozen, 10 on trained


def test_train_augmentations_and_rc_anchors_are_recorded_and_useless_flags_noted(tmp_path, tiny_gaicd,
                                                                                 small_model_file):
    from smartcrop.weights import read_card

    for frozen, batch, noted in (("14", "1", ""), ("0", "1", "--jitter-views has no effect"),
                                 ("14", "2", "--crop-views apply to one image per step only")):
        out = tmp_path / f"m{frozen}_{batch}.safetensors"
        code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--init", small_model_file, "--epochs", "1",
                           "--val-fraction", "0", "--device", "cpu", "--frozen-layers", frozen, "--jitter-views",
                           "2", "--no-rc", "--rc-anchors", "24", "--crop-views", "2", "--crop-margin", "0.2",
                           "--batch-size", batch, "--adamw", "--weight-decay", "0.5", "--gaicd-share", "0.6",
                           "--rc-weight", "4", "--gaicd-crops", "90", "--pairs", "100", "--out", out)
        assert code == 0, err
        config = read_card(out)["training"]["config"]
        assert (config["jitter_views"], config["rc_anchors"], config["crop_views"], config["crop_margin"]) == \
            (2, 24, 2, 0.2)
        assert (config["adamw"], config["weight_decay"], config["gaicd_share"], config["rc_weight"]) == \
            (True, 0.5, 0.6, 4.0)
        assert (config["crops_per_image"], config["pairs_per_image"]) == (90, 100)
        assert ("note:" in err) == bool(noted) and noted in err


@pytest.mark.parametrize("args, words", [
    (["--out", "m.pt", "--gaicd", "x"], ["--out", ".safetensors"]),
    (["--out", "m.safetensors"], ["no labeled data"]),
    (["--out", "m.safetensors", "--gaicd", "nowhere:train"], ["nowhere"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--resume", "missing.ckpt"], ["missing.ckpt", "no such checkpoint"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--backbone", "resnet50"], ["resnet50", "mobilenet_v2"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--scale-aug", "0.9;1.1"], ["--scale-aug", "0.9;1.1"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--scale-aug", "0,1.1"], ["--scale-aug", "between"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--fcdb-mix", "0.5"], ["--fcdb-mix needs --fcdb-head"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--init", "m0.safetensors", "--init-seed", "1"],
     ["--init-seed", "--init"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--branch-seed", "1"], ["--branch-seed needs --resume"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--top-weight", "2", "--centred-mos", "0.1"],
     ["--top-weight", "--centred-mos"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--lr", "nan"], ["--lr must be a positive number"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--lr", "0"], ["--lr must be a positive number"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--fcdb-weight", "inf"], ["--fcdb-weight must be a finite"]),
    (["--out", "m.safetensors", "--gaicd", "x", "--weight-decay", "inf"], ["--weight-decay must be a finite"]),
])
def test_train_usage_errors_are_one_line_and_exit_2(tmp_path, tiny_gaicd, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    args = [str(tiny_gaicd) + ":train" if a == "x" else a for a in args]
    code, out, err = cli("train", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err
    assert not list(tmp_path.glob("*.safetensors"))


def test_train_architecture_options_make_a_new_model_with_them(tmp_path, tiny_gaicd, tiny_fcdb, small_model_file,
                                                               monkeypatch):
    """--fcdb-head, --fcdb-mix, --dropout and --feat-dim end up in the saved model's config; they need a new
    model."""
    from smartcrop import weights
    from smartcrop.weights import load_model

    monkeypatch.setattr(weights, "load_backbone_weights", lambda net, path: "untrained (test)")
    out = tmp_path / "m.safetensors"
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--fcdb", tiny_fcdb, "--epochs", "1",
                       "--val-fraction", "0", "--fcdb-head", "--fcdb-mix", "0.5", "--dropout", "0.45",
                       "--feat-dim", "64", "--out", out)
    assert code == 0, err
    net = load_model(out)
    assert net.config.fcdb_head and net.config.fcdb_mix == 0.5 and net.config.dropout == 0.45
    assert net.config.feat_dim == 64 and net.score_head[-1].in_features == 64
    for flag, value in (("--dropout", "0.5"), ("--feat-dim", "128")):
        code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--init", small_model_file, flag, value,
                           "--out", tmp_path / "n.safetensors")
        assert code == 2 and flag in err and len(err.strip().splitlines()) == 1


def test_train_init_seed_sets_the_heads_initialisation_apart_from_the_data_seed(tmp_path, tiny_gaicd, tiny_fcdb,
                                                                                 monkeypatch):
    """--init-seed alone decides a new model's starting weights (so runs differing in --seed can start alike);
    without it --seed does, as before; the card records it."""
    from smartcrop import training, weights
    from smartcrop.weights import read_card

    monkeypatch.setattr(weights, "load_backbone_weights", lambda net, path: "untrained (test)")
    a, _ = training.build_model(seed=7)
    b, _ = training.build_model(seed=7)
    c, _ = training.build_model(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["region_fc.0.weight"], sc["region_fc.0.weight"])
    seen = []
    real = training.build_model
    monkeypatch.setattr(training, "build_model", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    for extra, init_seed in ((["--seed", "1", "--init-seed", "7"], 7), (["--seed", "3"], 3)):
        out = tmp_path / f"m{init_seed}.safetensors"
        code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--fcdb", tiny_fcdb, "--epochs", "1",
                           "--val-fraction", "0", "--device", "cpu", *extra, "--out", out)
        assert code == 0, err
        assert seen[-1] == init_seed
        tr = read_card(out)["training"]
        assert tr["init_seed"] == init_seed and tr["config"]["seed"] == int(extra[1])


def test_train_branches_resumed_with_their_own_seeds_share_the_checkpoint_and_then_differ(
        tmp_path, tiny_gaicd, tiny_fcdb, clean_album, small_model_file, one_thread):
    from smartcrop.weights import load_model, read_card

    common = ["train", "--gaicd", f"{tiny_gaicd}:train", "--fcdb", tiny_fcdb, "--unlabeled", clean_album,
              "--init", small_model_file, "--val-fraction", "0", "--device", "cpu", "-j", "1"]
    base = tmp_path / "base.safetensors"
    code, _, err = cli(*common, "--epochs", "1", "--out", base)
    assert code == 0, err
    outs = {}
    for name, extra in (("a", ["--branch-seed", "5"]), ("a2", ["--branch-seed", "5"]), ("b", ["--branch-seed", "6"]),
                        ("plain", [])):
        outs[name] = tmp_path / f"{name}.safetensors"
        code, _, err = cli(*common, "--epochs", "2", "--resume", base.with_suffix(".ckpt"), *extra,
                           "--out", outs[name])
        assert code == 0, err
    st = {k: load_model(p).state_dict() for k, p in outs.items()}
    key = "score_head.0.weight"
    assert torch.equal(st["a"][key], st["a2"][key])  # a branch is reproducible from its seed
    assert not torch.equal(st["a"][key], st["b"][key])  # and another seed makes another branch
    assert not torch.equal(st["a"][key], st["plain"][key])  # unlike the checkpoint's own continuation
    assert read_card(outs["b"])["training"]["branch"] == {"from": str(base.with_suffix(".ckpt")), "seed": 6}
    assert "branch" not in read_card(outs["plain"])["training"]
    # a checkpoint goes on only with the data its run read (it was continued on any, the card naming those)
    other = [*common[:6], clean_album / "sub", *common[7:]]
    code, _, err = cli(*other, "--epochs", "2", "--resume", base.with_suffix(".ckpt"), "--out",
                       tmp_path / "o.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"its run read other data (--unlabeled was {clean_album.resolve()})" in err
    # ... and only with the settings it started with (the checkpoint's scheduler and optimizer won, the card
    # said otherwise; another validation share moved photos across the split); a part missing: one line
    ckpt = base.with_suffix(".ckpt")
    for extra, words in ((["--lr-step", "1"], "its run trained with lr_step=4, not 1"),
                         (["--weight-decay", "0.5"], "its run trained with weight_decay=0.0001, not 0.5"),
                         (["--val-fraction", "0.5"], "its run read other data (--val-fraction was 0)")):
        code, _, err = cli(*common, *extra, "--epochs", "2", "--resume", ckpt, "--out", tmp_path / "o.safetensors")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (extra, err)
    st = torch.load(ckpt, weights_only=True)
    del st["scheduler"]
    torch.save(st, tmp_path / "cut.ckpt")
    code, _, err = cli(*common, "--epochs", "2", "--resume", tmp_path / "cut.ckpt", "--out",
                       tmp_path / "o.safetensors")
    assert code == 2 and "not a complete smartcrop checkpoint" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.safetensors").exists()


def test_eval_gaicd_and_fcdb_json(tiny_gaicd, tiny_fcdb, small_model_file):
    code, out, err = cli("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", small_model_file, "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["n_images"] == 3 and -1 <= m["srcc"] <= 1 and 0 <= m["acc5"] <= 100
    for ratio in ("any", "gt"):
        code, out, err = cli("eval", "fcdb", tiny_fcdb, "--split", "test", "--ratio", ratio, "--weights",
                             small_model_file, "--json")
        assert code == 0, err
        m = json.loads(out)
        assert m["n_images"] == 2 and 0 < m["iou"] <= 1 and m["disp"] >= 0
    # by default the free crop is chosen among the border grid's anchors alone (--free-grid gaic: GAIC's);
    # --refine adds the best one's neighbours
    import numpy as np

    from smartcrop import Cropper
    from smartcrop.anchors import border_anchors, gaic_anchors
    from smartcrop.cropper import fuse_box
    from smartcrop.data import read_fcdb
    from smartcrop.evaluate import fcdb_metrics
    from smartcrop.imageio import load_image

    c = Cropper(small_model_file, device="cpu")
    rows, rows_border = [], []
    for item in read_fcdb(tiny_fcdb, "test"):
        li = load_image(item.image_path, target_short_side=c.config.short_side)
        for grid, out_rows in ((gaic_anchors, rows), (border_anchors, rows_border)):
            boxes = grid(*li.full_size)
            s = c.score_boxes(li.image, li.full_size, {"a": boxes})["a"]
            out_rows.append((tuple(fuse_box(boxes, s, int(np.argmax(s)), c.fuse)), item.box, *li.full_size))
    code, out, err = cli("eval", "fcdb", tiny_fcdb, "--split", "test", "--free-grid", "gaic", "--weights",
                         small_model_file, "--json")
    assert code == 0, err
    assert json.loads(out)["iou"] == pytest.approx(fcdb_metrics(rows)["iou"], abs=1e-9)
    code, out, err = cli("eval", "fcdb", tiny_fcdb, "--split", "test", "--weights", small_model_file, "--json")
    assert code == 0, err
    assert json.loads(out)["iou"] == pytest.approx(fcdb_metrics(rows_border)["iou"], abs=1e-9)
    code, out, err = cli("eval", "fcdb", tiny_fcdb, "--split", "test", "--refine", "--weights", small_model_file,
                         "--json")
    assert code == 0, err
    assert json.loads(out)["iou"] != pytest.approx(fcdb_metrics(rows_border)["iou"], abs=1e-6)


def test_eval_table_and_usage_errors(tmp_path, tiny_gaicd, tiny_fcdb, small_model_file):
    code, out, _ = cli("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", small_model_file)
    assert code == 0 and "srcc" in out and "GAICD train (3 images)" in out
    for args, word in ((["gaicd", tiny_gaicd, "--split", "nosuch"], "nosuch"),
                       (["fcdb", tiny_fcdb, "--split", "dev"], "test or train"),
                       (["fcdb", tiny_fcdb, "--ratio", "16:9"], "any or gt"),
                       (["gaicd", tmp_path / "nothing", "--split", "test"], "nothing")):
        code, _, err = cli("eval", *args, "--weights", small_model_file)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err


def test_eval_predictions_never_land_among_the_benchmarks_files(tmp_path, tiny_gaicd, small_model_file, monkeypatch):
    """--predictions onto an annotation (or anywhere under images/ or annotations/), onto a folder or into a
    missing folder is refused in one line before any image is scored; the benchmark is left as it was."""
    from smartcrop import evaluate

    monkeypatch.setattr(evaluate, "gaicd_predictions", lambda *a, **k: pytest.fail("scored before the check"))
    ann = tiny_gaicd / "annotations" / "train" / "img0.txt"
    before = ann.read_bytes()
    for target, word in ((ann, "annotations folder"), (tiny_gaicd / "images" / "train" / "p.jsonl", "images folder"),
                         (tmp_path, "is a folder"), (tmp_path / "nosuch" / "p.jsonl", "no such folder"),
                         (ann / "p.jsonl", "img0.txt: not a folder")):
        code, out, err = cli("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", small_model_file,
                             "--json", "--predictions", target)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1 and out == "", (target, err)
    assert ann.read_bytes() == before
    monkeypatch.undo()
    code, _, err = cli("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", small_model_file, "--json",
                       "--predictions", tiny_gaicd / "pred.jsonl")  # beside the benchmark's folders: fine
    assert code == 0, err
    assert len((tiny_gaicd / "pred.jsonl").read_text().splitlines()) == 3


def test_eval_predictions_replace_only_an_earlier_predictions_file_or_an_empty_one(tmp_path, tiny_gaicd,
                                                                                   small_model_file):
    """The model being scored, your notes, a link or a FIFO named as --predictions are refused in one line and
    left as they were; an earlier predictions file (a re-run) and an empty one (mktemp) are replaced."""
    import os

    from smartcrop.weights import sha256_file

    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(notes)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model_sum = sha256_file(small_model_file)
    args = ("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", small_model_file, "--json", "--predictions")
    for target, word in ((small_model_file, "not a predictions file"), (notes, "not a predictions file"),
                         (link, "a symbolic link"), (fifo, "not a regular file")):
        code, out, err = cli(*args, target)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1 and out == "", (target, err)
    assert sha256_file(small_model_file) == model_sum and notes.read_text() == "mine\n"
    assert link.is_symlink() and fifo.is_fifo()
    pred, empty = tmp_path / "pred.jsonl", tmp_path / "empty.jsonl"
    empty.touch()
    for target in (pred, pred, empty):  # the second time over the first run's file
        code, _, err = cli(*args, target)
        assert code == 0, err
        assert len(target.read_text().splitlines()) == 3


def test_a_training_run_that_diverges_stops_in_one_line_and_saves_no_model(tmp_path, tiny_gaicd, small_model_file):
    out = tmp_path / "m.safetensors"
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--init", small_model_file, "--epochs", "3",
                       "--val-fraction", "0", "--device", "cpu", "--lr", "1e6", "--out", out)
    assert code == 1, err
    assert "training diverged" in err.strip().splitlines()[-1], err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_train_on_a_gpu_says_its_recipe_is_not_measured(tmp_path, monkeypatch):
    import smartcrop.cropper

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(smartcrop.cropper, "resolve_device", lambda d: "cuda")
    code, out, err = cli("train", "--out", "m.safetensors")  # no data: stops right after the note
    assert code == 2 and "no labeled data" in err
    assert "note: the GPU recipe" in err and "--device cpu" in err
    monkeypatch.setattr(smartcrop.cropper, "resolve_device", lambda d: "cpu")
    code, out, err = cli("train", "--out", "m.safetensors")
    assert code == 2 and "note:" not in err


def test_train_with_the_lite0_backbone_freezes_its_own_prefix(tmp_path, tiny_gaicd, tiny_fcdb, monkeypatch):
    """--backbone efficientnet_lite0: the saved model has that backbone and its taps, the CPU recipe froze its
    first 12 layers (its stride-16 stage), and `eval` scores with it."""
    import json

    from smartcrop import weights
    from smartcrop.weights import load_model, read_card

    monkeypatch.setattr(weights, "load_backbone_weights", lambda net, path: "untrained (test)")
    out = tmp_path / "lite.safetensors"
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--fcdb", tiny_fcdb, "--epochs", "1",
                       "--val-fraction", "0", "--backbone", "efficientnet_lite0", "--device", "cpu", "--out", out)
    assert code == 0, err
    net = load_model(out)
    assert net.config.backbone == "efficientnet_lite0" and net.config.taps == (5, 11, 16)
    assert len(net.backbone.features) == 18
    assert read_card(out)["training"]["config"]["frozen_layers"] == 12
    code, report, err = cli("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", out, "--json")
    assert code == 0, err
    assert json.loads(report)["n_images"] > 0
    # --backbone names a new model's: starting from this model with another one is refused, in one line
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--init", out, "--backbone", "mobilenet_v2",
                       "--out", tmp_path / "n.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "efficientnet_lite0, not mobilenet_v2" in err and not (tmp_path / "n.safetensors").exists()


def test_train_with_teachers_distils_and_records_them(tmp_path, tiny_gaicd, tiny_fcdb, clean_album, small_model_file):
    from smartcrop.weights import read_card, sha256_file

    out = tmp_path / "m.safetensors"
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--fcdb", tiny_fcdb, "--unlabeled", clean_album,
                       "--init", small_model_file, "--teacher", small_model_file, "--teacher", small_model_file,
                       "--epochs", "1", "--val-fraction", "0", "--device", "cpu", "--no-rc", "--out", out)
    assert code == 0, err
    card = read_card(out)
    assert card["training"]["teachers"] == [{"file": str(small_model_file), "sha256": sha256_file(small_model_file)}] * 2
    assert card["training"]["config"]["distill_weight"] == 1.0
    epoch = json.loads(out.with_suffix(".log.jsonl").read_text().splitlines()[-1])
    assert "distill" in epoch["loss"] and "rc" not in epoch["loss"]


@pytest.mark.parametrize("teacher, unlabeled, words", [
    ("missing.safetensors", True, ["missing.safetensors", "no such teacher model"]),
    ("junk.safetensors", True, ["junk.safetensors"]),
    ("model", False, ["--teacher needs --unlabeled"]),
])
def test_train_teacher_errors_are_one_line_and_exit_2(tmp_path, tiny_gaicd, tiny_album, small_model_file,
                                                      monkeypatch, teacher, unlabeled, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    args = ["train", "--out", "m.safetensors", "--gaicd", f"{tiny_gaicd}:train", "--val-fraction", "0",
            "--init", small_model_file,  # no ImageNet backbone file needed (CI has none)
            "--teacher", small_model_file if teacher == "model" else teacher]
    code, out, err = cli(*args, *(["--unlabeled", tiny_album] if unlabeled else []))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err
    assert not list(tmp_path.glob("m.*"))


def test_average_writes_the_mean_model_with_its_card_and_never_overwrites_an_input(tmp_path, small_model,
                                                                                  small_model_file):
    from smartcrop.weights import load_model, read_card, save_model, sha256_file

    with torch.no_grad():
        for p in small_model.parameters():
            p.add_(1.0)
    other = tmp_path / "other.safetensors"
    save_model(small_model, other, {"training": {"init_seed": 0}})
    before = sha256_file(small_model_file), sha256_file(other)
    out = tmp_path / "avg.safetensors"
    code, _, err = cli("average", small_model_file, other, "--out", out)
    assert code == 0, err
    assert "do not show one shared initialisation seed" in err  # the first card records none
    a, b, m = (load_model(p).state_dict() for p in (small_model_file, other, out))
    for k in ("score_head.0.weight", "region_fc.0.weight", "backbone.features.18.1.running_var"):
        assert torch.allclose(m[k], (a[k] + b[k]) / 2, atol=2e-3), k  # float16 storage
    card = read_card(out)
    assert card["command"].startswith("smartcrop average") and len(card["average_of"]) == 2
    assert (sha256_file(small_model_file), sha256_file(other)) == before
    for args, words in ((["--out", small_model_file], "never overwritten"),
                        (["--out", tmp_path / "x.pt"], ".safetensors"),
                        (["--out", tmp_path / "y.safetensors"], "no such model file")):
        extra = [tmp_path / "missing.safetensors"] if words == "no such model file" else []
        code, _, err = cli("average", small_model_file, other, *extra, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    code, _, err = cli("average", small_model_file, "--out", tmp_path / "z.safetensors")
    assert code == 2 and "two or more" in err and not (tmp_path / "z.safetensors").exists()
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(small_model_file.read_bytes())
    for args in ((small_model_file, small_model_file), (small_model_file, other, twin)):
        code, _, err = cli("average", *args, "--out", tmp_path / "z.safetensors")
        assert code == 2 and "the same model as" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "z.safetensors").exists()
    assert sha256_file(small_model_file) == before[0]


def test_average_takes_a_pt_state_dict_as_run_does(tmp_path, small_model, small_model_file):
    from smartcrop.weights import load_model, read_card

    pt = tmp_path / "other.pt"
    torch.save({"model": small_model.state_dict(), "config": small_model.config.to_dict()}, pt)
    out = tmp_path / "avg.safetensors"
    code, _, err = cli("average", small_model_file, pt, "--out", out)
    assert code == 0, err
    assert [m["init_seed"] for m in read_card(out)["average_of"]] == [None, None]
    a, m = load_model(small_model_file).state_dict(), load_model(out).state_dict()
    assert torch.allclose(m["score_head.0.weight"], a["score_head.0.weight"], atol=2e-3)


def test_train_never_replaces_files_it_did_not_make_and_asks_before_replacing_its_own(tmp_path, tiny_gaicd,
                                                                                      small_model_file):
    from smartcrop.training import is_checkpoint

    out = tmp_path / "m.safetensors"
    common = ["train", "--gaicd", f"{tiny_gaicd}:train", "--init", small_model_file, "--epochs", "1",
              "--val-fraction", "0", "--device", "cpu", "-j", "1", "--out", out]
    ckpt, log = out.with_suffix(".ckpt"), out.with_suffix(".log.jsonl")
    # someone else's files where the run's checkpoint and log would go: refused, whatever the flags
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, ckpt)  # e.g. another trainer's checkpoint
    before = ckpt.read_bytes()
    for extra in ([], ["--force"]):
        code, _, err = cli(*common, *extra)
        assert code == 2 and str(ckpt) in err and "not a smartcrop checkpoint" in err and len(err.splitlines()) == 1
        assert ckpt.read_bytes() == before and not out.exists() and not log.exists()
    ckpt.write_text("notes\n")
    assert cli(*common, "--force")[0] == 2 and ckpt.read_text() == "notes\n"
    ckpt.unlink()
    log.write_text("my own log\n")
    code, _, err = cli(*common, "--force")
    assert code == 2 and "not a smartcrop training log" in err and log.read_text() == "my own log\n"
    log.unlink()
    card = out.with_suffix(".json")
    card.write_text('{"experiment": "mine"}\n')  # where the model's card would go
    code, _, err = cli(*common, "--force")
    assert code == 2 and "not a smartcrop model card" in err and card.read_text() == '{"experiment": "mine"}\n'
    card.unlink()
    # its own files: a finished run is replaced only with --force; a checkpoint can be resumed
    code, _, err = cli(*common)
    assert code == 0, err
    assert is_checkpoint(ckpt) and not is_checkpoint(log) and not is_checkpoint(out)
    model = out.read_bytes()
    code, _, err = cli(*common)
    assert code == 2 and f"{out} exists" in err and "--force" in err and out.read_bytes() == model
    out.unlink()  # an unfinished run: its checkpoint alone
    code, _, err = cli(*common)
    assert code == 2 and f"--resume {ckpt}" in err and not out.exists()
    code, _, err = cli(*common[:6], "2", *common[7:], "--resume", ckpt)
    assert code == 0, err
    code, _, err = cli(*common, "--force")
    assert code == 0, err
    assert json.loads(log.read_text().splitlines()[0])["event"] == "start"


def test_average_replaces_only_its_own_model_with_force_and_refuses_bad_outputs_before_any_work(
        tmp_path, small_model_file, monkeypatch):
    import shutil

    import smartcrop.weights as weights

    from smartcrop.weights import load_model, save_model

    a, b = tmp_path / "a.safetensors", tmp_path / "b.json"  # any name loads: b's card would be b.json itself
    shutil.copy(small_model_file, a)
    other = load_model(small_model_file)
    with torch.no_grad():
        other.score_head[0].bias.add_(1.0)  # another model: averaging one with itself is refused
    save_model(other, tmp_path / "src" / "b.safetensors")
    shutil.copy(tmp_path / "src" / "b.safetensors", b)
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes\n")
    (tmp_path / "mine.json").write_text('{"mine": 1}\n')
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    calls = []
    monkeypatch.setattr(weights, "average_models", lambda paths: calls.append(paths))  # nothing may get that far
    files = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for out, words in ((notes, "not a smartcrop model"), (tmp_path / "mine.safetensors", "not a smartcrop model card"),
                       (tmp_path / "b.safetensors", "would replace an input"),
                       (tmp_path / "dir.safetensors", "is a folder"),
                       (tmp_path / "file" / "m.safetensors", "is not a folder"), (a, "would replace an input")):
        for extra in ([], ["--force"]):
            code, _, err = cli("average", a, b, "--out", out, *extra)
            assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (out, err)
    assert not calls and {p: p.read_bytes() for p in files} == files
    monkeypatch.undo()
    out = tmp_path / "sub" / "avg.safetensors"
    assert cli("average", a, b, "--out", out)[0] == 0
    first = out.read_bytes()
    code, _, err = cli("average", a, b, "--out", out)
    assert code == 2 and "exists" in err and "--force" in err and out.read_bytes() == first
    with torch.no_grad():
        other.score_head[0].bias.add_(1.0)
    save_model(other, tmp_path / "src" / "c.safetensors")
    code, _, err = cli("average", a, b, tmp_path / "src" / "c.safetensors", "--out", out, "--force")
    assert code == 0, err
    assert out.read_bytes() != first and json.loads(out.with_suffix(".json").read_text())["file"] == out.name



def test_eval_notes_photos_missing_from_a_benchmark_in_one_line(tmp_path, tiny_fcdb, small_model_file):
    js = tiny_fcdb / "cropping_testing_set.json"
    entries = json.loads(js.read_text())
    js.write_text(json.dumps(entries + [{"url": "https://example.invalid/gone.jpg", "crop": [1, 1, 20, 20]}]))
    code, out, err = cli("eval", "fcdb", tiny_fcdb, "--weights", small_model_file, "--json", "--device", "cpu")
    assert code == 0, err
    assert err.strip().splitlines() == [f"smartcrop: note: {js}: 1 listed photos are not in {tiny_fcdb / 'images'}; "
                                        "skipped"]
    assert json.loads(out)["n_images"] == 2
    # a test photo that the training list names too: said, so that a leak does not pass for a result
    train = json.loads((tiny_fcdb / "cropping_training_set.json").read_text())
    js.write_text(json.dumps(entries + train[:1]))
    code, out, err = cli("eval", "fcdb", tiny_fcdb, "--weights", small_model_file, "--json", "--device", "cpu")
    assert code == 0 and json.loads(out)["n_images"] == 3, err
    assert err.strip().splitlines() == [f"smartcrop: note: 1 photos of the test list are also in the training list "
                                        f"of {tiny_fcdb}: a model trained on that list has seen them"]


def test_a_malformed_gaicd_annotation_fails_that_image_alone(tmp_path, tiny_gaicd, small_model_file):
    """eval: the image is named with the file and line, left out, the others scored, exit 1; train: the same
    line, trained on the others, exit 1."""
    ann = tiny_gaicd / "annotations" / "train" / "img1.txt"
    ann.write_text(ann.read_text() + "0 0 x 40 3\n")
    code, out, err = cli("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", small_model_file, "--json")
    assert code == 1 and json.loads(out)["n_images"] == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "img1.txt:" in lines[0] and "not numbers" in lines[0] and \
        lines[0].endswith("img1.jpg skipped"), lines
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--init", small_model_file, "--epochs", "1",
                       "--val-fraction", "0", "--device", "cpu", "--out", tmp_path / "t.safetensors")
    assert code == 1 and "img1.jpg skipped" in err and "prepared 2 GAICD" in err, err
    assert (tmp_path / "t.safetensors").is_file()
    assert err.strip().splitlines()[-1].endswith("1 photo left out (named above): the model was trained without them")


def test_train_counts_a_validation_photo_it_cannot_read_as_left_out(tmp_path, tiny_gaicd, small_model_file):
    from smartcrop.weights import read_card

    out = tmp_path / "t.safetensors"
    args = ["train", "--gaicd", f"{tiny_gaicd}:train", "--init", small_model_file, "--epochs", "2",
            "--val-fraction", "0.34", "--device", "cpu", "--out", out]
    code, _, err = cli(*args)
    assert code == 0, err
    held_out = read_card(out)["training"]["val_gaicd"]
    assert len(held_out) == 1
    (tiny_gaicd / "images" / "train" / f"{held_out[0]}.jpg").write_bytes(b"not a jpeg")
    code, _, err = cli(*args, "--force")
    lines = err.strip().splitlines()
    assert code == 1 and sum("validation photo skipped" in ln for ln in lines) == 1, err  # once, not once an epoch
    assert out.is_file()
    assert lines[-1] == "smartcrop: 1 photo left out (named above): the model was trained without them"


def test_eval_skips_a_photo_whose_annotations_lie_outside_it_in_one_line(tmp_path, tiny_gaicd, tiny_fcdb,
                                                                         small_model_file):
    """Annotations of another photo (or of a resized copy, or with x and y swapped) are not scored as if they
    fitted: the photo is named in one line, skipped, and the exit status says a photo was left out."""
    ann = tiny_gaicd / "annotations" / "train" / "img1.txt"
    ann.write_text(ann.read_text() + "0 0 120 400 3.00\n")  # x2 = 400 on a 160 px wide photo
    code, out, err = cli("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", small_model_file, "--json")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "img1.jpg" in lines[0] and "x 0-400" in lines[0] and "160x120" in lines[0], err
    assert json.loads(out)["n_images"] == 2
    ann.write_text(ann.read_text().replace("0 0 120 400", "0 0 120 161"))  # a pixel of rounding is allowed
    code, out, err = cli("eval", "gaicd", tiny_gaicd, "--split", "train", "--weights", small_model_file, "--json")
    assert code == 0 and json.loads(out)["n_images"] == 3, err

    js = tiny_fcdb / "cropping_testing_set.json"
    entries = json.loads(js.read_text())
    entries[1]["crop"] = [100, 10, 100, 80]  # reaches x = 200
    js.write_text(json.dumps(entries))
    for ratio in ("any", "gt"):
        code, out, err = cli("eval", "fcdb", tiny_fcdb, "--ratio", ratio, "--weights", small_model_file, "--json")
        assert code == 1 and json.loads(out)["n_images"] == 1, err
        assert len(err.strip().splitlines()) == 1 and "4_x_b.jpg" in err and "outside" in err, err
