"""Where a training step's time goes: seconds per step of the training recipe on a small slice of the data, in
each of several settings (cuDNN on/off, bfloat16 autocast on/off), over the same steps twice — the first pass
meets each step's input shapes for the first time, the second has seen them — then, optionally, a
torch.profiler table of a few more steps (operators by self device time and by CPU time).

    python benchmarks/train_profile.py --data ../shared/data --device cuda --steps 8 \
        --settings cudnn+amp nocudnn+amp nocudnn+fp32

DATA is the shared data layout (gaicd/, fcdb/, unlabeled/; benchmarks/shrink_data.py makes a small copy);
``--backbone-weights`` defaults to DATA/../weights/mobilenet_v2_imagenet.pth.  The recipe is
``TrainConfig.for_device(DEVICE)`` (on CUDA: end to end, 8 images per step, autocast), as ``smartcrop train``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--backbone-weights", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per pass")
    ap.add_argument("--settings", nargs="+", default=["cudnn+amp", "nocudnn+amp", "nocudnn+fp32"],
                    help="each: cudnn|nocudnn + amp|fp32")
    ap.add_argument("--profile-steps", type=int, default=0, help="profile this many more steps (first setting)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--frozen-layers", type=int, default=None)
    ap.add_argument("--row-limit", type=int, default=25)
    ap.add_argument("--gpu-recipe", action="store_true", help="the CUDA recipe's configuration (end to end, 8 "
                    "images a step, fixed shapes) on --device, e.g. to count a GPU step's operators on a CPU")
    args = ap.parse_args(argv)

    import torch

    from smartcrop.training import (Trainer, TrainConfig, build_model, load_train_data, prepare_samples,
                                    seed_everything, size_batches)

    d = args.data
    weights = args.backbone_weights or d.parent / "weights" / "mobilenet_v2_imagenet.pth"
    data = load_train_data([f"{d / 'gaicd'}:dev"], [d / "fcdb"], [d / "unlabeled"], 0.0)
    n = 2 * (args.steps + args.profile_steps) * (args.batch_size or 8)
    data.gaicd, data.fcdb, data.unlabeled = data.gaicd[:40], data.fcdb[: n], data.unlabeled[: 4 * n]
    gpu = args.device.startswith("cuda")

    def sync():
        if gpu:
            torch.cuda.synchronize()

    results = []
    for k, setting in enumerate(args.settings):
        cudnn, amp = setting.split("+")
        seed_everything(0)
        net, _ = build_model(None, "mobilenet_v2", True, weights, 0)
        cfg = TrainConfig.for_device("cuda" if args.gpu_recipe else args.device, amp=amp == "amp",
                                     cudnn=cudnn == "cudnn", batch_size=args.batch_size,
                                     frozen_layers=args.frozen_layers)
        tr = Trainer(net, cfg, args.device, log=lambda m: None)
        net.eval()
        t0 = time.perf_counter()
        gaicd, fcdb, unl, _ = prepare_samples(tr, data, print, progress=False, workers=8)
        prep = time.perf_counter() - t0
        fixed = cfg.fixed_shapes and cfg.batch_size > 1
        steps = size_batches(tr.epoch_plan(gaicd, fcdb), cfg.batch_size,
                             tr.rng if fixed else None)[: args.steps + args.profile_steps]
        net.train()
        passes = []
        for _ in range(2):  # the second pass repeats the first's steps (shapes already seen)
            times = []
            for b in steps[: args.steps]:
                t0 = time.perf_counter()
                tr.train_epoch(b, unl)
                sync()
                times.append(time.perf_counter() - t0)
            passes.append(times)
        sizes = len({b[0].size for b in steps[: args.steps]})
        row = (f"{setting} batch={cfg.batch_size} frozen={cfg.frozen_layers}: {len(passes[0])} steps of {sizes} "
               f"network sizes; first pass {sum(passes[0]):.2f} s (median {statistics.median(passes[0]):.3f} s/step), "
               f"second pass {sum(passes[1]):.2f} s (median {statistics.median(passes[1]):.3f} s/step); "
               f"prepare {prep:.1f} s")
        print(row, flush=True)
        print("  first pass: " + " ".join(f"{t:.2f}" for t in passes[0]), flush=True)
        print("  second pass: " + " ".join(f"{t:.2f}" for t in passes[1]), flush=True)
        results.append(row)
        if k == 0 and args.profile_steps:
            prof_plan = [s for b in steps[args.steps:] for s in b]
            acts = [torch.profiler.ProfilerActivity.CPU]
            if gpu:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                tr.train_epoch(prof_plan, unl)
                sync()
            ka = prof.key_averages()
            ops = sum(e.count for e in ka if e.key.startswith("aten::"))
            with torch.profiler.profile(activities=acts) as prof_opt:  # its optimiser step alone, for comparison
                tr.opt.step()
                sync()
            opt_ops = sum(e.count for e in prof_opt.key_averages() if e.key.startswith("aten::"))
            print(f"profiled {len(steps) - args.steps} steps: {ops} aten operator calls "
                  f"({ops / max(1, len(steps) - args.steps):.0f} a step, of which the optimiser step {opt_ops})",
                  flush=True)
            key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
            print(ka.table(sort_by=key, row_limit=args.row_limit, max_name_column_width=60), flush=True)
            print(ka.table(sort_by="cpu_time_total", row_limit=args.row_limit, max_name_column_width=60), flush=True)
            print(ka.table(sort_by="count", row_limit=args.row_limit, max_name_column_width=60), flush=True)
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
