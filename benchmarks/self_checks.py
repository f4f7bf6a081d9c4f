"""The self-checks of rendered pictures (metrics/checks.py): what ordinary units score, what a
planted fooling unit scores, and what the checks cost a report.

    python benchmarks/self_checks.py ordinary [--channels 32] [--steps 64] [--size 128]
    python benchmarks/self_checks.py fooling [--steps 48] [--size 64]
    python benchmarks/self_checks.py cost RUN [--repeats 3]     # e.g. the demo's run folder

ordinary: the offline ImageNet SqueezeNet, CHANNELS evenly spaced channels of six layers from
the first Fire module to the last, rendered at the given settings; probe images: the 85 natural
photographs of tests/_fooling.py (scikit-image's and scikit-learn's samples, whole and in
quarters, 128 px). Prints, per layer, vs. data and views (min / median / max) and how far each
channel's vs. data is from its layer's other channels' median (the spread the threshold reads).
fooling: the planted circuit of tests/_fooling.py (a unit rewired to answer saturated magenta,
silent on every photograph), its run of two snapshots checked as `featureshift report` checks
it: every value of the rewired unit and of an ordinary unit of the same layer.
cost: `featureshift report RUN` with its renders and probe statistics cached, REPEATS times; the
seconds the self-checks took (summary.json) against the whole build.

docs/metrics.md ("Self-checks") quotes the figures.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featureshift.commands.report import build_report
from featureshift.metrics.checks import failed_checks, ratio, render_activations
from featureshift.metrics.driver import run_metrics
from featureshift.metrics.probe import probe_stats
from featureshift.network import open_network
from featureshift.optvis.engine import render

# the test's construction, so that the figures are those of the case the test checks
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _fooling import FOOLED, LAYER, ORDINARY, make_fooled_run, natural_images  # noqa: E402

LAYERS = ("features.3.squeeze_activation", "features.4.expand3x3_activation", "features.7.expand3x3_activation",
          "features.9.expand3x3_activation", "features.11.squeeze_activation", "features.12.expand3x3_activation")


def spread(values: np.ndarray) -> np.ndarray:
    """Each value over the median of the others (the quantity DATA_SPREAD bounds)."""
    return np.array([v / np.median(np.delete(values, i)) for i, v in enumerate(values)])


def ordinary(channels: int, steps: int, size: int) -> None:
    import torch

    model = open_network("squeezenet1_1", weights="imagenet").module
    with tempfile.TemporaryDirectory() as tmp:
        paths = natural_images(Path(tmp), 128)
        stats = probe_stats(model, LAYERS, paths, image_size=128, quiet=True)
    print(f"ordinary units: squeezenet1_1 (ImageNet weights), {channels} channels per layer, {steps} steps at "
          f"{size} px, seed 0; {len(paths)} natural probe images at 128 px", flush=True)
    every_vs, every_views, every_spread, every_failed = [], [], [], []
    for layer in LAYERS:
        count = stats.layers[layer].pooled.shape[1]
        chans = sorted({int(c) for c in np.linspace(0, count - 1, channels).round()})
        targets = [(layer, c) for c in chans]
        start = time.perf_counter()
        images = render(model, targets, steps=steps, size=size, seed=0, device="cpu", quiet=True).images
        seconds = time.perf_counter() - start
        images = [np.asarray(im, np.float32) / (255.0 if np.asarray(im).max() > 1.5 else 1.0) for im in images]
        start = time.perf_counter()
        with torch.no_grad():
            plain, seen = render_activations(model, targets, images)
        check = time.perf_counter() - start
        vs = np.array([ratio(plain[i], float(stats.layers[layer].pooled[:, c].max())) for i, c in enumerate(chans)])
        with np.errstate(invalid="ignore", divide="ignore"):
            views = np.where(plain > 0, seen / plain, np.nan)
        sp = spread(vs)
        failed = [failed_checks(v, w, None, float(np.median(np.delete(vs, i))))
                  for i, (v, w) in enumerate(zip(vs, views))]
        every_vs += list(vs)
        every_views += list(views)
        every_spread += list(sp)
        every_failed += [f for f in failed if f]
        print(f"  {layer:32s} {len(chans):3d} ch  vs. data {vs.min():6.2f} {np.median(vs):6.2f} {vs.max():7.2f}  "
              f"views {np.nanmin(views):.2f} {np.nanmedian(views):.2f} {np.nanmax(views):.2f}  spread max "
              f"{sp.max():5.2f}  doubtful {sum(1 for f in failed if f)} {[' '.join(f) for f in failed if f]}  "
              f"(render {seconds:.1f} s, checks {check:.2f} s)", flush=True)
    print(f"  all {len(every_vs)}: vs. data {min(every_vs):.2f}-{max(every_vs):.2f}, views from "
          f"{np.nanmin(every_views):.2f}, spread at most {max(every_spread):.2f}; {len(every_failed)} doubtful",
          flush=True)


def fooling(steps: int, size: int) -> None:
    import featureshift

    with tempfile.TemporaryDirectory() as tmp:
        run, planted = make_fooled_run(Path(tmp), image_size=size)
        tl = featureshift.timeline(run, LAYER, [FOOLED, ORDINARY], steps=steps, size=size, quiet=True)
        m = run_metrics(run, [LAYER], {LAYER: [FOOLED, ORDINARY]}, renders=tl.tiles, overview=[LAYER],
                        image_size=size, quiet=True, resamples=0)
    print(f"fooling: {LAYER} unit {FOOLED} rewired at epoch 1 (detector: channel {planted.detector} of features.0), "
          f"unit {ORDINARY} ordinary; {steps} steps at {size} px", flush=True)
    for t in sorted(m.checks, key=lambda t: (t.channel, t.epoch)):
        print(f"  unit {t.channel} epoch {t.epoch}: activation {t.activation:9.1f}  best photo {t.best_real:6.1f}  "
              f"vs. data {t.vs_data:8.2f}  views {t.views:.2f}  render kept {t.render_kept:.2f}  "
              f"data kept {t.data_kept:.2f}  -> {t.verdict} {' '.join(t.failed)}", flush=True)


def cost(run: Path, repeats: int) -> None:
    print(f"cost: featureshift report {run}, renders and probe statistics cached", flush=True)
    for _ in range(repeats):
        start = time.perf_counter()
        build_report(run, quiet=True)
        total = time.perf_counter() - start
        summary = json.loads((run / "metrics" / "summary.json").read_text())["self_checks"]
        with open(run / "metrics" / "checks.csv") as f:
            rows = list(csv.DictReader(f))
        print(f"  report {total:5.1f} s, self-checks {summary['seconds']:.2f} s for {summary['tiles']} tiles "
              f"({len(rows)} rows; {summary['doubtful']} doubtful: {summary['failed']})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("ordinary")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p = sub.add_parser("fooling")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--size", type=int, default=64)
    p = sub.add_parser("cost")
    p.add_argument("run", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.what == "ordinary":
        ordinary(args.channels, args.steps, args.size)
    elif args.what == "fooling":
        fooling(args.steps, args.size)
    else:
        cost(args.run, args.repeats)


if __name__ == "__main__":
    main()
