"""Training throughput: featureshift's loop against a plain PyTorch loop.

Both train the same network (same head, same optimizer, same batch size) on the
same images. The plain loop gets its images already decoded and preprocessed in
memory, so it has no data pipeline at all; featureshift decodes JPEGs lazily in
DataLoader workers, augments them, and writes its per-epoch state and logs.
The ratio is what the whole pipeline costs (target: at least 0.90).

    python benchmarks/train_speed.py                 # squeezenet1_1, 224 px, batch 32
    python benchmarks/train_speed.py --device cuda --model resnet50 --image-size 224 --images 2048
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Before torch loads OpenMP, as the featureshift command does (see featureshift/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from featureshift.network import open_network  # noqa: E402
from featureshift.models.info import model_info  # noqa: E402
from featureshift.data import (ImageDataset, eval_transform, make_synthetic_dataset,  # noqa: E402
                               scan_image_folder)
from featureshift.models.zoo import replace_head  # noqa: E402
from featureshift.device import resolve_device  # noqa: E402
from featureshift.commands.train import train  # noqa: E402


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers that have exited)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def plain_loop(args, root: Path, device: torch.device) -> list[tuple[float, float]]:
    """(images/s, CPU s/image) of each epoch of the plainest loop: tensors in memory, random batches."""
    torch.manual_seed(0)
    model = open_network(args.model, weights=args.weights).module
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
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    rates = []
    for _ in range(args.epochs):
        order = torch.randperm(len(xs), device=xs.device)
        if cuda:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), _cpu()
        n = 0
        for i in range(0, len(xs), args.batch_size):
            idx = order[i:i + args.batch_size]
            x, y = xs[idx], ys[idx]
            with amp:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        if cuda:
            torch.cuda.synchronize()
        rates.append((n / (time.perf_counter() - t), (_cpu() - c) / n))
    return rates


def pipeline_alone(args, root: Path) -> float:
    """CPU s/image of featureshift's data pipeline by itself (decode, augment, batch, normalize; no network)."""
    from featureshift.data import collate_skip, normalize_batch, train_transform, transform_sizes

    info = model_info(open_network(args.model, weights="random").module)
    size, _ = transform_sizes(info, args.image_size)
    ds = ImageDataset(scan_image_folder(root).samples, train_transform(info, args.image_size, normalize=False),
                      min_size=2 * size)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate_skip)
    c = _cpu()
    for x, _, _ in loader:
        normalize_batch(x, info)
    return (_cpu() - c) / len(ds)


def featureshift_loop(args, root: Path, out: Path) -> list[tuple[float, float]]:
    """The same for `featureshift train`: whole epochs (decoding, augmentation, state and logs written)."""
    marks = [(time.perf_counter(), _cpu())]

    def mark(epoch, row):
        marks.append((time.perf_counter(), _cpu(), row.get("train_images", 0)))

    train(data=str(root), model=args.model, weights=args.weights, epochs=args.epochs,
          batch_size=args.batch_size, image_size=args.image_size, val_fraction=0.0, optimizer="adam",
          lr=1e-3, snapshot_every=args.epochs + 1, device=args.device, workers=args.workers, out=str(out),
          force=True, quiet=True, on_epoch_end=mark)
    # marks[1] is epoch 0 (the snapshot before training); each later pair brackets one epoch
    return [(n / (t1 - t0), (c1 - c0) / n) for (t0, c0, *_), (t1, c1, n) in zip(marks[1:], marks[2:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="squeezenet1_1")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--source-size", type=int, default=320, help="side of the generated JPEGs")
    ap.add_argument("--images", type=int, default=128, help="training images (over 4 classes)")
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
        pipe = statistics.median(pipeline_alone(args, root) for _ in range(3))
        plain, ours = [], []
        for _ in range(args.repeats):  # alternate, so load from other processes hits both alike
            plain += plain_loop(args, root, device)[1:]
            ours += featureshift_loop(args, root, tmp / "run")[1:]
    p, f = statistics.median(r for r, _ in plain), statistics.median(r for r, _ in ours)
    pc, fc = statistics.median(c for _, c in plain), statistics.median(c for _, c in ours)
    print(f"model {args.model}, {args.image_size}px from {args.source_size}px JPEGs, batch {args.batch_size}, "
          f"{args.images} images, device {device}, torch threads {torch.get_num_threads()}, "
          f"workers {args.workers if args.workers is not None else 'default'}")
    for name, rows, rate, cpu in (("plain PyTorch loop (tensors in memory)", plain, p, pc),
                                  ("featureshift train", ours, f, fc)):
        print(f"{name:<40} {rate:7.1f} images/s  {cpu * 1000:7.1f} CPU ms/image  "
              f"(epochs: {', '.join(f'{r:.1f}' for r, _ in rows)} images/s)")
    print(f"throughput ratio featureshift / plain: {f / p:.3f}  (target >= 0.90)")
    print(f"data pipeline alone: {pipe * 1000:.1f} CPU ms/image = {pipe / pc:.1%} of a plain training step's CPU time "
          "(the most it can cost with no worker processes; workers take it off the training cores)")
    print(f"CPU-time ratio plain / featureshift:  {pc / fc:.3f}  (less sensitive to other load, but it leaves "
          "out the worker processes' CPU time: persistent workers report it only when they exit)")


if __name__ == "__main__":
    main()
