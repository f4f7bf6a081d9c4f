"""Training throughput: featureshift's loop against a plain PyTorch loop.

Both train the same network (same head, same optimizer, same batch size) on the
same images. The plain loop gets its images already decoded and preprocessed in
memory, so it has no data pipeline at all; featureshift decodes JPEGs lazily in
DataLoader workers, augments them, and writes its per-epoch state and logs.
The ratio is what the whole pipeline costs (target: at least 0.90).

    python benchmarks/train_speed.py                 # squeezenet1_1, 128 px, batch 32
    python benchmarks/train_speed.py --device cuda --model resnet50 --image-size 224 --images 2048
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from featureshift import create_model, model_info  # noqa: E402
from featureshift.data import (ImageDataset, eval_transform, make_synthetic_dataset,  # noqa: E402
                               scan_image_folder)
from featureshift.models import replace_head  # noqa: E402
from featureshift.run import read_metrics  # noqa: E402
from featureshift.train import resolve_device, train  # noqa: E402


def plain_loop(args, root: Path, device: torch.device) -> list[float]:
    """images/s of each epoch of the plainest loop: tensors in memory, random batches."""
    torch.manual_seed(0)
    model = create_model(args.model, weights=args.weights)
    index = scan_image_folder(root)
    replace_head(model, len(index.classes))
    ds = ImageDataset(index.samples, eval_transform(model_info(model), args.image_size))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([c for _, c in index.samples])
    model = model.to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        xs, ys = xs.to(device).contiguous(memory_format=torch.channels_last), ys.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
    rates = []
    for _ in range(args.epochs):
        order = torch.randperm(len(xs), device=xs.device)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        n = 0
        for i in range(0, len(xs) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            x, y = xs[idx], ys[idx]
            if amp:
                with amp:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
            else:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        if cuda:
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t))
    return rates


def featureshift_loop(args, root: Path, out: Path) -> list[float]:
    """images/s of each epoch of `featureshift train` (training time of the epoch, data loading included)."""
    run = train(data=str(root), model=args.model, weights=args.weights, epochs=args.epochs,
                batch_size=args.batch_size, image_size=args.image_size, val_fraction=0.0, optimizer="adam",
                lr=1e-3, snapshot_every=args.epochs, device=args.device, workers=args.workers, out=str(out),
                force=True, quiet=True)
    return [r["train_images"] / r["train_seconds"] for r in read_metrics(run)[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="squeezenet1_1")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--source-size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--images", type=int, default=192, help="training images (over 4 classes)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4, help="the first of each is a warm-up and not counted")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_synthetic_dataset(tmp / "data", classes=("stripes", "checkers", "dots", "rings"),
                                      per_class=args.images // 4, size=args.source_size)
        plain, ours = [], []
        for _ in range(args.repeats):  # alternate, so load from other processes hits both alike
            plain += plain_loop(args, root, device)[1:]
            ours += featureshift_loop(args, root, tmp / "run")[1:]
    p, f = statistics.median(plain), statistics.median(ours)
    print(f"model {args.model}, {args.image_size}px from {args.source_size}px JPEGs, batch {args.batch_size}, "
          f"{args.images} images, device {device}, torch threads {torch.get_num_threads()}")
    print(f"plain PyTorch loop (tensors in memory): {p:8.1f} images/s  (epochs: {', '.join(f'{r:.1f}' for r in plain)})")
    print(f"featureshift train:                     {f:8.1f} images/s  (epochs: {', '.join(f'{r:.1f}' for r in ours)})")
    print(f"ratio featureshift / plain: {f / p:.3f}  (target >= 0.90)")


if __name__ == "__main__":
    main()
