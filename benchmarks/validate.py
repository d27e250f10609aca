"""Validation protocol: 5 GAICD folds x seeds, FCDB dev half and a held-out slice of FCDB train.

One command trains and evaluates every (variant, fold, seed) run through the ``smartcrop`` command line only
(``smartcrop train``, ``smartcrop eval gaicd --json``, ``smartcrop eval fcdb --json``), one JSON file per run;
running it again skips the runs that have a result, and resumes a run interrupted during training from its
checkpoint.  A second command prints the summary table and the paired comparison against a reference::

    # the shipped recipe, 5 folds x 2 seeds = 10 runs (about 6-10 min each on 2 CPU cores)
    python benchmarks/validate.py
    # the same plus a variant (extra `smartcrop train` arguments after NAME=); the baseline runs are reused
    # ("{fold}" and "{seed}" in them are replaced by each run's, e.g. for fold-specific --teacher models)
    python benchmarks/validate.py --variant baseline= --variant "nofcdb=--fcdb-weight 0"
    # Markdown tables: per variant mean ± sd over runs, and each variant minus the reference, paired
    python benchmarks/validate.py --summary [--reference baseline] [--summary-out runs/validate/summary.md]

Long runs: ``nohup nice -n 19 python benchmarks/validate.py > runs/validate/log.txt 2>&1 &``.

The protocol (fixed; written to ``WORK/protocol.json`` and checked on every start):

- GAICD folds: the annotated GAICD dev images sorted by name; fold k (0..4) holds out every 5th image starting
  at k (20 images) and trains on the other 80.  Each fold is a GAICD-layout root of symlinks,
  ``WORK/data/gaicd_foldK/{images,annotations}/{train,val}/``, used as ``--gaicd ROOT:train`` and
  ``eval gaicd ROOT --split val``.
- FCDB held-out train slice: the FCDB training list sorted by ``flickr_photo_id``, every 10th entry starting at
  the first (134 of 1,338 photos; the same for every run).  ``WORK/data/fcdb_heldout/`` is an FCDB-layout root
  (``images`` is a symlink to the real folder) whose ``cropping_training_set.json`` is FCDB train without the
  slice (used as ``--fcdb ROOT``) and whose ``cropping_testing_set.json`` is the slice.
- Each run trains the shipped recipe (docs/results.md): ``smartcrop train --gaicd FOLD:train --fcdb
  FCDB_HELDOUT --unlabeled DATA/unlabeled --unlabeled DATA/gaicd/images/holdout --val-fraction 0
  --backbone-weights W --seed S`` (``--backbone-weights W`` left out when the variant names ``--backbone`` or
  its own weights) + ``--train-args`` (all variants) + the variant's own arguments, and is then
  evaluated on the fold's 20 held-out GAICD images, on the real FCDB test split (the "dev half", 167 photos)
  and on the held-out FCDB train slice, each FCDB set with ``--ratio any`` and ``--ratio gt``.
- Code: by default the runs use a snapshot of the committed ``smartcrop/`` package at HEAD
  (``WORK/code/SHA/``, put first on PYTHONPATH, run as ``python -m smartcrop.cli``), so that edits in the
  working tree during a long run cannot change what is measured; ``--code REV`` pins another commit, ``--code
  live`` uses the working tree.  A variant keeps the commit of its first run: resuming it later uses the same code.

Files (WORK = ``--work``, default ``runs/validate``; VARIANT/foldK_seedS names one run)::

    WORK/protocol.json                      the fixed definition above (folds, FCDB slice ids, recipe)
    WORK/variants.json                      variant name -> {"args": [...], "code": SHA}
    WORK/results/VARIANT/foldK_seedS.json   the run's result (written atomically, last): see below
    WORK/results/VARIANT/foldK_seedS.gaicd_pred.jsonl   per-image scores of the held-out GAICD images
    WORK/runs/VARIANT/foldK_seedS/          model.safetensors (deleted after evaluation unless --keep-models),
                                            model.log.jsonl (per-epoch training log), train.log, eval_*.log

A result file holds ``variant``, ``variant_args``, ``fold``, ``seed``, ``code`` (commit, snapshot or live),
``train`` (command, seconds, seconds per epoch, resumed or not), ``gaicd_val`` (``eval gaicd --json``:
n_images, srcc, pcc, acc1_5..acc4_5, acc1_10..acc4_10, acc5, acc10), ``gaicd_val_images``, ``fcdb_dev_any``,
``fcdb_dev_gt``, ``fcdb_heldout_any``, ``fcdb_heldout_gt`` (``eval fcdb --json``: n_images, iou, disp),
``eval_seconds``, ``wall_seconds``, ``finished``.

Summary rules:

- "mean ± sd" is over runs (folds x seeds; sd with n-1), so it contains both the image-sample spread of the
  20-image folds and the seed spread.  "pooled" is, per seed with every fold done, the image-weighted mean over
  the folds (all 100 GAICD dev images, each scored by a model that did not train on it); its ± is the sd over
  seeds (training noise only).
- "low" = mean - sd over runs: the conservative estimate to hold against a target (3-fold means once overshot
  the hidden test set by 0.035 SRCC, about one run-sd).
- Paired comparison: for each (fold, seed) done by both a variant and the reference, d = variant - reference;
  reported as mean(d) ± sd(d) over the pairs with the number of pairs won.  A difference is "beyond spread"
  only if |mean(d)| > sd(d) with at least 4 pairs (with 10 pairs that is a paired t above 3.2);
  otherwise it is "within spread" and does not count as a win or a loss.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_VERSION = 1
N_FOLDS = 5
FCDB_EVERY = 10  # held-out FCDB train slice: every 10th entry by flickr_photo_id, starting at the first
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
GAICD_SUFFIXES = {".jpg", ".jpeg", ".png"}
FCDB_SETS = {  # result key -> (which root, ratio)
    "fcdb_dev_any": ("dev", "any"), "fcdb_dev_gt": ("dev", "gt"),
    "fcdb_heldout_any": ("heldout", "any"), "fcdb_heldout_gt": ("heldout", "gt"),
}


def log(msg: str) -> None:
    stamp = _dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", flush=True)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ data roots


def gaicd_dev_names(data: Path) -> list[tuple[str, Path, Path]]:
    """(stem, image, annotation) of the annotated GAICD dev images, sorted by name (as ``read_gaicd`` does)."""
    img_dir, ann_dir = data / "gaicd" / "images" / "dev", data / "gaicd" / "annotations" / "dev"
    images = sorted((p for p in img_dir.iterdir() if p.suffix.lower() in GAICD_SUFFIXES
                     and not p.name.startswith(".") and p.is_file()), key=lambda p: (p.stem, p.name))
    out = []
    for img in images:
        ann = ann_dir / f"{img.stem}.txt"
        if ann.is_file():
            out.append((img.stem, img.resolve(), ann.resolve()))
    return out


def folds_of(names: list) -> list[list]:
    return [names[k::N_FOLDS] for k in range(N_FOLDS)]


def fcdb_slice(data: Path) -> tuple[list, list]:
    """(train entries without the slice, in list order; the slice, by photo id)."""
    entries = json.loads((data / "fcdb" / "cropping_training_set.json").read_text())
    by_id = sorted(entries, key=lambda e: int(e["flickr_photo_id"]))
    held_ids = {int(e["flickr_photo_id"]) for e in by_id[::FCDB_EVERY]}
    keep = [e for e in entries if int(e["flickr_photo_id"]) not in held_ids]
    held = [e for e in by_id if int(e["flickr_photo_id"]) in held_ids]
    return keep, held


def ensure_root(root: Path, manifest: dict, build) -> None:
    """Keep ``root`` if its manifest matches, else rebuild it from scratch (manifest written last)."""
    mf = root / "manifest.json"
    if mf.is_file():
        try:
            if read_json(mf) == manifest:
                return
        except ValueError:
            pass
    if root.is_symlink() or root.is_file():
        root.unlink()
    elif root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    build(root)
    write_json(mf, manifest)


def build_gaicd_fold(root: Path, fold: int, items: list) -> None:
    val = set(it[0] for it in folds_of(items)[fold])
    for stem, img, ann in items:
        split = "val" if stem in val else "train"
        for kind, src in (("images", img), ("annotations", ann)):
            d = root / kind / split
            d.mkdir(parents=True, exist_ok=True)
            (d / src.name).symlink_to(src)


def build_fcdb_heldout(root: Path, data: Path, keep: list, held: list) -> None:
    (root / "images").symlink_to((data / "fcdb" / "images").resolve(), target_is_directory=True)
    write_json(root / "cropping_training_set.json", keep)
    write_json(root / "cropping_testing_set.json", held)


def prepare_data(args, work: Path) -> dict:
    items = gaicd_dev_names(args.data)
    if len(items) < N_FOLDS * 2:
        sys.exit(f"validate.py: only {len(items)} annotated GAICD dev images under {args.data}")
    fold_names = [[it[0] for it in f] for f in folds_of(items)]
    for k in range(N_FOLDS):
        ensure_root(work / "data" / f"gaicd_fold{k}",
                    {"protocol": PROTOCOL_VERSION, "fold": k, "val": fold_names[k],
                     "source": str(args.data.resolve() / "gaicd")},
                    lambda r, k=k: build_gaicd_fold(r, k, items))
    keep, held = fcdb_slice(args.data)
    held_ids = [int(e["flickr_photo_id"]) for e in held]
    ensure_root(work / "data" / "fcdb_heldout",
                {"protocol": PROTOCOL_VERSION, "every": FCDB_EVERY, "heldout_ids": held_ids,
                 "n_train": len(keep), "source": str(args.data.resolve() / "fcdb")},
                lambda r: build_fcdb_heldout(r, args.data, keep, held))
    return {"protocol": PROTOCOL_VERSION, "data": str(args.data.resolve()),
            "gaicd_folds": {"rule": f"GAICD dev annotated images sorted by name; fold k = names[k::{N_FOLDS}]",
                            "val": fold_names},
            "fcdb_heldout": {"rule": f"FCDB train sorted by flickr_photo_id; every {FCDB_EVERY}th from the first",
                             "n_heldout": len(held), "n_train": len(keep), "ids": held_ids},
            "recipe": {"unlabeled": [str(p) for p in args.unlabeled], "val_fraction": 0,
                       "backbone_weights": str(args.backbone_weights), "train_args": args.train_args_list,
                       "device": args.device}}


# ------------------------------------------------------------------------------------------------ code


def git(*a: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *a], check=True, capture_output=True, text=True).stdout.strip()


def resolve_code(rev: str) -> str:
    if rev == "live":
        return "live"
    try:
        return git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"validate.py: --code {rev!r} is not a commit of {REPO}")


def code_env(work: Path, code: str) -> tuple[list[str], dict, dict]:
    """(command prefix for the CLI, environment, description) for a snapshot commit or the live tree."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if code == "live":
        try:
            rev, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--", "smartcrop"))
        except (OSError, subprocess.CalledProcessError):  # a copy of the tree without git (e.g. a lent machine)
            rev = dirty = None
        return [sys.executable, "-m", "smartcrop.cli"], env, {"source": "live", "rev": rev, "dirty": dirty}
    snap = work / "code" / code
    if not (snap / "smartcrop" / "cli.py").is_file():
        tmp = work / "code" / f".{code}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", code, "smartcrop"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        shutil.rmtree(snap, ignore_errors=True)
        os.replace(tmp, snap)
    env["PYTHONPATH"] = str(snap.resolve()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    where = subprocess.run([sys.executable, "-c", "import smartcrop; print(smartcrop.__file__)"], env=env,
                           cwd=str(work), capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(snap.resolve()):
        sys.exit(f"validate.py: the code snapshot {snap} is shadowed (smartcrop imports from {where!r})")
    return [sys.executable, "-m", "smartcrop.cli"], env, {"source": "snapshot", "rev": code, "dirty": False}


# ------------------------------------------------------------------------------------------------ running

_child: subprocess.Popen | None = None


def _on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_cmd(cmd: list[str], env: dict, log_path: Path) -> tuple[int, str]:
    """Run ``cmd`` with stderr to ``log_path``; return (exit status, stdout). The child dies with us.

    It runs in the log's folder, not in the repository: ``python -m`` puts its working folder first on
    sys.path, which would shadow the code snapshot with the working tree."""
    global _child
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as errf:
        errf.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        errf.flush()
        _child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, env=env, cwd=str(log_path.parent),
                                  text=True)
        try:
            out, _ = _child.communicate()
        except BaseException:
            _child.terminate()
            try:
                _child.wait(30)
            except subprocess.TimeoutExpired:
                _child.kill()
            raise
        finally:
            rc = _child.returncode
            _child = None
    return rc, out


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line on stdout")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def do_run(args, work: Path, variant: str, vargs: list[str], code: str, fold: int, seed: int) -> dict | None:
    tag = f"fold{fold}_seed{seed}"
    # "{fold}" / "{seed}" in a variant's arguments name this run's (e.g. --teacher .../fold{fold}_seed1/...)
    vargs = [a.replace("{fold}", str(fold)).replace("{seed}", str(seed)) for a in vargs]
    res_path = work / "results" / variant / f"{tag}.json"
    run_dir = work / "runs" / variant / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix, env, code_info = code_env(work, code)
    model = run_dir / "model.safetensors"
    ckpt, train_log_jsonl = model.with_suffix(".ckpt"), model.with_suffix(".log.jsonl")
    fold_root = work / "data" / f"gaicd_fold{fold}"
    fcdb_root = work / "data" / "fcdb_heldout"
    t_start = time.time()

    train_cmd = prefix + ["train", "--gaicd", f"{fold_root.resolve()}:train", "--fcdb", str(fcdb_root.resolve())]
    for u in args.unlabeled:
        train_cmd += ["--unlabeled", str(u.resolve())]
    train_cmd += ["--val-fraction", "0"]
    if not any(a == "--backbone" or a.startswith(("--backbone=", "--backbone-weights")) for a in vargs):
        # the MobileNetV2 weights; a variant choosing another backbone takes that backbone's default weights
        train_cmd += ["--backbone-weights", str(args.backbone_weights.resolve())]
    train_cmd += ["--device", args.device, "--seed", str(seed), "--out", str(model.resolve())]
    train_cmd += args.train_args_list + vargs
    resumed = False
    train_s = None
    if model.is_file() and model.with_suffix(".json").is_file():
        log(f"{variant} {tag}: model exists, evaluating it")
    else:
        if ckpt.is_file():
            resumed = True
            cmd = train_cmd + ["--resume", str(ckpt.resolve())]
            log(f"{variant} {tag}: resuming training from {ckpt}")
        else:  # a fresh start: this folder's leftovers of an unfinished run go (`train` refuses to replace them)
            train_log_jsonl.unlink(missing_ok=True)
            model.unlink(missing_ok=True)
            cmd = train_cmd
            log(f"{variant} {tag}: training")
        t0 = time.time()
        rc, _ = run_cmd(cmd, env, run_dir / "train.log")
        train_s = time.time() - t0
        if rc != 0 or not model.is_file():
            log(f"{variant} {tag}: training FAILED (exit {rc}); last lines of {run_dir / 'train.log'}:\n"
                + tail(run_dir / "train.log"))
            return None
        ckpt.unlink(missing_ok=True)
        log(f"{variant} {tag}: trained in {train_s:.0f} s")

    per_epoch, prep_s, n_train = [], None, {}
    with contextlib.suppress(OSError, ValueError):
        for line in train_log_jsonl.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "start":
                prep_s = rec.get("prepare_seconds")
                n_train = {k: rec.get(k) for k in ("n_gaicd", "n_fcdb", "n_unlabeled")}
            elif "seconds" in rec:
                per_epoch.append(rec["seconds"])

    t0 = time.time()
    ev_common = ["--weights", str(model.resolve()), "--device", args.device, "--json"]
    pred_path = work / "results" / variant / f"{tag}.gaicd_pred.jsonl"
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    evals = {"gaicd_val": prefix + ["eval", "gaicd", str(fold_root.resolve()), "--split", "val",
                                    "--predictions", str(pred_path.resolve())] + ev_common}
    roots = {"dev": (args.data / "fcdb").resolve(), "heldout": fcdb_root.resolve()}
    for key, (which, ratio) in FCDB_SETS.items():
        evals[key] = prefix + ["eval", "fcdb", str(roots[which]), "--split", "test", "--ratio", ratio] + ev_common
    result = {}
    for key, cmd in evals.items():
        rc, out = run_cmd(cmd, env, run_dir / f"eval_{key}.log")
        try:
            result[key] = last_json(out)
        except ValueError:
            result[key] = None
        if rc != 0 or result[key] is None:
            log(f"{variant} {tag}: eval {key} FAILED (exit {rc}); last lines of {run_dir / f'eval_{key}.log'}:\n"
                + tail(run_dir / f"eval_{key}.log"))
            return None
    eval_s = time.time() - t0

    fold_manifest = read_json(fold_root / "manifest.json")
    out = {
        "protocol": PROTOCOL_VERSION, "variant": variant, "variant_args": vargs, "fold": fold, "seed": seed,
        "code": code_info,
        "train": {"command": train_cmd, "seconds": None if train_s is None else round(train_s, 1),
                  "resumed": resumed, "prepare_seconds": prep_s, "seconds_per_epoch": per_epoch, **n_train},
        "gaicd_val": result["gaicd_val"], "gaicd_val_images": fold_manifest["val"],
        **{k: result[k] for k in FCDB_SETS},
        "eval_seconds": round(eval_s, 1), "wall_seconds": round(time.time() - t_start, 1),
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "host": socket.gethostname(),
    }
    write_json(res_path, out)
    if not args.keep_models:
        for p in (model, model.with_suffix(".json")):
            p.unlink(missing_ok=True)
    g = out["gaicd_val"]
    log(f"{variant} {tag}: done in {out['wall_seconds']:.0f} s: GAICD SRCC {g['srcc']:.3f} Acc5 {g['acc5']:.1f} "
        f"Acc10 {g['acc10']:.1f}; FCDB dev any/gt {out['fcdb_dev_any']['iou']:.3f}/{out['fcdb_dev_gt']['iou']:.3f}; "
        f"held-out any/gt {out['fcdb_heldout_any']['iou']:.3f}/{out['fcdb_heldout_gt']['iou']:.3f}")
    return out


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs or ["baseline="]:
        name, sep, rest = spec.partition("=")
        name = name.strip()
        if not sep or not NAME_RE.match(name):
            sys.exit(f"validate.py: --variant must be NAME=ARGS (NAME of letters, digits, . _ + -), not {spec!r}")
        if name in out:
            sys.exit(f"validate.py: variant {name!r} given twice")
        out[name] = shlex.split(rest)
    return out


def parse_ints(s: str, what: str) -> list[int]:
    try:
        out = []
        for part in s.split(","):
            a, sep, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
        return out
    except ValueError:
        sys.exit(f"validate.py: --{what} must be a list like 0,1 or 0-4, not {s!r}")


def cmd_run(args) -> int:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    import fcntl

    lock = open(work / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"validate.py: another validate.py is running on {work} (lock {work / '.lock'})")
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    folds = parse_ints(args.folds, "folds")
    seeds = parse_ints(args.seeds, "seeds")
    if any(not 0 <= f < N_FOLDS for f in folds):
        sys.exit(f"validate.py: folds are 0..{N_FOLDS - 1}")
    variants = parse_variants(args.variant)
    for p in [args.backbone_weights, *args.unlabeled, args.data / "fcdb" / "cropping_testing_set.json"]:
        if not p.exists():
            sys.exit(f"validate.py: {p}: not found")

    protocol = prepare_data(args, work)
    pf = work / "protocol.json"
    if pf.is_file():
        old = read_json(pf)
        if old != protocol:
            diff = sorted(k for k in set(old) | set(protocol) if old.get(k) != protocol.get(k))
            sys.exit(f"validate.py: {pf} differs from this invocation in {diff}: its results were made under "
                     f"another protocol; use another --work folder (or delete that one)")
    else:
        write_json(pf, protocol)

    vf = work / "variants.json"
    registry = read_json(vf) if vf.is_file() else {}
    codes = {}
    for name, vargs in variants.items():
        reg = registry.get(name)
        if reg is not None and reg["args"] != vargs:
            sys.exit(f"validate.py: variant {name!r} was run with arguments {reg['args']}, not {vargs}: "
                     f"give the new arguments another name")
        if reg is not None and args.code is None:
            codes[name] = reg["code"]
        else:
            codes[name] = resolve_code(args.code or "HEAD")
            if reg is not None and reg["code"] != codes[name]:
                sys.exit(f"validate.py: variant {name!r} was run with code {reg['code']}, not {codes[name]}: "
                         f"give it another name, or drop --code to keep its code")
        registry[name] = {"args": vargs, "code": codes[name]}

    plan = [(v, f, s) for s in seeds for f in folds for v in variants]
    todo = [(v, f, s) for v, f, s in plan if not (work / "results" / v / f"fold{f}_seed{s}.json").is_file()]
    log(f"{len(plan)} runs planned ({len(variants)} variants x folds {folds} x seeds {seeds}), "
        f"{len(plan) - len(todo)} already done, {len(todo)} to do; work folder {work}")
    for v in variants:
        log(f"variant {v}: smartcrop train ... {' '.join(shlex.quote(a) for a in args.train_args_list + variants[v])}"
            f" (code {codes[v]})")
    if args.dry_run:
        for v, f, s in todo:
            print(f"would run {v} fold{f}_seed{s}")
        return 0
    write_json(vf, registry)
    if args.max_runs is not None:
        todo = todo[:args.max_runs]
    failed = 0
    try:
        for i, (v, f, s) in enumerate(todo):
            log(f"--- run {i + 1}/{len(todo)}: {v} fold {f} seed {s}")
            if do_run(args, work, v, variants[v], codes[v], f, s) is None:
                failed += 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}): finished runs are kept; run the same command again to go on")
        return 130
    log(f"finished: {len(todo) - failed} runs done, {failed} failed")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ summary

METRICS = [  # (label, getter, decimals)
    ("SRCC", ("gaicd_val", "srcc"), 3), ("PCC", ("gaicd_val", "pcc"), 3),
    ("Acc1/5", ("gaicd_val", "acc1_5"), 1), ("Acc5", ("gaicd_val", "acc5"), 1),
    ("Acc1/10", ("gaicd_val", "acc1_10"), 1), ("Acc10", ("gaicd_val", "acc10"), 1),
    ("FCDB dev any", ("fcdb_dev_any", "iou"), 3), ("FCDB dev gt", ("fcdb_dev_gt", "iou"), 3),
    ("FCDB held-out any", ("fcdb_heldout_any", "iou"), 3), ("FCDB held-out gt", ("fcdb_heldout_gt", "iou"), 3),
]
GAICD_POOLED = [m for m in METRICS if m[1][0] == "gaicd_val"]


def get(r: dict, path) -> float:
    v = r
    for k in path:
        v = v[k]
    return float(v)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if not n:
        return math.nan, math.nan
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return m, sd


def fmt(m: float, sd: float, d: int, signed: bool = False) -> str:
    if math.isnan(m):
        return "–"
    s = f"{m:+.{d}f}" if signed else f"{m:.{d}f}"
    return s + ("" if math.isnan(sd) else f" ± {sd:.{d}f}")


def load_results(work: Path) -> dict[str, dict[tuple[int, int], dict]]:
    out: dict[str, dict] = {}
    for p in sorted((work / "results").glob("*/fold*_seed*.json")):
        r = read_json(p)
        out.setdefault(r["variant"], {})[(r["fold"], r["seed"])] = r
    return out


def summary(args) -> str:
    work = args.work
    res = load_results(work)
    if not res:
        sys.exit(f"validate.py: no results under {work / 'results'}")
    registry = read_json(work / "variants.json") if (work / "variants.json").is_file() else {}
    proto = read_json(work / "protocol.json") if (work / "protocol.json").is_file() else {}
    order = [v for v in registry if v in res] + sorted(v for v in res if v not in registry)
    ref = args.reference or ("baseline" if "baseline" in res else order[0])
    if ref not in res:
        sys.exit(f"validate.py: no results for reference variant {ref!r} (have {', '.join(order)})")
    L = []
    fh = proto.get("fcdb_heldout", {})
    L.append(f"Protocol v{proto.get('protocol', '?')}: GAICD dev, {N_FOLDS} folds of 20 held-out images "
             f"(every {N_FOLDS}th by name); FCDB dev = FCDB test split (167 photos); FCDB held-out = "
             f"{fh.get('n_heldout', '?')} photos of FCDB train (every {FCDB_EVERY}th by photo id), not trained on. "
             "Extra `smartcrop train` args for every variant: "
             + (f"`{' '.join(proto.get('recipe', {}).get('train_args', []))}`."
                if proto.get("recipe", {}).get("train_args") else "none (the shipped recipe)."))
    L.append("")
    L.append("Mean ± sd over runs (folds × seeds); `low` = mean − sd.")
    L.append("")
    heads = ["variant", "runs", "folds × seeds"] + [m[0] for m in METRICS] + ["SRCC low", "Acc5 low", "Acc10 low",
                                                                               "min/run"]
    L.append("| " + " | ".join(heads) + " |")
    L.append("|" + "---|" * len(heads))
    for v in order:
        runs = list(res[v].values())
        folds = sorted({f for f, _ in res[v]})
        seeds = sorted({s for _, s in res[v]})
        row = [v + (" (ref)" if v == ref else ""), str(len(runs)),
               f"{','.join(map(str, folds))} × {','.join(map(str, seeds))}"]
        stats = {}
        for label, path, d in METRICS:
            stats[label] = mean_sd([get(r, path) for r in runs])
            row.append(fmt(*stats[label], d))
        for label, d in (("SRCC", 3), ("Acc5", 1), ("Acc10", 1)):
            m, sd = stats[label]
            row.append("–" if math.isnan(sd) else f"{m - sd:.{d}f}")
        walls = [r["wall_seconds"] for r in runs if r.get("wall_seconds")]
        row.append(f"{sum(walls) / len(walls) / 60:.1f}" if walls else "–")
        L.append("| " + " | ".join(row) + " |")

    L.append("")
    L.append("GAICD pooled over the 100 dev images (per seed with all 5 folds done: image-weighted mean of the folds); "
             "± = sd over seeds.")
    L.append("")
    heads = ["variant", "seeds"] + [m[0] for m in GAICD_POOLED]
    L.append("| " + " | ".join(heads) + " |")
    L.append("|" + "---|" * len(heads))
    for v in order:
        per_seed = {}
        for s in sorted({s for _, s in res[v]}):
            rs = [res[v].get((f, s)) for f in range(N_FOLDS)]
            if all(rs):
                w = [r["gaicd_val"]["n_images"] for r in rs]
                per_seed[s] = {lab: sum(get(r, p) * n for r, n in zip(rs, w)) / sum(w) for lab, p, _ in GAICD_POOLED}
        row = [v, ",".join(map(str, per_seed)) or "none complete"]
        for lab, _, d in GAICD_POOLED:
            row.append(fmt(*mean_sd([ps[lab] for ps in per_seed.values()]), d))
        L.append("| " + " | ".join(row) + " |")

    L.append("")
    L.append("Per fold (mean over seeds) of the reference: SRCC / Acc5 / Acc10 / FCDB held-out any.")
    L.append("")
    L.append("| fold | seeds | SRCC | Acc5 | Acc10 | FCDB held-out any |")
    L.append("|---|---|---|---|---|---|")
    for f in sorted({f for f, _ in res[ref]}):
        rs = [r for (ff, _), r in res[ref].items() if ff == f]
        L.append(f"| {f} | {len(rs)} | " + " | ".join(
            fmt(*mean_sd([get(r, p) for r in rs]), d) for p, d in ((("gaicd_val", "srcc"), 3),
                                                                  (("gaicd_val", "acc5"), 1),
                                                                  (("gaicd_val", "acc10"), 1),
                                                                  (("fcdb_heldout_any", "iou"), 3))) + " |")

    others = [v for v in order if v != ref]
    if others:
        L.append("")
        L.append(f"Paired against `{ref}`: d = variant − reference per (fold, seed) done by both; mean(d) ± sd(d), "
                 "pairs won; **beyond spread** only if |mean(d)| > sd(d) with ≥ 4 pairs.")
        L.append("")
        heads = ["variant", "pairs"] + [m[0] for m in METRICS]
        L.append("| " + " | ".join(heads) + " |")
        L.append("|" + "---|" * len(heads))
        for v in others:
            keys = sorted(set(res[v]) & set(res[ref]))
            row = [v, str(len(keys))]
            for label, path, d in METRICS:
                ds = [get(res[v][k], path) - get(res[ref][k], path) for k in keys]
                m, sd = mean_sd(ds)
                won = sum(x > 0 for x in ds)
                beyond = len(ds) >= 4 and not math.isnan(sd) and abs(m) > sd
                cell = fmt(m, sd, d, signed=True) + (f" ({won}/{len(ds)})" if ds else "")
                row.append(f"**{cell} beyond**" if beyond else cell)
            L.append("| " + " | ".join(row) + " |")
        codes = {v: sorted({r["code"]["rev"][:10] + ("+dirty" if r["code"].get("dirty") else "")
                            for r in res[v].values()}) for v in order}
        if len({tuple(c) for c in codes.values()}) > 1:
            L.append("")
            L.append("Note: the variants ran on different code: "
                     + "; ".join(f"{v}: {', '.join(c)}" for v, c in codes.items()))
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "validate",
                    help="work folder (default runs/validate; git-ignored)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                    help="shared data folder (gaicd/, fcdb/, unlabeled/)")
    ap.add_argument("--backbone-weights", type=Path, default=None,
                    help="ImageNet MobileNetV2 (default DATA/../weights/mobilenet_v2_imagenet.pth)")
    ap.add_argument("--unlabeled", type=Path, action="append", default=None,
                    help="unlabeled photo folders (default DATA/unlabeled and DATA/gaicd/images/holdout)")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME=ARGS",
                    help="a variant: name and extra `smartcrop train` arguments, e.g. 'nofcdb=--fcdb-weight 0'; "
                         "repeatable (default: baseline=)")
    ap.add_argument("--train-args", default="", help="extra `smartcrop train` arguments for every variant (part of "
                    "the protocol: a work folder holds one setting), e.g. --train-args='--epochs 1'")
    ap.add_argument("--folds", default="0-4", help="folds to run (default 0-4)")
    ap.add_argument("--seeds", default="0,1", help="seeds to run (default 0,1)")
    ap.add_argument("--code", default=None, help="commit to snapshot (default HEAD, or the variant's recorded "
                    "commit when it already has runs), or 'live' for the working tree")
    ap.add_argument("--device", default="auto", help="--device for train and eval (default auto)")
    ap.add_argument("--keep-models", action="store_true", help="keep each run's model.safetensors")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--summary", action="store_true", help="print the Markdown summary of WORK's results and exit")
    ap.add_argument("--reference", default=None, help="reference variant of the paired comparison "
                    "(default baseline)")
    ap.add_argument("--summary-out", type=Path, default=None, help="also write the summary to this file")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    if args.summary:
        text = summary(args)
        print(text, end="")
        if args.summary_out:
            write_atomic(args.summary_out, text)
        return 0
    args.data = args.data.resolve()
    if args.backbone_weights is None:
        args.backbone_weights = args.data.parent / "weights" / "mobilenet_v2_imagenet.pth"
    if args.unlabeled is None:
        args.unlabeled = [args.data / "unlabeled", args.data / "gaicd" / "images" / "holdout"]
    args.unlabeled = [p.resolve() for p in args.unlabeled]
    args.backbone_weights = args.backbone_weights.resolve()
    args.train_args_list = shlex.split(args.train_args)
    return cmd_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
