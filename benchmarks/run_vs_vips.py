"""Wall time of `smartcrop run` against a shell loop of libvips `vips smartcrop --interesting attention`.

Both write full-resolution 16:9 crops of every JPEG in PHOTOS (libvips needs the crop size: the largest 16:9
box of each photo, computed from `vipsheader`; smartcrop chooses its own box among its 16:9 anchors). Each tool
runs `--repeat` times into a fresh output folder; the best and median wall times are reported, with the peak
resident memory of the smartcrop process.

    python benchmarks/run_vs_vips.py /tmp/photos12mp --repeat 3 [-- extra smartcrop run args]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def largest(w: int, h: int, rw: int = 16, rh: int = 9) -> tuple[int, int]:
    if w * rh > h * rw:
        return round(h * rw / rh), h
    return w, round(w * rh / rw)


def vips_loop(photos: list[Path], out: Path) -> float:
    script = []
    for p in photos:
        w = int(subprocess.check_output(["vipsheader", "-f", "width", str(p)]).strip())
        h = int(subprocess.check_output(["vipsheader", "-f", "height", str(p)]).strip())
        cw, ch = largest(w, h)
        script.append(f"vips smartcrop '{p}' '{out / p.name}' {cw} {ch} --interesting attention")
    # the sizes are looked up before the clock starts; the timed part is the plain shell loop
    sh = out / "loop.sh"
    sh.write_text("set -e\n" + "\n".join(script) + "\n")
    t = time.perf_counter()
    subprocess.run(["bash", str(sh)], check=True)
    return time.perf_counter() - t


def smartcrop_run(photos_dir: Path, out: Path, extra: list[str]) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "smartcrop.cli", "run", str(photos_dir), "--ratio", "16:9", "-o", str(out), *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    return dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-vips", action="store_true")
    ap.add_argument("extra", nargs="*", help="extra arguments for smartcrop run (after --)")
    args = ap.parse_args(argv)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})
    res: dict = {"photos": len(photos), "cpus": os.cpu_count()}
    if not args.skip_vips:
        if not shutil.which("vips"):
            print("libvips not found: apt-get install libvips-tools (or pass --skip-vips)", file=sys.stderr)
            return 2
        res["vips_version"] = subprocess.check_output(["vips", "--version"]).decode().strip()
        times = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as d:
                times.append(vips_loop(photos, Path(d)))
        res["vips_s"] = {"best": min(times), "median": statistics.median(times)}
    times = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            dt, rss = smartcrop_run(args.photos, Path(d) / "out", args.extra)
            times.append(dt)
    res["smartcrop_s"] = {"best": min(times), "median": statistics.median(times)}
    res["smartcrop_peak_rss_mb"] = round(rss / 1024, 1)
    if "vips_s" in res:
        res["ratio_median"] = res["smartcrop_s"]["median"] / res["vips_s"]["median"]
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
