"""Throughput of ``smartcrop run --engine ray`` against the local engine on the same machine.

Each engine crops a small and a large subset of a folder of photos (symlinks, so the same files) as a fresh
``smartcrop run`` process, wall clock from start to exit.  From the two wall times:

* start-up included: photos / wall time of the large run;
* start-up excluded: the marginal rate (large - small photos) / (large - small seconds), i.e. the steady
  streaming rate once workers, actors and the model are up;
* fixed cost: what is left of the small run's time at that rate (interpreter, torch, model, Ray start).

    python benchmarks/make_photos.py ../shared/data/unlabeled /tmp/photos12mp --count 60
    python benchmarks/ray_vs_local.py /tmp/photos12mp --small 15 --repeat 2
    python benchmarks/ray_vs_local.py /tmp/photos12mp --stages 30     # seconds per photo of each stage

The Ray engine starts its own local Ray with ``-j`` CPUs (default: every usable core), i.e. one scoring
actor and CPU tasks for decode and encode on those cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def subset(photos: list[Path], n: int, root: Path) -> Path:
    d = root / f"in{n}"
    d.mkdir(parents=True, exist_ok=True)
    for p in photos[:n]:
        (d / p.name).symlink_to(p.resolve())
    return d


def run_once(engine: str, src: Path, out: Path, args: argparse.Namespace) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "smartcrop.cli", "run", str(src), "--ratio", args.ratio, "-o", str(out),
           "--engine", engine]
    if args.jobs:
        cmd += ["-j", str(args.jobs)]
    if args.weights:
        cmd += ["--weights", args.weights]
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{engine} run failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return dt


def stage_costs(photos: list[Path], weights: str | None, ratio: str, batch: int = 8) -> dict:
    """Seconds per photo of each stage, in this process on one core (torch on one thread): what a worker
    costs per photo, for sizing a cluster."""
    import torch

    from smartcrop.cropper import Cropper
    from smartcrop.stages import CropSpec, FinishJob, finish, output_size, prepare

    torch.set_num_threads(1)
    cropper = Cropper(weights=weights, device="cpu")
    cfg = cropper.config
    out = Path(tempfile.mkdtemp(prefix="smartcrop-stages-"))
    try:
        prepare(str(photos[0]), cfg.short_side, cfg.max_long_side)  # warm-up (imports, decoder tables)
        t = time.perf_counter()
        prepared = [prepare(str(p), cfg.short_side, cfg.max_long_side) for p in photos]
        t_prep = (time.perf_counter() - t) / len(photos)
        cropper.best_crops_batch([(prepared[0].image, prepared[0].full_size)], [ratio])
        t = time.perf_counter()
        crops = []
        for i in range(0, len(prepared), batch):
            chunk = prepared[i:i + batch]
            crops += cropper.best_crops_batch([(p.image, p.full_size) for p in chunk], [ratio])
        t_score = (time.perf_counter() - t) / len(photos)
        t = time.perf_counter()
        for p, cs in zip(photos, crops):
            c = cs[0]
            finish(FinishJob(str(p), "jpg", [CropSpec(c.ratio, c.box, c.score, output_size(c.box, None, None),
                                                      str(out / f"{p.stem}.jpg"))]))
        t_finish = (time.perf_counter() - t) / len(photos)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"prepare_s": round(t_prep, 4), "score_cpu_1thread_s": round(t_score, 4),
            "finish_lossless_s": round(t_finish, 4), "photos": len(photos)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", type=Path)
    ap.add_argument("--small", type=int, default=15, help="photos in the small run")
    ap.add_argument("--large", type=int, default=0, help="photos in the large run (default: all)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ratio", default="16:9")
    ap.add_argument("--jobs", "-j", type=int, default=0)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("--stages", type=int, default=0, help="instead: time each stage in-process on N photos")
    args = ap.parse_args(argv)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if args.stages:
        costs = stage_costs(photos[:args.stages], args.weights, args.ratio)
        print(json.dumps({**costs, "loadavg_end": os.getloadavg()}))
        return 0
    large = args.large or len(photos)
    if not 0 < args.small < large <= len(photos):
        raise SystemExit(f"need 0 < --small < --large <= {len(photos)} photos")
    root = Path(tempfile.mkdtemp(prefix="smartcrop-bench-"))
    try:
        small_dir, large_dir = subset(photos, args.small, root), subset(photos, large, root)
        results = {}
        for engine in args.engines.split(","):
            times = {args.small: [], large: []}
            for _ in range(args.repeat):  # interleaved, so a burst of load on the machine hits both sizes
                for n, src in ((args.small, small_dir), (large, large_dir)):
                    times[n].append(run_once(engine, src, root / f"out-{engine}", args))
            ts, tl = statistics.median(times[args.small]), statistics.median(times[large])
            rate = (large - args.small) / (tl - ts) if tl > ts else float("nan")
            results[engine] = {
                "wall_s": {str(k): [round(v, 2) for v in vs] for k, vs in times.items()},
                "photos_per_s_incl_startup": round(large / tl, 2),
                "photos_per_s_excl_startup": round(rate, 2),
                "fixed_cost_s": round(ts - args.small / rate, 2),
            }
            print(f"{engine:6s} {args.small} photos: {ts:6.2f} s  {large} photos: {tl:6.2f} s  "
                  f"→ {large / tl:5.2f} photos/s with start-up, {rate:5.2f} photos/s without, "
                  f"fixed cost {ts - args.small / rate:5.2f} s", flush=True)
        if "local" in results and "ray" in results:
            lo, ra = results["local"], results["ray"]
            print(f"ray / local throughput: {ra['photos_per_s_excl_startup'] / lo['photos_per_s_excl_startup']:.2f} "
                  f"without start-up, {ra['photos_per_s_incl_startup'] / lo['photos_per_s_incl_startup']:.2f} with "
                  f"({large} photos)")
        info = {"photos": large, "small": args.small, "ratio": args.ratio, "cpus": len(os.sched_getaffinity(0)),
                "loadavg_end": os.getloadavg(), "results": results}
        if args.json:
            args.json.write_text(json.dumps(info, indent=1) + "\n")
        print(json.dumps(info))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
