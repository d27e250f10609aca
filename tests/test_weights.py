"""Model files: safetensors + JSON header and card, checksums, safe loading, named models, the shipped model."""

import json
import os
import pickle
import stat

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import draw_photo  # noqa: E402
from smartcrop.weights import (WeightsError, load_backbone_weights, load_model, read_card, read_header,  # noqa: E402
                               resolve_model, save_model, sha256_file, shipped_model_path)


def scores(net, seed=1):
    torch.manual_seed(seed)
    x = torch.rand(1, 3, 64, 96) * 255
    boxes = torch.tensor([[0.0, 0.0, 96.0, 64.0], [10.0, 5.0, 70.0, 50.0], [30.0, 0.0, 96.0, 60.0]])
    with torch.no_grad():
        return net.score_boxes(net.image_features(x), boxes)


def test_round_trip_keeps_scores_header_and_card(tmp_path, small_model):
    p = tmp_path / "m.safetensors"
    card = save_model(small_model, p, {"training": {"data": "synthetic"}, "metrics": {"srcc": 0.5}})
    net = load_model(p)
    assert torch.equal(scores(net), scores(small_model))
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


def test_checksum_mismatch_and_foreign_files_are_refused(tmp_path, small_model):
    p = tmp_path / "m.safetensors"
    save_model(small_model, p)
    card = json.loads(p.with_suffix(".json").read_text())
    card["sha256"] = "0" * 64
    p.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="checksum"):
        load_model(p)
    assert load_model(p, verify=False) is not None

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
    with pytest.raises(WeightsError, match="cannot be read safely"):
        load_model(p)
    from smartcrop.model import ModelConfig, SACNet

    with pytest.raises(Exception):
        load_backbone_weights(SACNet(ModelConfig(short_side=64)), p)
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
