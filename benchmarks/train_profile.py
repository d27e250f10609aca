"""Where a training step's time goes: seconds per step of the training recipe on a small slice of the data, with
and without bfloat16 autocast, then a torch.profiler table of a few steps (operators by self device time and by
CPU time).

    python benchmarks/train_profile.py --data ../shared/data --device cuda --steps 6

DATA is the shared data layout (gaicd/, fcdb/, unlabeled/; benchmarks/shrink_data.py makes a small copy);
``--backbone-weights`` defaults to DATA/../weights/mobilenet_v2_imagenet.pth.  The recipe is
``TrainConfig.for_device(DEVICE)`` (on CUDA: end to end, 8 images per step, autocast), as ``smartcrop train``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--backbone-weights", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--frozen-layers", type=int, default=None)
    ap.add_argument("--row-limit", type=int, default=25)
    args = ap.parse_args(argv)

    import torch

    from smartcrop.training import (Trainer, TrainConfig, build_model, load_train_data, prepare_samples,
                                    seed_everything, size_batches)

    d = args.data
    weights = args.backbone_weights or d.parent / "weights" / "mobilenet_v2_imagenet.pth"
    data = load_train_data([f"{d / 'gaicd'}:dev"], [d / "fcdb"], [d / "unlabeled"], 0.0)
    n = 8 * max(args.steps, args.profile_steps) * (args.batch_size or 8)
    data.gaicd, data.fcdb, data.unlabeled = data.gaicd[:40], data.fcdb[: n], data.unlabeled[: n]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    results = []
    for amp in (True, False):
        seed_everything(0)
        net, _ = build_model(None, "mobilenet_v2", True, weights, 0)
        cfg = TrainConfig.for_device(args.device, amp=amp, batch_size=args.batch_size,
                                     frozen_layers=args.frozen_layers)
        tr = Trainer(net, cfg, args.device, log=lambda m: None)
        net.eval()
        t0 = time.perf_counter()
        gaicd, fcdb, unl, _ = prepare_samples(tr, data, print, progress=False, workers=8)
        prep = time.perf_counter() - t0
        plan = tr.epoch_plan(gaicd, fcdb)
        steps = size_batches(plan, cfg.batch_size)
        net.train()
        # warm-up: two steps (kernels loaded, allocator primed)
        tr.train_epoch([s for b in steps[:2] for s in b], unl)
        sync()
        timed = [s for b in steps[2: 2 + args.steps] for s in b]
        t0 = time.perf_counter()
        tr.train_epoch(timed, unl)
        sync()
        dt = time.perf_counter() - t0
        n_steps = len(size_batches(timed, cfg.batch_size))
        row = (f"amp={amp} batch={cfg.batch_size} frozen={cfg.frozen_layers}: {n_steps} steps, {len(timed)} labeled "
               f"images in {dt:.2f} s = {dt / max(1, n_steps):.3f} s/step, {len(timed) / dt:.1f} labeled images/s "
               f"(prepare {prep:.1f} s)")
        print(row, flush=True)
        results.append(row)
        if amp:
            prof_plan = [s for b in steps[2 + args.steps: 2 + args.steps + args.profile_steps] for s in b]
            acts = [torch.profiler.ProfilerActivity.CPU]
            if args.device.startswith("cuda"):
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                tr.train_epoch(prof_plan, unl)
                sync()
            ka = prof.key_averages()
            key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
            print(ka.table(sort_by=key, row_limit=args.row_limit, max_name_column_width=60), flush=True)
            print(ka.table(sort_by="cpu_time_total", row_limit=args.row_limit, max_name_column_width=60), flush=True)
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
