"""`featureshift demo`: the whole tool on data it generates itself, with no download.

Each step is a function taking the demo folder and what earlier steps made; run_demo
calls them in order, so later capabilities add their step at the end.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

DEMO_CLASSES = ("stripes", "checkers", "dots", "rings")
DEMO_MODEL = "squeezenet1_1"  # the one network with ImageNet weights available offline
DEMO_CUTOFF = "features.5"  # the stem and the first two Fire modules stay as ImageNet trained them


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def step_dataset(out: Path, quiet: bool = False) -> Path:
    """A small textures dataset: 4 classes x 36 JPEGs of 96 px."""
    from ..data import make_synthetic_dataset

    _say(f"[demo] generating a textures dataset in {out / 'data'}", quiet)
    return make_synthetic_dataset(out / "data", classes=DEMO_CLASSES, per_class=36, size=96, seed=0)


def step_train(out: Path, data: Path, quiet: bool = False) -> Path:
    """Fine-tune ImageNet SqueezeNet for a few epochs, a snapshot after each."""
    from .train import train

    _say(f"[demo] fine-tuning {DEMO_MODEL} (ImageNet weights) with cutoff {DEMO_CUTOFF}", quiet)
    return train(data=str(data), model=DEMO_MODEL, weights="imagenet", epochs=4, batch_size=16, image_size=128,
                 cutoff=DEMO_CUTOFF, optimizer="adam", lr=1e-3, snapshot_every=1, seed=0,
                 out=str(out / "run"), force=True, quiet=quiet)


DEMO_LAYER = "features.7.expand3x3_activation"  # a middle layer, after the cutoff: it changes in training


def step_timeline(run: Path, quiet: bool = False):
    """The first channels of one middle layer on every snapshot: RUN/timeline/<layer>/merged.png."""
    from .timeline import timeline

    _say(f"[demo] rendering a timeline of {DEMO_LAYER}, channels 0-4, over every snapshot", quiet)
    result = timeline(run, DEMO_LAYER, 5, quiet=quiet)  # the default render settings
    _say(f"[demo] timeline: {result.merged[DEMO_LAYER]}", quiet)
    return result


DEMO_ATLAS_LAYER = "features.11.squeeze_activation"  # 64 channels, after the cutoff: the cheapest such layer
DEMO_ATLAS_RENDER = dict(steps=48, size=64)  # small renders: 128 tiles must fit the demo's time on two cores


def step_atlas(run: Path, quiet: bool = False):
    """Every channel of one layer before and after fine-tuning, into the tile cache the report reads."""
    from .atlas import atlas

    _say(f"[demo] rendering an atlas of {DEMO_ATLAS_LAYER}: all its channels, first and last snapshot", quiet)
    return atlas(run, DEMO_ATLAS_LAYER, quiet=quiet, **DEMO_ATLAS_RENDER)


def step_report(run: Path, quiet: bool = False) -> Path:
    """The HTML report: measures of change, dataset examples, a page per layer and channel."""
    from .report import build_report

    _say("[demo] measuring what changed and writing the HTML report (reuses the timeline's renders)", quiet)
    index = build_report(run, quiet=quiet)
    _say(f"[demo] report: {index}  (open it in a browser)", quiet)
    return index


def run_demo(out_dir: str | Path, quiet: bool = False) -> Path:
    """Run every demo step into out_dir; returns the report's index.html. Re-running replaces the previous demo."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = step_dataset(out, quiet)
    run = step_train(out, data, quiet)
    step_timeline(run, quiet)
    step_atlas(run, quiet)
    index = step_report(run, quiet)
    _say(f"[demo] done in {time.perf_counter() - start:.0f} s: run folder {run}", quiet)
    return index


demo = run_demo  # the API name of `featureshift demo`
