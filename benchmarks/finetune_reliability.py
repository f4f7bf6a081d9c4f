"""Reliability of the default fine-tuning recipe on real data: scikit-learn's handwritten digits
(1,797 8x8 scans, 10 classes) as an ImageFolder, trained per architecture and seed, against the
same runs with every layer at --lr (--pretrained-lr-scale 1; the new head still starts small) and, with
--nproc 2, against two processes at the same global batch.

Prints each run's validation accuracy per epoch, then per architecture and recipe the mean,
the lowest and highest final accuracy and their spread (chance: 10%).

    python benchmarks/finetune_reliability.py                         # squeezenet1_1 imagenet, seeds 0-4
    python benchmarks/finetune_reliability.py --models resnet18 googlenet --weights random --epochs 3
    python benchmarks/finetune_reliability.py --seeds 0 1 2 --nproc 2   # one process against two
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _digits import export_digits  # noqa: E402
from featureshift.run import read_metrics  # noqa: E402


def run(args, data: Path, out: Path, model: str, seed: int, scale: float, nproc: int) -> list[float]:
    cmd = [sys.executable, "-m", "featureshift", "train", "--model", model, "--weights", args.weights, "--data",
           str(data), "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--batch-size",
           str(args.batch_size), "--seed", str(seed), "--pretrained-lr-scale", str(scale), "--nproc", str(nproc),
           "--out", str(out), "--force", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return [row["val_acc"] for row in read_metrics(out)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["squeezenet1_1"])
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--nproc", type=int, default=1, help="with 2: one process against two (default recipe only)")
    p.add_argument("--no-before", action="store_true", help="leave out the runs with every layer at --lr")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = export_digits(tmp / "digits")
        variants = [("default", 0.1, 1)]
        if args.nproc > 1:
            variants.append((f"default, {args.nproc} processes", 0.1, args.nproc))
        if not args.no_before and args.weights != "random":
            variants.append(("every layer at --lr", 1.0, 1))
        summary = []
        for model in args.models:
            for name, scale, nproc in variants:
                finals = []
                for seed in args.seeds:
                    t = time.perf_counter()
                    accs = run(args, data, tmp / f"{model}-{scale}-{nproc}-{seed}", model, seed, scale, nproc)
                    finals.append(accs[-1])
                    print(f"{model:>18} {name:<30} seed {seed}: val acc " + " ".join(f"{a:.3f}" for a in accs) +
                          f"  ({time.perf_counter() - t:.0f} s)", flush=True)
                summary.append((model, name, finals))
        print(f"\n{args.weights} weights, {args.epochs} epochs, {args.image_size} px, batch {args.batch_size}, "
              f"seeds {' '.join(map(str, args.seeds))}; final validation accuracy (chance 10%):")
        for model, name, finals in summary:
            print(f"{model:>18} {name:<30} mean {statistics.mean(finals):.1%}  min {min(finals):.1%}  "
                  f"max {max(finals):.1%}  spread {max(finals) - min(finals):.1%}")


if __name__ == "__main__":
    main()
