"""The ``smartcrop`` command line: a thin Typer layer over the library.

Heavy modules (torch, the model) are imported inside the commands so that ``smartcrop --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="smartcrop",
    help="Learned photo cropping: crop folders of photos to any aspect ratio with a SAC-Net crop scorer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Benchmark a model on GAICD (human scores) or FCDB (expert crops).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def err(msg: str) -> None:
    """One line on stderr."""
    print(f"smartcrop: {msg}", file=sys.stderr, flush=True)


def fail(msg: str, code: int = 2) -> None:
    err(msg)
    raise typer.Exit(code)


def _cropper(weights: Optional[Path], model: Optional[str], device: str):
    from .cropper import Cropper
    from .weights import WeightsError

    try:
        return Cropper(weights=weights, model=model, device=device)
    except (WeightsError, ValueError) as e:
        fail(str(e))


WEIGHTS_OPT = typer.Option(None, "--weights", "-w", help="Model file (.safetensors); default: the shipped model.")
MODEL_OPT = typer.Option(None, "--model", "-m", help="Name of one of your models (see `smartcrop models`).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")


def _print_table(title: str, metrics: dict, percent_keys: set) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, float):
            t.add_row(k, f"{v:.2f}" if k in percent_keys else f"{v:.4f}")
        else:
            t.add_row(k, str(v))
    Console().print(t)


@eval_app.command("gaicd")
def eval_gaicd(
    root: Path = typer.Argument(..., help="GAICD root (images/SPLIT/*.jpg, annotations/SPLIT/*.txt)."),
    split: str = typer.Option("test", "--split", help="Split name (dev, test, val, ...)."),
    weights: Optional[Path] = WEIGHTS_OPT,
    model: Optional[str] = MODEL_OPT,
    device: str = DEVICE_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    predictions: Optional[Path] = typer.Option(
        None, "--predictions", help="Write per-image scores (JSON lines, annotation order) to this file."),
):
    """SRCC, PCC and Acc K/N of the model's scores against GAICD's human scores."""
    from .data import read_gaicd
    from .evaluate import evaluate_gaicd

    try:
        items = read_gaicd(root, split)
    except (OSError, ValueError) as e:
        fail(str(e))
    if not items:
        fail(f"{root}: no annotated images in split {split!r}")
    cropper = _cropper(weights, model, device)
    errors: list[str] = []
    m = evaluate_gaicd(cropper, items, predictions, on_error=lambda s: (errors.append(s), err(s)))
    if as_json:
        print(json.dumps(m))
    else:
        _print_table(f"GAICD {split} ({m['n_images']} images) — {cropper.path}", m,
                     {k for k in m if k.startswith("acc")})
    raise typer.Exit(1 if errors else 0)


@eval_app.command("fcdb")
def eval_fcdb(
    root: Path = typer.Argument(..., help="FCDB root (images/, cropping_{training,testing}_set.json)."),
    split: str = typer.Option("test", "--split", help="test or train."),
    ratio: str = typer.Option("any", "--ratio", help="any: free GAIC anchors; gt: anchors of the expert's ratio."),
    weights: Optional[Path] = WEIGHTS_OPT,
    model: Optional[str] = MODEL_OPT,
    device: str = DEVICE_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
):
    """IoU and boundary displacement of the model's best crop against FCDB's expert crops."""
    from .data import read_fcdb
    from .evaluate import evaluate_fcdb

    if split not in {"test", "train"}:
        fail(f"--split must be test or train, not {split!r}")
    if ratio not in {"any", "gt"}:
        fail(f"--ratio must be any or gt, not {ratio!r}")
    try:
        items = read_fcdb(root, split)
    except (OSError, ValueError) as e:
        fail(str(e))
    if not items:
        fail(f"{root}: no usable images in split {split!r}")
    cropper = _cropper(weights, model, device)
    errors: list[str] = []
    m = evaluate_fcdb(cropper, items, ratio, on_error=lambda s: (errors.append(s), err(s)))
    if as_json:
        print(json.dumps(m))
    else:
        _print_table(f"FCDB {split}, ratio {ratio} ({m['n_images']} images) — {cropper.path}", m, set())
    raise typer.Exit(1 if errors else 0)


def _gaicd_spec(spec: str) -> tuple[Path, str]:
    """``ROOT[:SPLIT]`` → (root, split); the split defaults to ``train``."""
    root, sep, split = spec.rpartition(":")
    if sep and split and "/" not in split and "\\" not in split:
        return Path(root), split
    return Path(spec), "train"


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.safetensors); OUT.ckpt and "
                             "OUT.log.jsonl are written beside it."),
    gaicd: List[str] = typer.Option([], "--gaicd", help="GAICD-layout data with human scores: ROOT[:SPLIT] "
                                    "(split default train). Repeatable."),
    fcdb: List[Path] = typer.Option([], "--fcdb", help="FCDB-layout data (its training split). Repeatable."),
    unlabeled: List[Path] = typer.Option([], "--unlabeled", help="Folder of photos without labels, for rank "
                                         "consistency (recursive). Repeatable."),
    backbone: str = typer.Option("mobilenet_v2", "--backbone", help="Backbone architecture."),
    backbone_weights: Optional[Path] = typer.Option(None, "--backbone-weights", help="ImageNet weights of the "
                                                    "backbone (torchvision layout). Default: $SMARTCROP_BACKBONE, "
                                                    "../shared/weights, then torch.hub."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this smartcrop model instead."),
    epochs: int = typer.Option(8, "--epochs", min=1),
    lr: float = typer.Option(1e-4, "--lr"),
    lr_step: int = typer.Option(6, "--lr-step", help="Multiply the learning rate by 0.1 after this many epochs."),
    no_saf: bool = typer.Option(False, "--no-saf", help="Without the spatial-aware feature (the basic model)."),
    no_rc: bool = typer.Option(False, "--no-rc", help="Without the rank-consistency loss."),
    fcdb_weight: float = typer.Option(0.5, "--fcdb-weight", help="Weight of the FCDB ranking losses."),
    frozen_layers: Optional[int] = typer.Option(None, "--frozen-layers", min=0, max=19, help="Freeze (and cache) "
                                                "the first N backbone layers. Default: 14 on CPU, 0 on GPU."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", min=0.0, max=0.5, help="Share of the GAICD images "
                                       "(and half that of FCDB) held out for per-epoch validation."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Checkpoint (OUT.ckpt) to resume from."),
    device: str = DEVICE_OPT,
    seed: int = typer.Option(0, "--seed"),
):
    """Train a crop scorer: human scores, expert crops and rank consistency on unlabeled photos."""
    import shlex

    from .cropper import resolve_device
    from .data import list_images, read_fcdb, read_gaicd
    from .training import TrainConfig, TrainData, run_training, split_validation
    from .weights import WeightsError, load_backbone_weights, load_model

    if out.suffix != ".safetensors":
        fail("--out must end in .safetensors")
    try:
        dev = resolve_device(device)
    except ValueError as e:
        fail(str(e))
    data = TrainData()
    try:
        for spec in gaicd:
            root, split = _gaicd_spec(spec)
            data.gaicd += read_gaicd(root, split)
        for root in fcdb:
            data.fcdb += read_fcdb(root, "train")
        if unlabeled:
            data.unlabeled = list_images(unlabeled, recursive=True)
    except (OSError, ValueError) as e:
        fail(str(e))
    if not data.gaicd and not data.fcdb:
        fail("no labeled data: give --gaicd ROOT[:SPLIT] and/or --fcdb ROOT")
    data.gaicd, data.val_gaicd = split_validation(data.gaicd, val_fraction)
    data.fcdb, data.val_fcdb = split_validation(data.fcdb, val_fraction / 2)

    import torch

    from .model import ModelConfig, SACNet

    torch.manual_seed(seed)
    try:
        if init is not None:
            net = load_model(init)
            if net.config.saf == no_saf:
                fail("--init model and --no-saf disagree")
            source = f"init {init}"
        else:
            net = SACNet(ModelConfig(backbone=backbone, saf=not no_saf))
            source = load_backbone_weights(net, backbone_weights)
    except (WeightsError, ValueError) as e:
        fail(str(e))
    if frozen_layers is None:
        frozen_layers = 0 if dev != "cpu" else 14
    cfg = TrainConfig(epochs=epochs, lr=lr, lr_step=lr_step, saf=not no_saf, rc=not no_rc,
                      fcdb_weight=fcdb_weight, frozen_layers=frozen_layers, seed=seed)
    info = {
        "command": "smartcrop train " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "training": {"backbone_init": source, "gaicd": list(gaicd), "fcdb": [str(p) for p in fcdb],
                     "unlabeled": [str(p) for p in unlabeled],
                     "val_gaicd": [it.name for it in data.val_gaicd], "n_val_fcdb": len(data.val_fcdb)},
    }
    try:
        run_training(net, data, cfg, out, dev, resume, info, log=err)
    except ValueError as e:
        fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
