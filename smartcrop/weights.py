"""Model files: safetensors tensors + a JSON header, the shipped model, and the user's own models.

A model file ``NAME.safetensors`` stores the tensors of a :class:`~smartcrop.model.SACNet` and, in the
safetensors metadata under the key ``"smartcrop"``, a JSON header: architecture config (backbone, switches,
input normalisation), training data and command, and metrics.  Beside it, ``NAME.json`` is the model card: the
same header plus the file's sha256 and parameter count.  When a card is present its checksum is verified.

Nothing here unpickles: ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses to
execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

FORMAT = "smartcrop-sacnet"
FORMAT_VERSION = 1
SHIPPED_NAME = "sacnet_mobilenetv2"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class WeightsError(Exception):
    """A model file that cannot be used; the message is one line."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


# --------------------------------------------------------------------------------------------------------------
# where models live


def shipped_dir() -> Path:
    """The ``weights/`` folder: the source checkout's, else the copy packaged inside the installed wheel."""
    here = Path(__file__).resolve().parent
    repo = here.parent / "weights"
    if (repo / f"{SHIPPED_NAME}.safetensors").is_file():
        return repo
    try:
        from importlib.resources import files

        return Path(str(files("smartcrop._weights")))
    except (ModuleNotFoundError, TypeError):
        return repo


def shipped_model_path() -> Path | None:
    p = shipped_dir() / f"{SHIPPED_NAME}.safetensors"
    return p if p.is_file() else None


def user_models_dir() -> Path:
    """Per-user folder of fine-tuned models: ``$SMARTCROP_HOME/models`` or ``$XDG_DATA_HOME/smartcrop/models``."""
    if os.environ.get("SMARTCROP_HOME"):
        base = Path(os.environ["SMARTCROP_HOME"])
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "smartcrop"
    return base / "models"


def valid_model_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name not in {".", ".."}


def list_models() -> list[dict]:
    """The shipped model and the user's models: ``{"name", "path", "shipped", "card"}`` each."""
    out = []
    shipped = shipped_model_path()
    if shipped:
        out.append({"name": "default", "path": shipped, "shipped": True, "card": read_card(shipped)})
    d = user_models_dir()
    if d.is_dir():
        for p in sorted(d.glob("*.safetensors")):
            out.append({"name": p.stem, "path": p, "shipped": False, "card": read_card(p)})
    return out


def resolve_model(weights: str | os.PathLike | None = None, model: str | None = None) -> Path:
    """Path of the model to use: an explicit file, a named user model, or the shipped one."""
    if weights is not None and model is not None:
        raise WeightsError("give either --weights FILE or --model NAME, not both")
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise WeightsError(f"{p}: no such model file")
        return p
    if model is not None and model != "default":
        if not valid_model_name(model):
            raise WeightsError(f"bad model name {model!r}")
        p = user_models_dir() / f"{model}.safetensors"
        if not p.is_file():
            names = ", ".join(m["name"] for m in list_models()) or "none"
            raise WeightsError(f"no model named {model!r} in {user_models_dir()} (available: {names})")
        return p
    p = shipped_model_path()
    if p is None:
        raise WeightsError(
            "no shipped model in weights/ yet: train one with `smartcrop train` and pass it with --weights FILE"
        )
    return p


def read_card(path: str | os.PathLike) -> dict | None:
    c = card_path(path)
    if not c.is_file():
        return None
    try:
        return json.loads(c.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------------
# save / load


def save_model(model, path: str | os.PathLike, info: dict | None = None) -> dict:
    """Save ``model`` (a SACNet) as ``path`` (.safetensors) plus its card ``path.json``; returns the card."""
    from safetensors.torch import save

    from .imageio import write_atomic
    from .model import count_parameters

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: model files end in .safetensors")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    header.update(info or {})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"smartcrop": json.dumps(header, sort_keys=True)})
    write_atomic(path, data)
    card = dict(header)
    card["sha256"] = hashlib.sha256(data).hexdigest()
    card["parameters"] = count_parameters(model)
    card["file"] = path.name
    write_atomic(card_path(path), (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return card


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header stored in a smartcrop .safetensors file (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
    if "smartcrop" not in meta:
        raise WeightsError(f"{path}: not a smartcrop model (no smartcrop header)")
    try:
        header = json.loads(meta["smartcrop"])
    except ValueError:
        raise WeightsError(f"{path}: corrupt smartcrop header") from None
    if header.get("format") != FORMAT:
        raise WeightsError(f"{path}: unknown model format {header.get('format')!r}")
    return header


def load_model(path: str | os.PathLike | None = None, device: str = "cpu", verify: bool = True):
    """Load a SACNet from a smartcrop ``.safetensors`` file (or ``.pt`` state dict, safely) in eval mode."""
    import torch

    from .model import ModelConfig, SACNet

    path = Path(path) if path is not None else resolve_model()
    if not path.is_file():
        raise WeightsError(f"{path}: no such model file")
    if path.suffix in {".pt", ".pth", ".ckpt"}:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path}: cannot be read safely ({str(e).splitlines()[0][:200]})") from None
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        config = obj.get("config", {}) if isinstance(obj, dict) else {}
        if not isinstance(state, dict) or not any(str(k).startswith("backbone.") for k in state):
            raise WeightsError(f"{path}: not a smartcrop model state dict (a backbone? use --backbone-weights)")
        model = SACNet(ModelConfig.from_dict(config))
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    header = read_header(path)
    card = read_card(path)
    if verify and card and card.get("sha256"):
        digest = sha256_file(path)
        if digest != card["sha256"]:
            raise WeightsError(f"{path}: checksum mismatch with {card_path(path).name} (file corrupt or replaced)")
    from safetensors.torch import load_file

    model = SACNet(ModelConfig.from_dict(header.get("config", {})))
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: tensors do not match the architecture (missing {len(missing)}, unexpected {len(unexpected)})"
        )
    model.header = header
    model.source_path = path
    return model.to(device).eval()


def load_backbone_weights(model, path: str | os.PathLike | None = None) -> str:
    """Initialise ``model.backbone`` from ImageNet weights; returns a description of the source.

    ``path``: a torchvision-layout MobileNetV2 ``state_dict`` (.pth/.pt via ``weights_only`` or .safetensors).
    Without a path: ``$SMARTCROP_BACKBONE``, then ``../shared/weights/mobilenet_v2_imagenet.pth`` next to a
    source checkout, then torchvision's published weights through ``torch.hub`` (needs internet).
    """
    import torch

    candidates = []
    if path is not None:
        candidates.append(Path(path))
    else:
        if os.environ.get("SMARTCROP_BACKBONE"):
            candidates.append(Path(os.environ["SMARTCROP_BACKBONE"]))
        candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth")
    for p in candidates:
        if p.is_file():
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(p))
            else:
                state = torch.load(p, map_location="cpu", weights_only=True)
            model.backbone.load_state_dict(state, strict=True)
            return str(p)
        if path is not None:
            raise WeightsError(f"{p}: no such backbone weights file")
    url = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as e:
        raise WeightsError(
            "no ImageNet backbone weights found: pass --backbone-weights FILE (a torchvision-layout MobileNetV2 "
            f"state_dict, e.g. ../shared/weights/mobilenet_v2_imagenet.pth) or set SMARTCROP_BACKBONE "
            f"(download from torch.hub failed: {str(e).splitlines()[0][:120]})"
        ) from None
    model.backbone.load_state_dict(state, strict=True)
    # torchvision's weights expect ImageNet mean/std normalisation
    model.config.mean = [123.675, 116.28, 103.53]
    model.config.std = [58.395, 57.12, 57.375]
    model.mean.copy_(torch.tensor(model.config.mean).view(1, 3, 1, 1))
    model.std.copy_(torch.tensor(model.config.std).view(1, 3, 1, 1))
    return url
