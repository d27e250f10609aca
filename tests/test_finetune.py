"""`smartcrop finetune`, `smartcrop models`, `--model NAME` and `smartcrop run --adapt` on tiny drawn albums."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from conftest import draw_photo, sha  # noqa: E402
from smartcrop.cli import app  # noqa: E402


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_finetune_album_writes_a_loadable_model_that_moved(tmp_path, tiny_album, small_model_file, monkeypatch):
    monkeypatch.setenv("SMARTCROP_HOME", str(tmp_path / "home"))
    base_sha = sha(small_model_file)
    code, _, err = cli("finetune", tiny_album, "-o", "holiday-2026", "--weights", small_model_file,
                       "--epochs", "2", "--lr", "1e-3", "--distill", "0")
    assert code == 1 and "broken.jpg" in err, err  # the unreadable photo is named and left out: exit 1
    assert err.strip().splitlines()[-2:] == [
        f"smartcrop: saved {tmp_path / 'home' / 'models' / 'holiday-2026.safetensors'} (sha256 "
        f"{sha(tmp_path / 'home' / 'models' / 'holiday-2026.safetensors')[:12]}…); use it with --model holiday-2026",
        "smartcrop: 1 photo left out (named above): the model was trained without them"]
    out = tmp_path / "home" / "models" / "holiday-2026.safetensors"
    assert out.is_file() and not out.with_suffix(".ckpt").exists()
    assert sha(small_model_file) == base_sha  # the base model is never touched

    from smartcrop.weights import load_model, read_card

    base, tuned = load_model(small_model_file), load_model(out)
    card = read_card(out)
    assert card["finetune"]["photos"] == 6 and len(card["finetune"]["history"]) == 2
    sd_b, sd_t = base.state_dict(), tuned.state_dict()
    assert not torch.equal(sd_b["score_head.0.weight"], sd_t["score_head.0.weight"])
    # the backbone and the ranking head are frozen during adaptation
    assert all(torch.equal(sd_b[k], sd_t[k]) for k in sd_b if k.startswith(("backbone.", "rank_head.")))

    # usable by name everywhere, and listed
    code, out_json, _ = cli("models", "--json")
    assert code == 0
    assert [json.loads(line)["name"] for line in out_json.splitlines()][-1] == "holiday-2026"
    code, out_run, err = cli("run", tiny_album / "p0.jpg", "--model", "holiday-2026", "--ratio", "1:1", "--json",
                             "-o", tmp_path / "o")
    assert code == 0, err
    assert len(out_run.splitlines()) == 1
    # an existing model is not replaced without --force
    code, _, err = cli("finetune", tiny_album, "-o", "holiday-2026", "--weights", small_model_file)
    assert code == 2 and "exists" in err


def test_distillation_keeps_the_model_close_to_its_base(tmp_path, tiny_album, small_model_file):
    from smartcrop.finetune import FinetuneConfig, finetune
    from smartcrop.weights import load_model

    photos = sorted(p for p in tiny_album.rglob("p*.jpg"))
    x = torch.rand(1, 3, 64, 96) * 255
    boxes = torch.tensor([[0.0, 0.0, 96.0, 64.0], [10.0, 5.0, 70.0, 50.0], [30.0, 0.0, 96.0, 60.0],
                          [0.0, 10.0, 60.0, 64.0]])

    def drift(distill):
        base, net = load_model(small_model_file), load_model(small_model_file)
        finetune(net, photos, FinetuneConfig(epochs=3, lr=3e-3, distill=distill), log=lambda s: None,
                 progress=False)
        with torch.no_grad():
            a = base.score_boxes(base.image_features(x), boxes)
            b = net.score_boxes(net.image_features(x), boxes)
        return float((a - b).abs().mean())

    assert drift(10.0) < drift(0.0)


def test_finetune_with_labeled_data_and_resume(tmp_path, clean_album, tiny_gaicd, small_model_file):
    out = tmp_path / "m.safetensors"
    code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "1",
                       "--labeled", tiny_gaicd)
    assert code == 0, err
    from smartcrop.weights import read_card

    hist = read_card(out)["finetune"]["history"]
    assert set(hist[0]["loss"]) == {"rc", "labeled"}

    # resume: a checkpoint after epoch 1 continues to epoch 2
    from smartcrop.finetune import FinetuneConfig, finetune
    from smartcrop.weights import load_model

    photos = sorted(p for p in clean_album.rglob("p*.jpg"))
    net = load_model(small_model_file)
    ck = tmp_path / "f.ckpt"
    finetune(net, photos, FinetuneConfig(epochs=1), checkpoint=ck, log=lambda s: None, progress=False)
    net2 = load_model(small_model_file)
    h = finetune(net2, photos, FinetuneConfig(epochs=2), resume=ck, log=lambda s: None, progress=False)
    assert [r["epoch"] for r in h] == [1, 2]
    # the checkpoint of another architecture's fine-tuning: one line, no traceback
    from smartcrop.errors import UsageError
    from smartcrop.model import ModelConfig, SACNet

    other = SACNet(ModelConfig(short_side=64, max_long_side=128, saf=False)).eval()
    with pytest.raises(UsageError, match="f.ckpt: the checkpoint does not fit the model being fine-tuned") as e:
        finetune(other, photos, FinetuneConfig(epochs=2), resume=ck, log=lambda s: None, progress=False)
    assert "\n" not in str(e.value)




def test_run_adapt_with_too_few_readable_photos_crops_them_unadapted_and_names_the_others(tmp_path, tiny_album,
                                                                                         small_model_file):
    """Four photos listed, two readable: the two unreadable ones are named, the readable ones are cropped by the
    model as it is (said in one line), exit 1 — not a usage error that crops nothing and names nobody."""
    album = tmp_path / "few"
    album.mkdir()
    for name in ("p0.jpg", "p2.jpg"):
        (album / name).write_bytes((tiny_album / name).read_bytes())
    for name in ("x1.jpg", "x2.jpg"):
        (album / name).write_bytes(b"not a jpeg")
    out = tmp_path / "o"
    code, stdout, err = cli("run", album, "--ratio", "1:1", "--adapt", "--adapt-epochs", "1", "--json", "-o", out,
                            "--weights", small_model_file)
    assert code == 1, err
    assert sorted(json.loads(line)["input"].rsplit("/", 1)[-1] for line in stdout.splitlines()) == \
        ["p0.jpg", "p2.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["p0_1x1.jpg", "p2_1x1.jpg"]
    lines = err.strip().splitlines()
    assert any("not adapted: only 2 usable photo(s)" in line for line in lines), err
    assert sum("x1.jpg" in line for line in lines) == 1 and sum("x2.jpg" in line for line in lines) == 1, err

def test_finetune_skips_labeled_photos_whose_annotations_lie_outside_them(tmp_path, tiny_album, tiny_gaicd,
                                                                          small_model):
    from smartcrop.data import read_gaicd
    from smartcrop.finetune import cache_photos

    ann = tiny_gaicd / "annotations" / "train" / "img0.txt"
    ann.write_text(ann.read_text() + "0 0 500 100 4.00\n")  # y2 = 500 on a 120 px high photo
    logged = []
    cached = cache_photos(small_model, read_gaicd(tiny_gaicd, "train"), logged.append, progress=False,
                          kind="gaicd")
    assert [p.name for p in cached] == ["img1.jpg", "img2.jpg"]
    assert len(logged) == 1 and "img0.jpg" in logged[0] and "y 0-500" in logged[0], logged

def test_finetune_of_a_model_with_a_separate_fcdb_head_trains_each_head_on_its_own_data(tiny_gaicd, tiny_fcdb):
    """Expert crops adapt the FCDB head, human scores the MOS head; the album's rank consistency the score
    `run` ranks by (both heads)."""
    from smartcrop.finetune import Finetuner, FinetuneConfig, cache_photos, labeled_sources
    from smartcrop.model import ModelConfig, SACNet

    torch.manual_seed(0)
    net = SACNet(ModelConfig(short_side=64, max_long_side=128, fcdb_head=True)).eval()
    tuner = Finetuner(net, FinetuneConfig(), "cpu")

    def heads_moved(root, kind):
        _, items = labeled_sources(root)
        photo = cache_photos(net, items[:1], lambda s: None, progress=False, kind=kind)[0]
        parts = tuner.photo_loss(photo)
        tuner.opt.zero_grad()
        sum(parts.values()).backward()
        return {h for h in ("score_head", "fcdb_head")
                if any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters()
                       if n.startswith(h))}

    assert heads_moved(tiny_fcdb, "fcdb") == {"fcdb_head"}
    assert heads_moved(tiny_gaicd, "gaicd") == {"score_head"}


def test_too_few_photos_is_a_clear_error(tmp_path, small_model_file, monkeypatch):
    album = tmp_path / "few"
    draw_photo(album / "a.jpg")
    draw_photo(album / "b.jpg", seed=2)
    import smartcrop.cli

    monkeypatch.setattr(smartcrop.cli, "_cropper", lambda *a: pytest.fail("the model was loaded first"))
    code, _, err = cli("finetune", album, "-o", tmp_path / "new" / "m.safetensors", "--weights", small_model_file)
    assert code == 2 and "only 2 usable photo" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()  # no folder made for a model never written
    monkeypatch.undo()
    (album / "c.jpg").write_bytes(b"not a photo")
    (album / "d.jpg").write_bytes(b"not a photo either")
    code, _, err = cli("finetune", album, "-o", tmp_path / "new" / "m.safetensors", "--weights", small_model_file)
    assert code == 2 and "only 2 usable photo" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("args, words", [(["--lr", "nan"], "--lr must be a positive number"),
                                         (["--lr", "-1e-4"], "--lr must be a positive number"),
                                         (["--distill", "inf"], "--distill must be a finite number")])
def test_finetune_numbers_that_cannot_train_are_refused(tmp_path, tiny_album, small_model_file, args, words):
    code, _, err = cli("finetune", tiny_album, "-o", tmp_path / "m.safetensors", "--weights", small_model_file,
                       *args)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.safetensors").exists()


def test_a_negative_distillation_weight_is_refused(tmp_path, tiny_album, small_model_file):
    code, _, err = cli("finetune", tiny_album, "-o", tmp_path / "m.safetensors", "--weights", small_model_file,
                       "--distill", "-5")
    assert code == 2 and "--distill" in err and not (tmp_path / "m.safetensors").exists()


def test_a_finetune_that_diverges_stops_in_one_line_and_saves_nothing(tmp_path, tiny_album, small_model_file):
    out = tmp_path / "m.safetensors"
    code, _, err = cli("finetune", tiny_album, "-o", out, "--weights", small_model_file, "--lr", "1e6",
                       "--epochs", "2")
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert "training diverged" in last and "nan" in last and "--lr" in last, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["album", "models"]  # no model, card or checkpoint


def test_resume_takes_only_its_own_commands_checkpoint_refused_before_any_work(tmp_path, tiny_album, tiny_gaicd,
                                                                                small_model_file, monkeypatch):
    """The model file given instead of its .ckpt, a text file, a list, or the other command's checkpoint: one
    line, exit 2, before a photo is decoded or a model loaded."""
    import smartcrop.cli

    monkeypatch.setattr(smartcrop.cli, "_cropper", lambda *a: pytest.fail("the model was loaded first"))
    common = {"model": {}, "optimizer": {}, "epoch": 1, "history": "[]", "rng": "{}"}
    torch.save(common, tmp_path / "ft.ckpt")
    torch.save({**common, "train_config": "{}"}, tmp_path / "tr.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for resume, words in ((small_model_file, "not a smartcrop checkpoint"), (tmp_path / "notes.ckpt", "not a smartcrop"),
                          (tmp_path / "list.ckpt", "not a smartcrop"), (tmp_path / "tr.ckpt", "a training checkpoint")):
        code, _, err = cli("finetune", tiny_album, "-o", tmp_path / "m.safetensors", "--weights", small_model_file,
                           "--resume", resume)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (resume, err)
    monkeypatch.setattr("smartcrop.training.load_train_data", lambda *a: pytest.fail("data read first"))
    for resume, words in ((small_model_file, "not a smartcrop checkpoint"),
                          (tmp_path / "ft.ckpt", "a fine-tuning checkpoint: continue it with smartcrop finetune")):
        code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--out", tmp_path / "t.safetensors",
                           "--resume", resume)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (resume, err)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "t.safetensors").exists()


def test_bad_labeled_data_is_one_line_before_any_work_and_its_notes_are_notes(tmp_path, clean_album, tiny_gaicd,
                                                                              tiny_fcdb, small_model_file,
                                                                              monkeypatch):
    import smartcrop.cli

    ann = tiny_gaicd / "annotations" / "train" / "img1.txt"
    good = ann.read_text()
    monkeypatch.setattr(smartcrop.cli, "_cropper", lambda *a: pytest.fail("the model was loaded first"))
    (tiny_fcdb / "cropping_training_set.json").write_text('[{"url": "https://x/0_x_b.jpg", "crop": "1234"}]')
    for data, words in ((tiny_fcdb, "entry 0: crop '1234' is not a box"), (tmp_path / "nowhere", "neither a GAICD")):
        code, _, err = cli("finetune", clean_album, "-o", tmp_path / "m.safetensors", "--weights", small_model_file,
                           "--labeled", data)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    monkeypatch.undo()
    # a malformed GAICD annotation: that image named and left out, the rest used; a reader's warning (an
    # annotation without its photo) is a note line, not a Python warning
    ann.write_text(good + "0 0 50 50 9\n")
    (ann.parent / "lost.txt").write_text(good)
    code, _, err = cli("finetune", clean_album, "-o", tmp_path / "m.safetensors", "--weights", small_model_file,
                       "--labeled", tiny_gaicd, "--epochs", "1")
    assert code == 1 and err.strip().splitlines()[-1].endswith("1 photo left out (named above): the model was "
                                                                "trained without them"), err
    bad = [ln for ln in err.splitlines() if "img1.txt:" in ln]
    assert len(bad) == 1 and "outside GAICD's 1 to 5" in bad[0] and bad[0].endswith("img1.jpg skipped"), err
    notes = [ln for ln in err.splitlines() if "annotation files have no image" in ln]
    assert len(notes) == 1 and notes[0].startswith("smartcrop: note: ") and "UserWarning" not in err, err
    code, _, err = cli("train", "--gaicd", f"{tiny_gaicd}:train", "--init", small_model_file, "--epochs", "1",
                       "--val-fraction", "0", "--device", "cpu", "--out", tmp_path / "t.safetensors")
    assert code == 1 and "img1.jpg skipped" in err, err  # the same image left out
    notes = [ln for ln in err.splitlines() if "annotation files have no image" in ln]
    assert len(notes) == 1 and notes[0].startswith("smartcrop: note: ") and "UserWarning" not in err, err


def test_run_adapt_crops_with_an_adapted_copy_and_leaves_the_model_untouched(tmp_path, tiny_album,
                                                                              small_model_file):
    before = sha(small_model_file)
    files = sorted(p.name for p in (tmp_path).rglob("*"))
    code, out, err = cli("run", tiny_album, "-r", "--ratio", "4:5", "--adapt", "--adapt-epochs", "1", "--json",
                         "-o", tmp_path / "out", "--weights", small_model_file)
    assert code == 1 and err.count("broken.jpg") == 1  # one bad file, named once, the rest cropped
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) == 5 and all(Path(r["output"]).is_file() for r in recs)
    assert sha(small_model_file) == before
    new = sorted(p.name for p in tmp_path.rglob("*") if not str(p).startswith(str(tmp_path / "out")))
    assert new == files  # nothing written besides the crops
    x1, y1, x2, y2 = recs[0]["box"]
    assert abs((x2 - x1) * 5 - (y2 - y1) * 4) <= 5 and np.isfinite(recs[0]["score"])


def test_finetune_never_replaces_or_removes_a_checkpoint_it_did_not_write(tmp_path, clean_album, small_model_file):
    out = tmp_path / "m.safetensors"
    ckpt = out.with_suffix(".ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)  # e.g. a Lightning checkpoint beside it
    before = ckpt.read_bytes()
    for extra in ([], ["--force"]):
        code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "1", *extra)
        assert code == 2 and "not a smartcrop checkpoint" in err and ckpt.read_bytes() == before
        assert not out.exists()
    ckpt.unlink()
    code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "1")
    assert code == 0, err
    assert out.is_file() and not ckpt.exists()  # its own checkpoint is removed once the model is saved


def test_finetune_never_writes_over_the_model_it_adapts(tmp_path, tiny_album, small_model_file):
    import shutil

    base = tmp_path / "base.safetensors"
    shutil.copy(small_model_file, base)
    before = base.read_bytes()
    code, _, err = cli("finetune", tiny_album, "-o", base, "--weights", base, "--epochs", "1", "--force")
    assert code == 2 and "would replace an input" in err and base.read_bytes() == before


def test_models_lists_what_model_can_choose_whatever_the_models_folder_holds(tmp_path, small_model_file,
                                                                             tiny_album, monkeypatch):
    import shutil

    monkeypatch.setenv("SMARTCROP_HOME", str(tmp_path / "home"))
    d = tmp_path / "home" / "models"
    d.mkdir(parents=True)
    for name, card in (("a", '{"finetune": "x"}'), ("b", '{"training": [1]}'),
                       ("c", '{"training": {"n_gaicd": "many"}}'), ("default", None), ("my model", None)):
        shutil.copy(small_model_file, d / f"{name}.safetensors")
        if card is not None:
            (d / f"{name}.json").write_text(card)
    (d / "adir.safetensors").mkdir()
    (d / "gone.safetensors").symlink_to(tmp_path / "nowhere")
    (d / "half.safetensors").write_bytes(small_model_file.read_bytes()[:50_000])  # an interrupted copy
    for args in (["models"], ["models", "--json"]):
        code, out, err = cli(*args)
        assert code == 0, err
        assert "a" in out and "b" in out and "adir" not in out and "gone" not in out and "my model" not in out
        notes = err.strip().splitlines()
        assert len(notes) == 3 and all("cannot be chosen with --model" in n for n in notes[:2]), notes
        assert "default.safetensors" in err and "my model.safetensors" in err
        assert "note: --model half will not load" in notes[2] and "not a valid safetensors file" in notes[2]
    names = [json.loads(line)["name"] for line in out.splitlines()]
    assert names.count("default") <= 1 and [n for n in names if n != "default"] == ["a", "b", "c", "half"]
    code, _, err = cli("finetune", tiny_album, "-o", "default", "--weights", small_model_file, "--epochs", "1")
    assert code == 2 and "shipped model's name" in err


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupted_finetune_names_its_checkpoint_and_leaves_no_partial_file(tmp_path, clean_album,
                                                                                 small_model_file, monkeypatch,
                                                                                 signal_name):
    import os
    import signal

    import smartcrop.imageio as imageio

    out = tmp_path / "m.safetensors"
    real_write, saves = imageio.write_atomic, []

    def interrupted(fd):
        if signal_name == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    def write_atomic(path, data):  # the second epoch's checkpoint is cut off once its bytes are in the file
        if str(path).endswith(".ckpt"):
            saves.append(path)
            if len(saves) == 2:
                with monkeypatch.context() as m:
                    m.setattr(imageio.os, "fsync", interrupted)
                    return real_write(path, data)
        return real_write(path, data)

    monkeypatch.setattr(imageio, "write_atomic", write_atomic)
    code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "3")
    assert code == (143 if signal_name == "SIGTERM" else 130)
    ckpt = out.with_suffix(".ckpt")
    assert err.strip().splitlines()[-1] == (f"smartcrop: {'terminated' if signal_name == 'SIGTERM' else 'interrupted'}"
                                            f": the last finished epoch is in {ckpt}: go on with --resume {ckpt}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file
    assert not out.exists() and torch.load(ckpt, weights_only=True)["epoch"] == 1
    assert len(saves) == 2
    monkeypatch.setattr(imageio, "write_atomic", real_write)
    code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "3",
                       "--resume", ckpt)
    assert code == 0, err
    assert out.is_file() and not ckpt.exists()


def test_run_adapt_without_enough_photo_files_is_refused_before_any_folder_is_made(tmp_path, tiny_album,
                                                                                   small_model_file):
    one = tiny_album / "p0.jpg"
    code, _, err = cli("run", one, "--adapt", "-o", tmp_path / "o1", "--weights", small_model_file)
    assert code == 2 and "needs at least 4; 1 given" in err and not (tmp_path / "o1").exists()
    r = CliRunner().invoke(app, ["run", "-", "--ratio", "1:1", "--adapt", "--weights", str(small_model_file)],
                           input=one.read_bytes())
    assert r.exit_code == 2 and "cannot adapt to an image on stdin" in r.stderr and r.stdout_bytes == b""


def test_an_output_path_through_a_missing_folder_and_up_again_is_checked_where_it_lands(tmp_path, tiny_album,
                                                                                        small_model_file):
    """`-o new/../base.safetensors`: `new` does not exist yet, so the path did not exist either and passed every
    check — then the run made `new` and wrote over the model it adapted (or another program's file)."""
    import shutil

    base = tmp_path / "base.safetensors"
    shutil.copy(small_model_file, base)
    shutil.copy(small_model_file.with_suffix(".json"), base.with_suffix(".json"))
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_text("someone else's file")
    before = {p: p.read_bytes() for p in (base, base.with_suffix(".json"), foreign)}
    for out, words in ((tmp_path / "new" / ".." / "base.safetensors", "would replace an input"),
                       (tmp_path / "new2" / ".." / "foreign.safetensors", "is not a smartcrop model")):
        code, _, err = cli("finetune", tiny_album, "-o", out, "--weights", base, "--epochs", "1", "--force")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in before} == before


def test_the_checkpoint_is_written_through_a_fresh_temporary_file_never_through_a_link(tmp_path, clean_album,
                                                                                       small_model_file):
    """The checkpoint's temporary file had a fixed name (`.OUT.ckpt.tmp`) and its write followed a link there:
    a link to the base model turned that model into a checkpoint."""
    import shutil

    base = tmp_path / "base.safetensors"
    shutil.copy(small_model_file, base)
    before = base.read_bytes()
    (tmp_path / ".m.ckpt.tmp").symlink_to(base)
    code, _, err = cli("finetune", clean_album, "-o", tmp_path / "m.safetensors", "--weights", base, "--epochs", "1")
    assert code == 0, err
    assert base.read_bytes() == before and (tmp_path / ".m.ckpt.tmp").is_symlink()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".smartcrop-")]


def test_resume_replaces_only_its_own_output_and_continues_only_its_own_run(tmp_path, clean_album, small_model_file):
    """--resume from another run's checkpoint replaced an existing --out without --force; a checkpoint of another
    base model or started at another learning rate was continued as if it were this run's (the card then
    recorded the wrong base or rate)."""
    from smartcrop.finetune import FinetuneConfig, finetune
    from smartcrop.weights import load_model, sha256_file

    photos = sorted(clean_album.rglob("p*.jpg"))
    mine = sha256_file(small_model_file)
    ckpts = {}
    for name, lr, base in (("other", 5e-5, mine), ("fast", 1e-3, mine), ("elsewhere", 5e-5, "0" * 64)):
        ckpts[name] = tmp_path / f"{name}.ckpt"
        finetune(load_model(small_model_file), photos, FinetuneConfig(epochs=1, lr=lr), checkpoint=ckpts[name],
                 log=lambda s: None, progress=False, base=base)
    out = tmp_path / "m.safetensors"
    code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "1")
    assert code == 0, err
    made = out.read_bytes()
    for resume, words in ((ckpts["other"], "m.safetensors exists"), (ckpts["fast"], "learning rate 0.001, not 5e-05"),
                          (ckpts["elsewhere"], "its run fine-tuned another model")):
        code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "2",
                           "--resume", resume)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (resume, err)
        assert out.read_bytes() == made
    code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "2",
                       "--resume", ckpts["fast"], "--lr", "1e-3", "--force")
    assert code == 0, err


def test_a_photo_given_twice_counts_once_and_seeds_are_checked_before_any_work(tmp_path, small_model_file,
                                                                               monkeypatch):
    import smartcrop.cli

    photos = [draw_photo(tmp_path / "three" / f"t{k}.jpg", seed=k) for k in range(3)]
    (tmp_path / "three" / "link.jpg").symlink_to(photos[0])
    monkeypatch.setattr(smartcrop.cli, "_cropper", lambda *a: pytest.fail("the model was loaded first"))
    for given in ([photos[0], *photos], [tmp_path / "three", photos[1]]):
        code, _, err = cli("finetune", *given, "-o", tmp_path / "m.safetensors", "--weights", small_model_file)
        assert code == 2 and "only 3 usable photo" in err, err
    for seed in ("-1", str(2**32)):
        code, _, err = cli("finetune", tmp_path / "three", "-o", tmp_path / "m.safetensors", "--weights",
                           small_model_file, "--seed", seed)
        assert code == 2 and "--seed" in err, err
    assert not (tmp_path / "m.safetensors").exists()


def test_adapt_epochs_without_adapt_is_noted(tmp_path, small_model_file):
    p = draw_photo(tmp_path / "a.jpg")
    code, out, err = cli("run", p, "--ratio", "1:1", "--adapt-epochs", "5", "--dry-run", "--weights",
                         small_model_file)
    assert code == 0 and out
    assert err.strip() == "smartcrop: note: --adapt-epochs (the epochs of --adapt) changes nothing in this run"


def test_an_output_folder_where_no_file_can_be_made_is_refused_before_any_work(tmp_path, tiny_album,
                                                                              small_model_file, monkeypatch):
    """It failed with a traceback after the album was decoded and an epoch trained (simulated: as root, the
    permission bits would not stop the write)."""
    import errno

    import smartcrop.cli
    import smartcrop.plan

    def probe(folder):
        if Path(folder) == tmp_path / "ro":
            raise PermissionError(errno.EACCES, "Permission denied")

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(smartcrop.plan, "probe_writable", probe)
    monkeypatch.setattr(smartcrop.cli, "_cropper", lambda *a: pytest.fail("the model was loaded first"))
    for out in (tmp_path / "ro" / "m.safetensors", tmp_path / "ro" / "new" / "m.safetensors"):
        code, _, err = cli("finetune", tiny_album, "-o", out, "--weights", small_model_file)
        assert code == 2 and err.strip() == f"smartcrop: cannot write {out}: {tmp_path / 'ro'} is not writable " \
            "(Permission denied)", err
    assert list((tmp_path / "ro").iterdir()) == []


def test_ctrl_c_while_a_model_is_saved_never_leaves_it_beside_the_old_card(tmp_path, clean_album, small_model_file,
                                                                          monkeypatch):
    """The model and its card are two renames: a Ctrl-C between them left the new model beside the card of the
    one it replaced, and neither loaded again ("checksum mismatch")."""
    import os
    import signal

    import smartcrop.imageio as imageio
    from smartcrop.weights import load_model

    out = tmp_path / "m.safetensors"
    code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "1")
    assert code == 0, err
    real_write = imageio.write_atomic

    def write_atomic(path, data):
        real_write(path, data)
        if Path(path) == out:  # Ctrl-C just after the model is in place, before its card is
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(imageio, "write_atomic", write_atomic)
    # a suite started in the background inherits SIGINT ignored (Python keeps it so): Ctrl-C as a terminal's
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "1",
                           "--seed", "3", "--force")
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130 and "interrupted" in err, err
    load_model(out)  # model and card of one run


def test_a_second_run_writing_the_same_model_is_refused_while_one_runs(tmp_path, clean_album, small_model_file,
                                                                       monkeypatch):
    """Two finetunes (or trains) writing one --out at once both reported success: they shared OUT.ckpt and the
    later rename won."""
    import os

    import smartcrop.cli
    from smartcrop.training import output_lock

    out = tmp_path / "new" / "m.safetensors"
    lock = tmp_path / "new" / ".m.safetensors.lock"
    with monkeypatch.context() as m:
        m.setattr(smartcrop.cli, "_cropper", lambda *a: pytest.fail("the model was loaded"))
        with output_lock(out):  # another run holds it (a second open file description: flock says no)
            assert lock.read_text() == str(os.getpid())
            for o in (out, tmp_path / "new" / ".." / "new" / "m.safetensors"):
                code, _, err = cli("finetune", clean_album, "-o", o, "--weights", small_model_file)
                assert code == 2 and len(err.strip().splitlines()) == 1, err
                assert f"is being written by another smartcrop run (process {os.getpid()})" in err
            code, _, err = cli("train", "--unlabeled", clean_album, "-o", out)
            assert code == 2 and "being written by another smartcrop run" in err, err
        assert not (tmp_path / "new").exists()  # made for the lock, removed with it
        few = tmp_path / "few"
        for k in range(2):
            draw_photo(few / f"f{k}.jpg", seed=k)
        code, _, err = cli("finetune", few, "-o", tmp_path / "fresh" / "m.safetensors", "--weights", small_model_file)
        assert code == 2 and "only 2 usable photo" in err and not (tmp_path / "fresh").exists()
    lock.parent.mkdir()
    lock.write_text("12345")  # left by a killed run: its lock went with it
    code, _, err = cli("finetune", clean_album, "-o", out, "--weights", small_model_file, "--epochs", "1")
    assert code == 0, err
    assert sorted(os.listdir(out.parent)) == ["m.json", "m.safetensors"]


def test_resume_continues_only_a_run_on_the_same_photos(tmp_path, tiny_album, tiny_gaicd, small_model_file):
    """A checkpoint of a fine-tuning on another album was continued on this one; the card then named only this
    album."""
    from smartcrop.finetune import FinetuneConfig, finetune
    from smartcrop.training import run_sources
    from smartcrop.weights import load_model, read_card, sha256_file

    other = tmp_path / "other"
    photos = [draw_photo(other / f"o{k}.jpg", seed=50 + k) for k in range(4)]
    ckpt = tmp_path / "m.ckpt"
    finetune(load_model(small_model_file), photos, FinetuneConfig(epochs=1), checkpoint=ckpt, log=lambda s: None,
             progress=False, base=sha256_file(small_model_file), sources=run_sources(albums=[other], labeled=[]))
    out = tmp_path / "m.safetensors"
    for given, words in (([tiny_album], f"its run read other data (--albums was {other.resolve()})"),
                         ([other, "--labeled", tiny_gaicd], "its run read other data (--labeled was none)")):
        code, _, err = cli("finetune", *given, "-o", out, "--weights", small_model_file, "--epochs", "2",
                           "--resume", ckpt)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code, _, err = cli("finetune", tmp_path / "." / "other", "-o", out, "--weights", small_model_file, "--epochs",
                       "2", "--resume", ckpt)
    assert code == 0, err
    assert read_card(out)["finetune"]["history"][0]["epoch"] == 1  # continued, not started over


def test_small_output_and_data_names_are_read_as_meant(tmp_path, tiny_album, tiny_gaicd, small_model_file,
                                                       monkeypatch):
    """`-o Holiday.SAFETENSORS` became `Holiday.SAFETENSORS.safetensors` in the models folder; SMARTCROP_HOME=~/sc
    made a folder named `~`; --labeled data whose photos are missing was refused only after the model loaded;
    `eval gaicd --split ../x` read a folder outside ROOT/images."""
    import shutil

    import smartcrop.cli
    from smartcrop.weights import user_models_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SMARTCROP_HOME", "~/sc")
    assert user_models_dir() == tmp_path / "home" / "sc" / "models"
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("finetune", tiny_album, "-o", "Holiday.SAFETENSORS", "--weights", small_model_file)
    assert code == 2 and "must end in .safetensors" in err, err
    bare = tmp_path / "bare"
    shutil.copytree(tiny_gaicd / "annotations", bare / "annotations")
    (bare / "images" / "train").mkdir(parents=True)
    with monkeypatch.context() as m:
        m.setattr(smartcrop.cli, "_cropper", lambda *a: pytest.fail("the model was loaded"))
        code, _, err = cli("finetune", tiny_album, "-o", "m.safetensors", "--weights", small_model_file,
                           "--labeled", bare)
    *notes, last = err.strip().splitlines()  # the reader's note says why: 3 annotations have no photo
    assert code == 2 and "no labeled photos there" in last and [n for n in notes if "no image" in n], err
    odd = tmp_path / "odd"  # ROOT/images/../train and ROOT/annotations/../train both exist: it was read
    shutil.copytree(tiny_gaicd / "images" / "train", odd / "train")
    shutil.copytree(tiny_gaicd / "annotations" / "train", odd / "train", dirs_exist_ok=True)
    (odd / "images").mkdir()
    (odd / "annotations").mkdir()
    for split in ("../train", ".."):
        code, _, err = cli("eval", "gaicd", odd, "--split", split, "--weights", small_model_file)
        assert code == 2 and "is not a split name" in err and len(err.strip().splitlines()) == 1, (split, err)
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "home").exists()


def test_an_interrupt_before_a_runs_first_epoch_names_no_earlier_checkpoint(tmp_path, tiny_album,
                                                                            small_model_file, monkeypatch):
    """Started over with --force beside an earlier run's checkpoint and stopped before an epoch finished, it told
    the user to resume that other run; resumed with other settings (`--distill`), it went on with the
    checkpoint's optimizer while the card recorded the new ones."""
    import smartcrop.finetune as ft
    from smartcrop.finetune import FinetuneConfig, finetune
    from smartcrop.weights import load_model

    out = tmp_path / "m.safetensors"
    ckpt = out.with_suffix(".ckpt")
    finetune(load_model(small_model_file), sorted(tiny_album.rglob("p*.jpg")), FinetuneConfig(epochs=1),
             checkpoint=ckpt, log=lambda s: None, progress=False)
    code, _, err = cli("finetune", tiny_album, "-o", out, "--weights", small_model_file, "--epochs", "2",
                       "--resume", ckpt, "--distill", "0.5")
    assert code == 2 and "its run fine-tuned with distill=1.0, not 0.5" in err and len(err.strip().splitlines()) == 1

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft.Finetuner, "train_epoch", stop)
    code, _, err = cli("finetune", tiny_album, "-o", out, "--weights", small_model_file, "--force")
    assert code == 130 and err.strip().splitlines()[-1] == "smartcrop: interrupted: no epoch of this run had finished"
    code, _, err = cli("finetune", tiny_album, "-o", out, "--weights", small_model_file, "--epochs", "2",
                       "--resume", ckpt)  # where it goes on from is still that checkpoint: named
    assert code == 130 and err.strip().splitlines()[-1] == (f"smartcrop: interrupted: the last finished epoch is in "
                                                            f"{ckpt}: go on with --resume {ckpt}")


def test_a_full_disk_when_the_model_is_written_names_the_checkpoint_to_go_on_from(tmp_path, tiny_album,
                                                                                  small_model_file, monkeypatch):
    """It said only "the output disk is full", exit 2 (a usage error's), though every epoch was in OUT.ckpt."""
    import smartcrop.imageio as imageio

    real_write = imageio.write_atomic

    def write_atomic(path, data):
        if str(path).endswith(".safetensors"):
            raise imageio.OutputFullError(f"cannot write {path}: the output disk is full (No space left on device)")
        return real_write(path, data)

    monkeypatch.setattr(imageio, "write_atomic", write_atomic)
    out = tmp_path / "m.safetensors"
    ckpt = out.with_suffix(".ckpt")
    code, _, err = cli("finetune", tiny_album, "-o", out, "--weights", small_model_file, "--epochs", "1")
    assert code == 1 and not out.exists() and ckpt.is_file()
    assert err.strip().splitlines()[-1] == (f"smartcrop: cannot write {out}: the output disk is full (No space left "
                                            f"on device); the last finished epoch is in {ckpt}: go on with --resume "
                                            f"{ckpt}")
