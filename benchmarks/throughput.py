"""Throughput of `smartcrop run` against a shell loop of libvips `vips smartcrop --interesting attention`.

For each photo count (the first N JPEGs of PHOTOS, sorted by name) and each smartcrop mode (the default:
lossless JPEG crops; `--reencode`), one `smartcrop run … --ratio 16:9` process is timed from start to exit
(start-up included), `--repeat` times into fresh output folders, and reports the median run's wall time,
photos/s and CPU utilisation (CPU seconds of the whole process tree / wall / usable cores).  The peak RSS of
the whole process tree (sampled every 20 ms from /proc) comes from one more, untimed run: the sampler's own
CPU would slow a run that keeps every core busy.  The libvips loop writes the
same crops' sizes (the largest 16:9 box of each photo, looked up before the clock starts).

    python benchmarks/make_photos.py ../shared/data/unlabeled /tmp/photos12mp --count 64
    python benchmarks/throughput.py /tmp/photos12mp --counts 16 64 --repeat 3 --out runs/throughput.json
    taskset -c 0,1 python benchmarks/throughput.py /tmp/photos12mp ...   # the same run confined to 2 cores
    python benchmarks/throughput.py /tmp/photos12mp --counts 1 --modes default --skip-vips   # start-up

Extra `smartcrop run` arguments go after `--` (e.g. `-- --device cuda`).
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
import threading
import time
from pathlib import Path

MODES = {"default": [], "reencode": ["--reencode"]}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def largest(w: int, h: int, rw: int = 16, rh: int = 9) -> tuple[int, int]:
    if w * rh > h * rw:
        return round(h * rw / rh), h
    return w, round(w * rh / rw)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _proc_kb(pid: int, name: str, field: str) -> int:
    """The kB figure of ``field`` (e.g. ``VmRSS:``) in /proc/PID/NAME; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kb(pid: int) -> int:
    return _proc_kb(pid, "status", "VmRSS:")


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (e.g. torch imported once by a fork server and shared by its
    workers) counted once over the processes sharing them, where RSS counts them in each."""
    return _proc_kb(pid, "smaps_rollup", "Pss:")


def _become_subreaper() -> None:
    """Adopt orphaned descendants (a multiprocessing fork server and its workers outlive `smartcrop`'s main
    process by a few ms and are not its waited-for children), so their CPU time is counted below."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap_orphans(deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def timed(cmd: list[str], rss: bool = False) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds of it and its children and, with ``rss``, the peak RSS (MB) of the
    whole process tree.  The RSS sampler (a thread reading /proc every 20 ms) takes CPU from a run that uses
    every core (measured: 16 photos 1.80 s sampled, ~1.67 s not), so timed runs are not sampled: the peak comes
    from one extra run."""
    t0 = time.perf_counter()
    before = os.times()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = peak_pss = 0
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_pss
        while not stop.is_set():
            tree = _tree(proc.pid)
            peak = max(peak, sum(_rss_kb(p) for p in tree))
            peak_pss = max(peak_pss, sum(_pss_kb(p) for p in tree))
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    if rss:
        th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    if rss:
        th.join()
    _reap_orphans()
    after = os.times()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {rc}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 1024, "peak_pss_mb": peak_pss / 1024}


def vips_loop(photos: list[Path], out: Path, rss: bool = False) -> dict:
    script = []
    for p in photos:
        w = int(subprocess.check_output(["vipsheader", "-f", "width", str(p)]).strip())
        h = int(subprocess.check_output(["vipsheader", "-f", "height", str(p)]).strip())
        cw, ch = largest(w, h)
        script.append(f"vips smartcrop '{p}' '{out / p.name}' {cw} {ch} --interesting attention")
    sh = out / "loop.sh"
    sh.write_text("set -e\n" + "\n".join(script) + "\n")
    return timed(["bash", str(sh)], rss)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", type=Path)
    ap.add_argument("--counts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-vips", action="store_true")
    ap.add_argument("--skip-peak", action="store_true", help="no extra run for the peak memory (reported as null)")
    ap.add_argument("--out", type=Path, help="also write the results to this JSON file")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # argparse would reject options after "--"
    args = ap.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.extra = extra
    _become_subreaper()
    extra_run = 0 if args.skip_peak else 1
    all_photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})
    cores = usable_cores()
    res: dict = {"cores": cores, "extra": args.extra, "runs": []}
    if not args.skip_vips:
        if not shutil.which("vips"):
            print("libvips not found: apt-get install libvips-tools (or pass --skip-vips)", file=sys.stderr)
            return 2
        res["vips_version"] = subprocess.check_output(["vips", "--version"]).decode().strip()
    for n in args.counts:
        if n > len(all_photos):
            print(f"only {len(all_photos)} photos in {args.photos}, asked for {n}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "in"
            src.mkdir()
            for p in all_photos[:n]:
                os.symlink(p.resolve(), src / p.name)
            rows = {}
            if not args.skip_vips:
                runs = []
                for k in range(args.repeat + extra_run):  # the last one only for the peak RSS
                    out = Path(d) / f"vips{k}"
                    out.mkdir()
                    runs.append(vips_loop(all_photos[:n], out, rss=k == args.repeat))
                rows["vips"] = runs
            for mode in args.modes:
                runs = []
                for k in range(args.repeat + extra_run):
                    cmd = [sys.executable, "-m", "smartcrop.cli", "run", str(src), "--ratio", "16:9", "-o",
                           str(Path(d) / f"{mode}{k}"), *MODES[mode], *args.extra]
                    runs.append(timed(cmd, rss=k == args.repeat))
                rows[mode] = runs
            for tool, all_runs in rows.items():
                runs, peak_run = all_runs[: args.repeat], (all_runs[args.repeat:] or [None])[0]
                med = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
                row = {"photos": n, "tool": tool, "wall_s": round(med["wall_s"], 2),
                       "wall_s_all": [round(r["wall_s"], 2) for r in runs],
                       "photos_per_s": round(n / med["wall_s"], 2),
                       "cpu_util": round(med["cpu_s"] / med["wall_s"] / cores, 2),
                       "peak_rss_mb": peak_run and round(peak_run["peak_rss_mb"]),
                       "peak_pss_mb": peak_run and round(peak_run["peak_pss_mb"])}
                if "vips" in rows and tool != "vips":
                    vips_med = statistics.median(r["wall_s"] for r in rows["vips"][: args.repeat])
                    row["vs_vips"] = round(med["wall_s"] / vips_med, 2)
                res["runs"].append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
