"""Atlas speed: every channel of SqueezeNet's features.9 (384) at the first and the last
snapshot of a run, with the demo's render settings, on this machine; then the report of
that atlas and the time to first paint of its layer page in Chromium (headless).

The run is the offline ImageNet SqueezeNet with a 3-class head, its later layers nudged
for the second snapshot as fine-tuning would; the atlas does not care how the weights came
about. The report needs probe images: a small synthetic textures dataset is made for it.

    python benchmarks/atlas_speed.py                        # the demo's settings, on the CPU
    python benchmarks/atlas_speed.py --steps 512 --size 128 --device cuda
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import featureshift
from featureshift.commands.atlas import atlas, format_duration
from featureshift.commands.demo import DEMO_ATLAS_RENDER
from featureshift.run import snapshot_path, write_run, write_split


def nudge(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("features.") and p.dim() == 4 and int(name.split(".")[1]) >= 6:
                p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))


def make_run(root: Path) -> Path:
    from featureshift.data import make_synthetic_dataset

    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    classes = ("stripes", "checkers", "dots")
    data = make_synthetic_dataset(root / "data", classes=classes, per_class=8, size=96, seed=0)
    samples = [(p, i) for i, c in enumerate(classes) for p in sorted((data / c).iterdir())]
    model = featureshift.open_network("squeezenet1_1", weights="imagenet", num_classes=3).module
    for epoch in (0, 1):
        if epoch:
            nudge(model, epoch)
        featureshift.save_snapshot(model, snapshot_path(run, epoch), epoch=epoch,
                                   metrics={"epoch": epoch, "val_acc": 0.33 + 0.3 * epoch})
    write_run(run, {"format": "featureshift.run/1", "status": "finished", "epochs_done": 1,
                    "config": {"model": "squeezenet1_1", "weights": "imagenet", "data": str(data), "epochs": 1},
                    "dataset": {"root": str(data), "classes": list(classes)}})
    write_split(run, list(classes), [], samples)
    return run


def first_paint(page_path: Path) -> float | None:
    """Milliseconds to the first paint of a page opened from disk in headless Chromium (None without one)."""
    import os

    exe = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                if p and os.path.isfile(p)), None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if exe is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        ms = page.evaluate("() => { const e = performance.getEntriesByName('first-contentful-paint')[0] || "
                           "performance.getEntriesByName('first-paint')[0]; return e ? e.startTime : null; }")
        browser.close()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="features.9")
    ap.add_argument("--steps", type=int, default=DEMO_ATLAS_RENDER["steps"])
    ap.add_argument("--size", type=int, default=DEMO_ATLAS_RENDER["size"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ray", help="render on Ray: auto, or a cluster's HOST:PORT")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--no-report", action="store_true", help="time the atlas only")
    ap.add_argument("--keep", help="Write the run here and keep it (default: a temporary folder).")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fs-atlas-bench-"))
    run = make_run(root)
    opts = dict(steps=args.steps, size=args.size, device=args.device, ray=args.ray)
    planned = atlas(run, args.layer, dry_run=True, quiet=True, **opts)
    start = time.perf_counter()
    result = atlas(run, args.layer, quiet=True, **opts)
    took = time.perf_counter() - start
    tiles = result.rendered
    print(f"atlas of {args.layer}: {sum(len(c) for c in result.channels.values())} channels x {len(result.epochs)} "
          f"snapshots = {tiles} tiles at {args.steps} steps, {args.size} px, {result.executor}: {took:.1f} s "
          f"({took / max(tiles, 1):.2f} s per tile); estimated beforehand: {format_duration(planned.estimate_s)}")
    start = time.perf_counter()
    again = atlas(run, args.layer, quiet=True, **opts)
    print(f"the same atlas again (everything cached): {time.perf_counter() - start:.1f} s, "
          f"{again.rendered} tiles rendered")
    if not args.no_report:
        from featureshift.commands.report import build_report
        from featureshift.report.site import layer_page

        start = time.perf_counter()
        index = build_report(run, quiet=True, device=args.device)
        print(f"report with the atlas: {time.perf_counter() - start:.1f} s")
        ms = first_paint(index.parent / layer_page(args.layer))
        print("layer page, first contentful paint in headless Chromium: "
              + ("not measured (Chromium or Playwright missing)" if ms is None else f"{ms:.0f} ms"))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
