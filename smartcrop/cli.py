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

    console = Console()
    console.print(title, style="bold")  # on its own line: a table title would wrap to the table's width
    t = Table()
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, float):
            t.add_row(k, f"{v:.2f}" if k in percent_keys else f"{v:.4f}")
        else:
            t.add_row(k, str(v))
    console.print(t)


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


@app.command()
def run(
    inputs: List[str] = typer.Argument(None, help="Photos and folders; '-' reads stdin: one image (result on "
                                       "stdout) or a list of paths, one per line."),
    ratio: List[str] = typer.Option([], "--ratio", help="Aspect ratio W:H (repeatable), or 'any' for the best "
                                    "crop of free ratio. Default: any (or the ratio of --size)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Walk folders recursively (sub-folders are "
                                   "mirrored in the output folder)."),
    from_file: Optional[str] = typer.Option(None, "--from-file", help="Read input paths from this file ('-': stdin)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: ./cropped; "
                                          "stdout for a single image read from stdin)."),
    name: Optional[str] = typer.Option(None, "--name", help="Output name template; fields {stem} {ratio} {ext} "
                                       "{rank} {w} {h} {name}. Default '{stem}_{ratio}.{ext}'."),
    size: Optional[str] = typer.Option(None, "--size", help="Resize each crop to exactly WxH, e.g. 1920x1080."),
    max_side: Optional[int] = typer.Option(None, "--max-side", min=1, help="Downscale crops so their longest "
                                           "side is at most N pixels."),
    top_k: int = typer.Option(1, "--top-k", min=1, max=20, help="Write the K best distinct crops per ratio."),
    quality: int = typer.Option(92, "--quality", min=1, max=100, help="JPEG/WebP quality."),
    out_format: Optional[str] = typer.Option(None, "--format", help="Output format: jpg, png, webp or tif "
                                             "(default: the input's)."),
    strip: bool = typer.Option(False, "--strip", help="Drop EXIF and ICC profile from the outputs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip crops whose output file exists."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per crop on stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compute and print the boxes; write no image."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write a contact sheet of every photo with its "
                                           "crops drawn to this image file."),
    weights: Optional[Path] = WEIGHTS_OPT,
    model: Optional[str] = MODEL_OPT,
    device: str = DEVICE_OPT,
    batch: int = typer.Option(1, "--batch", min=1, max=64, help="Photos scored per model pass (same-size photos "
                              "are batched)."),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, max=32, help="Decode/encode worker threads."),
    adapt: bool = typer.Option(False, "--adapt", help="First fine-tune a copy of the model on these very photos "
                               "(rank consistency), then crop with it. The shipped model is not changed."),
    adapt_epochs: int = typer.Option(2, "--adapt-epochs", min=1, help="Epochs of the --adapt fine-tune."),
):
    """Crop photos to the requested aspect ratios with the best-scoring crops."""
    from .runner import RunOptions, Runner, UsageError, collect_inputs, normalize_ratios, parse_size

    from .progress import stderr_is_tty

    if overwrite and skip_existing:
        fail("--overwrite and --skip-existing exclude each other")
    if not inputs and from_file is None:
        fail("no input: give photos or folders, '-' for stdin, or --from-file FILE")
    try:
        sz = parse_size(size)
        ratios = normalize_ratios(ratio, sz)
        fmt = None
        if out_format:
            fmt = out_format.lower().lstrip(".")
            fmt = {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
            if fmt not in {"jpg", "png", "webp", "tif"}:
                raise UsageError(f"--format must be jpg, png, webp or tif, not {out_format!r}")
        errors: list[str] = []
        items = collect_inputs(list(inputs or []), recursive, list_file=from_file,
                               on_error=lambda s: (errors.append(s), err(s)))
        stdin_image = any(it.path is None for it in items)
        if stdin_image and len(items) > 1:
            raise UsageError("a single image on stdin cannot be mixed with other inputs")
        if not items and not errors:
            raise UsageError("no image files found in the inputs" + ("" if recursive else " (use -r for sub-folders)"))
        if stdin_image and output is None:
            out_dir = None
            if as_json and not dry_run:
                raise UsageError("--json with an image on stdout: give -o DIR or --dry-run")
        else:
            out_dir = output or Path("cropped")
            if not dry_run:
                try:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    probe = out_dir / f".smartcrop-write-test-{__import__('os').getpid()}"
                    probe.touch()
                    probe.unlink()
                except OSError as e:
                    raise UsageError(f"{out_dir}: output folder is not writable ({e.strerror or e})") from None
        if preview is not None and preview.suffix.lower() not in {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff"}:
            raise UsageError("--preview must name a .jpg, .png, .webp or .tif file")
        opts = RunOptions(ratios=ratios, out_dir=out_dir, name_template=name, size=sz, max_side=max_side,
                          top_k=top_k, quality=quality, out_format=fmt, strip=strip, overwrite=overwrite,
                          skip_existing=skip_existing, dry_run=dry_run, workers=jobs, batch=batch, preview=preview)
        cropper = _cropper(weights, model, device)
        if adapt:
            from .finetune import AlbumError, adapt_cropper

            try:
                cropper = adapt_cropper(cropper, [it.path for it in items if it.path is not None], adapt_epochs,
                                        log=err)
            except AlbumError as e:
                raise UsageError(f"--adapt: {e}") from None

        def on_record(rec):
            if as_json:
                print(json.dumps(rec.to_json()), flush=True)
            elif dry_run:
                print(f"{rec.input}\t{rec.ratio}\t{' '.join(map(str, rec.box))}\t{rec.score:.3f}", flush=True)

        runner = Runner(cropper, opts, on_record=on_record, on_error=err)
        summary = runner.run(items)
    except UsageError as e:
        fail(str(e))
    except KeyboardInterrupt:
        err("interrupted: finished files are complete, nothing partial was left")
        raise typer.Exit(130)
    failed = summary.failed + len(errors)
    if stderr_is_tty():
        what = "boxes computed" if dry_run else "crops written"
        err(f"{summary.images} photos, {len(summary.records)} {what}"
            + (f", {summary.skipped} skipped (exist)" if summary.skipped else "")
            + (f", {failed} failed" if failed else "")
            + ("" if dry_run or out_dir is None else f" → {out_dir}"))
    raise typer.Exit(1 if failed else 0)


@app.command()
def finetune(
    albums: List[Path] = typer.Argument(..., help="Folders (recursive) or files of your own photos."),
    out: str = typer.Option(..., "--out", "-o", help="Output model: a .safetensors path, or a bare name to keep it "
                            "in your models folder (then usable as --model NAME)."),
    weights: Optional[Path] = WEIGHTS_OPT,
    model: Optional[str] = MODEL_OPT,
    epochs: int = typer.Option(3, "--epochs", min=1),
    lr: float = typer.Option(5e-5, "--lr"),
    labeled: Optional[Path] = typer.Option(None, "--labeled", help="GAICD- or FCDB-layout data to keep a labeled "
                                           "signal (instead of distillation to the base model)."),
    distill: float = typer.Option(1.0, "--distill", help="Weight of the anchoring term to the base model's scores."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Checkpoint (OUT.ckpt) to resume from."),
    device: str = DEVICE_OPT,
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output model."),
):
    """Adapt a model to your own photos with rank consistency (no labels needed)."""
    import shlex

    from .data import list_images
    from .finetune import AlbumError, FinetuneConfig
    from .finetune import finetune as run_finetune
    from .weights import WeightsError, save_model, user_models_dir, valid_model_name

    if out.endswith(".safetensors"):
        out_path = Path(out)
    elif valid_model_name(out) and "/" not in out:
        out_path = user_models_dir() / f"{out}.safetensors"
    else:
        fail(f"--out must be a .safetensors path or a model name (letters, digits, . _ -), not {out!r}")
    if out_path.exists() and not force and resume is None:
        fail(f"{out_path} exists: choose another name or pass --force")
    try:
        photos = list_images(albums, recursive=True)
    except OSError as e:
        fail(str(e))
    cropper = _cropper(weights, model, device)
    net = cropper.net
    base_path = cropper.path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out_path.with_suffix(".ckpt")
    cfg = FinetuneConfig(epochs=epochs, lr=lr, distill=distill, seed=seed)
    try:
        history = run_finetune(net, photos, cfg, labeled, ckpt, resume, cropper.device, log=err)
    except AlbumError as e:
        fail(str(e))
    except (OSError, ValueError) as e:
        fail(str(e))
    header = dict(getattr(net, "header", {}) or {})
    header.pop("config", None)
    header["finetune"] = {"base": str(base_path), "albums": [str(a) for a in albums], "photos": len(photos),
                          "labeled": str(labeled) if labeled else None, "config": cfg.__dict__,
                          "history": history,
                          "command": "smartcrop finetune " + " ".join(shlex.quote(a) for a in sys.argv[2:])}
    try:
        card = save_model(net, out_path, header)
    except WeightsError as e:
        fail(str(e))
    ckpt.unlink(missing_ok=True)
    err(f"saved {out_path} (sha256 {card['sha256'][:12]}…)"
        + (f"; use it with --model {out_path.stem}" if out_path.parent == user_models_dir() else ""))


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table.")):
    """List the shipped model and your fine-tuned models."""
    from .weights import list_models, user_models_dir

    rows = list_models()
    if as_json:
        for m in rows:
            card = m["card"] or {}
            print(json.dumps({"name": m["name"], "path": str(m["path"]), "shipped": m["shipped"],
                              "sha256": card.get("sha256"), "validation": card.get("validation")}))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"smartcrop models (yours live in {user_models_dir()})")
    for c in ("name", "kind", "file", "trained on"):
        t.add_column(c)
    for m in rows:
        card = m["card"] or {}
        what = "fine-tuned" if "finetune" in card else "trained"
        if "finetune" in card:
            src = f"{card['finetune'].get('photos', '?')} album photos"
        else:
            tr = card.get("training", {})
            src = ", ".join(f"{tr[k]} {label}" for k, label in (("n_gaicd", "scored"), ("n_fcdb", "expert crops"),
                                                                ("n_unlabeled", "unlabeled")) if tr.get(k))
        t.add_row(m["name"], "shipped" if m["shipped"] else what, str(m["path"]), src or "?")
    Console().print(t)
    if not rows:
        err("no model found: the shipped model is missing from weights/")


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
    backbone: str = typer.Option("mobilenet_v2", "--backbone",
                                 help="Backbone architecture (only mobilenet_v2 in this release)."),
    backbone_weights: Optional[Path] = typer.Option(None, "--backbone-weights", help="ImageNet weights of the "
                                                    "backbone (torchvision layout). Default: $SMARTCROP_BACKBONE, "
                                                    "../shared/weights, then torch.hub."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this smartcrop model instead."),
    epochs: int = typer.Option(5, "--epochs", min=1),
    lr: float = typer.Option(1e-4, "--lr"),
    lr_step: int = typer.Option(4, "--lr-step", help="Multiply the learning rate by 0.1 after this many epochs."),
    no_saf: bool = typer.Option(False, "--no-saf", help="Without the spatial-aware feature (the basic model)."),
    no_rc: bool = typer.Option(False, "--no-rc", help="Without the rank-consistency loss."),
    fcdb_weight: float = typer.Option(1.0, "--fcdb-weight", help="Weight of the FCDB ranking losses."),
    fcdb_per_epoch: int = typer.Option(400, "--fcdb-per-epoch", min=0, help="Random FCDB photos per epoch "
                                       "(0: all); GAICD photos are repeated to make up ~35% of the steps."),
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
                      fcdb_weight=fcdb_weight, fcdb_per_epoch=fcdb_per_epoch, frozen_layers=frozen_layers,
                      seed=seed)
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
