"""Timeline speed: 5 channels over 11 snapshots, then the same timeline after one more
snapshot was written (only that row renders: about one eleventh of the first time).

The snapshots are the offline ImageNet SqueezeNet with a 3-class head, each with its
middle layers nudged a little further, as fine-tuning would; the timeline does not care
how the weights came about, only that every snapshot's are different.

    python benchmarks/timeline_speed.py                     # CPU-sized defaults
    python benchmarks/timeline_speed.py --steps 512 --size 128 --device cuda
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import featureshift
from featureshift.run import snapshot_path
from featureshift.commands.timeline import timeline


def nudge(model, epoch: int) -> None:
    """Every convolution a little further, as fine-tuning would (any network)."""
    g = torch.Generator().manual_seed(epoch)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.add_(0.02 * p.std() * torch.randn(p.shape, generator=g))


def timeline_arguments(ap: argparse.ArgumentParser) -> None:
    """The timeline this benchmark (and benchmarks/ray_speed.py) renders: layer, channels, snapshots, settings."""
    ap.add_argument("--layer", default="features.6.expand3x3_activation")
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--snapshots", type=int, default=11)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    timeline_arguments(ap)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice); on a machine "
                    "shared with other work, 1 avoids threads spinning against each other.")
    ap.add_argument("--keep", help="Write the run here and keep it (default: a temporary folder).")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fs-timeline-bench-"))
    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    model = featureshift.open_network("squeezenet1_1", weights="imagenet", num_classes=3).module
    for epoch in range(args.snapshots):
        nudge(model, epoch)
        featureshift.save_snapshot(model, snapshot_path(run, epoch), epoch=epoch,
                                   metrics={"val_acc": 0.33 + 0.06 * epoch})
    opts = dict(steps=args.steps, size=args.size, device=args.device, precision=args.precision)
    # One throwaway render first, so neither figure includes one-time start-up (kernels, allocator).
    from featureshift.optvis.engine import render
    render(model, [(args.layer, 0)], steps=2, size=args.size, device=args.device, quiet=True)
    try:
        t, c = time.perf_counter(), time.process_time()
        first = timeline(run, args.layer, args.channels, **opts)
        full, full_cpu = time.perf_counter() - t, time.process_time() - c

        nudge(model, args.snapshots)
        featureshift.save_snapshot(model, snapshot_path(run, args.snapshots), epoch=args.snapshots,
                                   metrics={"val_acc": 0.99})
        t, c = time.perf_counter(), time.process_time()
        second = timeline(run, args.layer, args.channels, **opts)
        incremental, incremental_cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"timeline {args.layer}, {args.channels} channels, steps {args.steps}, size {args.size}, "
          f"device {args.device}, precision {args.precision}, torch threads {torch.get_num_threads()}")
    # CPU seconds are printed too: on a shared machine they vary far less than wall-clock time.
    print(f"  {args.snapshots} snapshots:          {full:8.2f} s wall, {full_cpu:8.2f} s CPU  "
          f"({first.rendered} tiles rendered, {first.cached} cached)")
    print(f"  rerun with 1 new snapshot: {incremental:8.2f} s wall, {incremental_cpu:8.2f} s CPU  "
          f"({second.rendered} tiles rendered, {second.cached} cached)")
    print(f"  ratio: {incremental / full:.3f} wall, {incremental_cpu / full_cpu:.3f} CPU  "
          f"(one row of {args.snapshots}: {1 / args.snapshots:.3f})")


if __name__ == "__main__":
    main()
