"""The bootstrap intervals of CKA over the probe images: how often a 95% interval holds the true
CKA on constructed features (ours, against feeding resamples with repeated images straight to
the unbiased HSIC, and against resampling whole minibatches), and what the intervals cost on a
probe set like the demo's; the same for the example retention of a channel (the dataset
examples' measure, metrics/retention.py) on constructed peak activations of known retention.

    python benchmarks/probe_intervals.py coverage --trials 200    # constructed features, known CKA
    python benchmarks/probe_intervals.py retention --trials 200   # constructed peaks, known retention
    python benchmarks/probe_intervals.py cost --per-class 36       # the demo's dataset (28 probe images)
    python benchmarks/probe_intervals.py cost --per-class 320      # 256 probe images, the default limit

docs/metrics.md ("Intervals") quotes its figures.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np

from featureshift.metrics.retention import example_retention, retention_interval
from featureshift.metrics.similarity import cka_from_grams, cka_interval, correlation_interval, probe_bootstrap

BATCH = 32  # featureshift.metrics.probe.PROBE_BATCH
SPECTRUM = 1.0 / np.arange(1, 25) ** 0.7


def features(rng, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Post-ReLU-like features at A and at B = A plus noise of the given level."""
    x = rng.normal(size=(n, 24)) * SPECTRUM
    y = x + noise * rng.normal(size=(n, 24)) * SPECTRUM
    return np.maximum(x, 0), np.maximum(y, 0)


def true_cka(noise: float) -> float:
    """The population CKA, from 200 000 images."""
    x, y = features(np.random.default_rng(123), 200_000, noise)
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def grams(f: np.ndarray) -> list[np.ndarray]:
    return [f[i:i + BATCH] @ f[i:i + BATCH].T for i in range(0, len(f), BATCH)]


def with_repeats(ga, gb, weights) -> tuple[float, float]:
    """Resampled images, repeats and all, fed straight to the unbiased estimator."""
    values, start = [], 0
    picks = []
    for g in ga:
        picks.append((start, len(g)))
        start += len(g)
    for w in weights:
        sub_a, sub_b = [], []
        for (s, size), a, b in zip(picks, ga, gb):
            pick = np.repeat(np.arange(size), w[s:s + size].astype(int))
            sub_a.append(a[np.ix_(pick, pick)])
            sub_b.append(b[np.ix_(pick, pick)])
        values.append(cka_from_grams(sub_a, sub_b))
    return tuple(np.percentile(values, [2.5, 97.5]))


def whole_minibatches(ga, gb, seed: int, resamples: int = 200) -> tuple[float, float]:
    if len(ga) < 2:
        return (float("nan"), float("nan"))  # one minibatch: nothing to resample
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(ga), len(ga))
        values.append(cka_from_grams([ga[i] for i in pick], [gb[i] for i in pick]))
    return tuple(np.percentile(values, [2.5, 97.5]))


def coverage(trials: int) -> None:
    for noise in (0.3, 1.0):
        truth = true_cka(noise)
        for n in (12, 28, 256):
            hits = {"images, repeats never paired (ours)": [], "repeats fed to the estimator": [],
                    "whole minibatches": []}
            seconds = 0.0
            for t in range(trials):
                x, y = features(np.random.default_rng(1000 + t), n, noise)
                ga, gb = grams(x), grams(y)
                boot = probe_bootstrap(n, BATCH, seed=t)
                start = time.perf_counter()
                ours = cka_interval(ga, gb, boot)
                seconds += time.perf_counter() - start
                for name, (lo, hi) in zip(hits, ((ours.low, ours.high), with_repeats(ga, gb, boot.weights),
                                                 whole_minibatches(ga, gb, t))):
                    hits[name].append((lo <= truth <= hi, hi - lo))
            print(f"{n} images, true CKA {truth:.3f}: ours {1000 * seconds / trials:.1f} ms per interval")
            for name, rows in hits.items():
                cover, width = np.array(rows, float).T
                text = "n/a (one minibatch)" if np.isnan(width).all() else \
                    f"coverage {cover.mean():.2f}, mean width {np.nanmean(width):.3f}"
                print(f"    {name:38s} {text}")


def peaks(rng, n: int, kind: str, rho: float, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Peak activations of `channels` channels on n images at A and at B, correlated by rho:
    lognormal (heavy-tailed, as the peaks of a deep layer) or rectified normal (half of them 0)."""
    z = rng.normal(size=(n, channels))
    w = rho * z + np.sqrt(1 - rho ** 2) * rng.normal(size=(n, channels))
    if kind == "lognormal":
        return np.exp(0.6 * z), np.exp(0.6 * w)
    return np.maximum(z, 0), np.maximum(w, 0)


def retention_coverage(trials: int) -> None:
    """Coverage of the example retention's interval: the truth is the retention of 1 000 000 images."""
    channels = 8  # independent channels per trial: 8 x trials intervals per row
    for kind in ("lognormal", "rectified"):
        for rho in (0.9, 0.5):
            a, b = peaks(np.random.default_rng(7), 1_000_000, kind, rho, 1)
            truth = float(example_retention(a, b)[0])
            for n in (12, 28, 256):
                hits, widths, seconds, values = [], [], 0.0, []
                for t in range(trials):
                    a, b = peaks(np.random.default_rng(1000 + t), n, kind, rho, channels)
                    start = time.perf_counter()
                    iv = retention_interval(a, b, probe_bootstrap(n, BATCH, seed=t))
                    seconds += time.perf_counter() - start
                    ok = np.isfinite(iv.low)
                    hits += list((iv.low[ok] <= truth) & (truth <= iv.high[ok]))
                    widths += list(iv.high[ok] - iv.low[ok])
                    values += list(example_retention(a, b))
                print(f"{kind:9s} rho {rho}: true retention {truth:.3f}, {n:3d} images: coverage {np.mean(hits):.2f} "
                      f"of {len(hits)}, mean width {np.mean(widths):.3f}, mean estimate {np.nanmean(values):.3f}, "
                      f"{1000 * seconds / trials / channels:.2f} ms per channel")


def cost(per_class: int) -> None:
    import torch

    import featureshift
    from featureshift.data import make_synthetic_dataset, scan_image_folder, stratified_split
    from featureshift.metrics.driver import overview_layers
    from featureshift.metrics.probe import probe_stats

    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "data", classes=("stripes", "checkers", "dots", "rings"),
                                      per_class=per_class, size=96, seed=0)
        _, val = stratified_split(scan_image_folder(data).samples, 0.2, 0)
        paths = [p for p, _ in val]
        a = featureshift.open_network("squeezenet1_1", weights="imagenet").module
        b = copy.deepcopy(a)  # stands in for a fine-tuned snapshot
        with torch.no_grad():
            for p in b.parameters():
                p.add_(0.05 * p.std() * torch.randn_like(p))
        featureshift.attach_info(b, a.featureshift_info)
        channel_layers = ["features.7.expand3x3_activation", "features.11.squeeze_activation"]  # the demo's
        layers = sorted(set(overview_layers(a)) | set(channel_layers))
        start = time.perf_counter()
        sa = probe_stats(a, layers, paths, image_size=128, quiet=True)
        sb = probe_stats(b, layers, paths, image_size=128, quiet=True)
        probe = (time.perf_counter() - start) / 2
        start = time.perf_counter()
        boot = probe_bootstrap(len(paths), BATCH)
        for _ in range(5):  # the demo's five snapshots
            for layer in layers:
                cka_interval(sa.layers[layer].grams, sb.layers[layer].grams, boot)
            for layer in channel_layers:
                correlation_interval(sa.layers[layer].pooled, sb.layers[layer].pooled, boot)
        print(f"{len(paths)} probe images, {len(layers)} layers: probe pass {probe:.2f} s per snapshot, "
              f"intervals of 5 snapshots {time.perf_counter() - start:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["coverage", "retention", "cost"])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=36)
    args = ap.parse_args()
    {"coverage": lambda: coverage(args.trials), "retention": lambda: retention_coverage(args.trials),
     "cost": lambda: cost(args.per_class)}[args.what]()


if __name__ == "__main__":
    main()
