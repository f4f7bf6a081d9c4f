"""What the render-noise floors cost: the same work with and without them, and the ratio.

1. The demo: its run trained once, then its timeline, atlas and report on two copies of the
   run, one with the floors (the default) and one with --no-floor; the training time is
   added to both, as `make demo` pays it.
2. A 768-tile atlas (every channel of SqueezeNet's features.9 at two snapshots, the demo's
   render settings; the run of benchmarks/atlas_speed.py) and its report, with and without.

The two sides run one after the other on the same machine; on a machine shared with other
work the figures move with the load, so the script runs each side `--repeats` times,
alternating, and keeps each side's fastest.

    python benchmarks/floor_cost.py
    python benchmarks/floor_cost.py --skip-atlas --repeats 1
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from atlas_speed import make_run

from featureshift.commands.atlas import atlas
from featureshift.commands.demo import DEMO_ATLAS_LAYER, DEMO_ATLAS_RENDER, DEMO_LAYER, step_dataset, step_train
from featureshift.commands.report import build_report
from featureshift.commands.timeline import timeline


def demo_steps(run: Path, floor: bool) -> float:
    """The demo's steps after training, as `featureshift demo` runs them, on RUN."""
    start = time.perf_counter()
    timeline(run, DEMO_LAYER, 5, quiet=True)
    atlas(run, DEMO_ATLAS_LAYER, quiet=True, floor=floor, **DEMO_ATLAS_RENDER)
    build_report(run, quiet=True, floor=floor)
    return time.perf_counter() - start


def atlas_and_report(run: Path, floor: bool, layer: str) -> tuple[float, float]:
    start = time.perf_counter()
    atlas(run, layer, quiet=True, floor=floor, **DEMO_ATLAS_RENDER)
    mid = time.perf_counter()
    build_report(run, quiet=True, floor=floor)
    return mid - start, time.perf_counter() - mid


def fresh_copy(run: Path, to: Path) -> Path:
    """RUN without anything rendered or measured: snapshots, run.json and split only."""
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("timeline", "report", "metrics", "atlas.json"))
    return to


def side_by_side(name: str, without: float, with_floor: float) -> None:
    print(f"{name}: without floors {without:.1f} s, with floors {with_floor:.1f} s, "
          f"ratio {with_floor / without:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-atlas", action="store_true")
    ap.add_argument("--layer", default="features.9", help="the atlas's layer (features.9: 384 channels, 768 tiles)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fs-floor-bench-"))
    try:
        if not args.skip_demo:
            start = time.perf_counter()
            trained = step_train(root / "demo", step_dataset(root / "demo", quiet=True), quiet=True)
            train_s = time.perf_counter() - start
            best = {False: float("inf"), True: float("inf")}
            for _ in range(args.repeats):
                for floor in (False, True):
                    best[floor] = min(best[floor], demo_steps(fresh_copy(trained, root / f"demo-{floor}"), floor))
            print(f"demo: training {train_s:.1f} s (paid once by both sides)")
            side_by_side("demo after training (timeline, atlas, report)", best[False], best[True])
            side_by_side("demo in all (make demo)", train_s + best[False], train_s + best[True])
        if not args.skip_atlas:
            base = make_run(root / "atlas")
            best_atlas = {False: float("inf"), True: float("inf")}
            best_report = {False: float("inf"), True: float("inf")}
            for _ in range(args.repeats):
                for floor in (False, True):
                    a, r = atlas_and_report(fresh_copy(base, root / f"atlas-{floor}"), floor, args.layer)
                    best_atlas[floor], best_report[floor] = min(best_atlas[floor], a), min(best_report[floor], r)
            side_by_side(f"atlas of {args.layer} (768 tiles for features.9)", best_atlas[False], best_atlas[True])
            side_by_side("its report", best_report[False], best_report[True])
            side_by_side("atlas and report", best_atlas[False] + best_report[False],
                         best_atlas[True] + best_report[True])
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
