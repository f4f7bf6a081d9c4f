"""Timeline on Ray against the local executor: the 5-channel x 11-snapshot timeline of
timeline_speed.py, rendered locally and then on a Ray instance started on this machine.

Ray's start-up (ray.init, and a first task per worker, which starts its process, imports
torch and renders two steps, as the local side's throwaway render does) is reported apart
from the render itself; the tiles of both runs are compared
byte for byte. Then the costs docs/scale.md builds on: loading one snapshot, putting its
bytes in the object store, a Ray task's round trip, and encoding plus writing one tile.

    python benchmarks/ray_speed.py                      # CPU-sized defaults
    python benchmarks/ray_speed.py --steps 512 --size 128 --device cuda
    # a GPU's seconds per tile for docs/scale.md: full batches of GoogLeNet's inception5b
    python benchmarks/ray_speed.py --model googlenet --weights random --layer inception5b \
        --channels 1024 --snapshots 2 --steps 512 --size 128 --device cuda --repeat 1
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import featureshift
from featureshift.commands.timeline import timeline
from featureshift.run import snapshot_path
from timeline_speed import nudge, timeline_arguments  # the same snapshots and timeline as its benchmark


def tiles(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "timeline" / "cache").glob("*.png"))}


def best(f, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="squeezenet1_1")
    ap.add_argument("--weights", default="imagenet", help="imagenet or random (offline for any model)")
    timeline_arguments(ap)
    ap.add_argument("--cpus", type=int, help="CPUs of the Ray instance (default: this machine's)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, alternating (default 2)")
    ap.add_argument("--threads", type=int, help="torch CPU threads here and in each Ray worker "
                    "(default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="fs-ray-bench-"))
    try:
        local_run, ray_run = root / "local", root / "ray"
        model = featureshift.open_network(args.model, weights=args.weights, num_classes=3).module
        for epoch in range(args.snapshots):
            nudge(model, epoch)
            featureshift.save_snapshot(model, snapshot_path(local_run, epoch), epoch=epoch)
        shutil.copytree(local_run / "snapshots", ray_run / "snapshots")
        opts = dict(steps=args.steps, size=args.size, device=args.device, precision=args.precision, quiet=True)
        from featureshift.optvis.engine import render
        render(model, [(args.layer, 0)], steps=2, size=args.size, device=args.device, quiet=True)

        import ray

        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        init_s = time.perf_counter() - t

        def warm(threads: int) -> int:
            # A worker's one-time costs (imports, the first render's kernel set-up), as the
            # throwaway render above pays them here.
            import torch

            from featureshift.optvis.engine import render

            torch.set_num_threads(threads)
            net = featureshift.open_network(args.model, weights="random", num_classes=3).module
            render(net, [(args.layer, 0)], steps=2, size=args.size, device=args.device, quiet=True)
            return 0

        t = time.perf_counter()
        gpus = int(ray.cluster_resources().get("GPU", 0)) if args.device != "cpu" else 0
        if gpus:  # the executor's GPU tasks
            warm_task, workers = ray.remote(num_gpus=1, num_cpus=1)(warm), gpus
        else:
            warm_task = ray.remote(num_cpus=torch.get_num_threads())(warm)
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // torch.get_num_threads())
        ray.get([warm_task.remote(torch.get_num_threads()) for _ in range(workers)])
        worker_s = time.perf_counter() - t

        # Local and Ray alternate, and each keeps its best time: on a machine shared with other
        # work the load changes from minute to minute, and alternating spreads it over both.
        local_times, ray_times = [], []
        for i in range(args.repeat):
            t = time.perf_counter()
            local = timeline(local_run, args.layer, args.channels, force=i > 0, **opts)
            local_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            on_ray = timeline(ray_run, args.layer, args.channels, ray="auto", force=i > 0, **opts)
            ray_times.append(time.perf_counter() - t)
        local_s, ray_s = min(local_times), min(ray_times)
        same = tiles(local_run) == tiles(ray_run)

        # The parts of one tile's and one snapshot's cost.
        snap = snapshot_path(local_run, 0)
        data = snap.read_bytes()
        load_s = best(lambda: featureshift.open_network(snap))
        from_bytes_s = best(lambda: featureshift.open_network(snap, data=data))
        put_s = best(lambda: ray.put(data))
        noop = ray.remote(lambda: None)
        ray.get(noop.remote())
        trip_s = best(lambda: ray.get(noop.remote()), n=20)
        from featureshift.jobs.cache import TileCache, read_tile
        some_tile = next(iter(local.tiles.values()))
        image, about = read_tile(some_tile)
        cache = TileCache(root / "scratch")
        write_s = best(lambda: cache.write("x", image, about), n=20)
        import io

        from featureshift.io import png_text
        from featureshift.jobs.cache import TILE_TEXT_KEY
        encode_s = best(lambda: image.save(io.BytesIO(), format="PNG", pnginfo=png_text(TILE_TEXT_KEY, about)), n=20)
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = local.rendered
    print(f"timeline {args.model} {args.layer}, {args.channels} channels x {args.snapshots} snapshots, steps {args.steps}, "
          f"size {args.size}, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"  local:               {local_s:8.2f} s  ({n} tiles, {local_s / n:.3f} s per tile; best of "
          f"{', '.join(f'{x:.1f}' for x in local_times)})")
    print(f"  Ray start-up:        {init_s:8.2f} s ray.init + {worker_s:.2f} s starting workers")
    print(f"  Ray render:          {ray_s:8.2f} s  ({on_ray.rendered} tiles, {ray_s / max(on_ray.rendered, 1):.3f} "
          f"s per tile; best of {', '.join(f'{x:.1f}' for x in ray_times)})")
    print(f"  ratio Ray / local:   {ray_s / local_s:8.3f}  (start-up excluded; "
          f"{(ray_s + init_s + worker_s) / local_s:.3f} with it)")
    print(f"  tiles byte-identical: {same}")
    print(f"  per snapshot: load from disk {1000 * load_s:.1f} ms, from bytes {1000 * from_bytes_s:.1f} ms, "
          f"ray.put {1000 * put_s:.1f} ms ({len(data) / 1e6:.1f} MB)")
    print(f"  per task: Ray round trip {1000 * trip_s:.2f} ms; per tile ({args.size} px): PNG encode "
          f"{1000 * encode_s:.2f} ms, encode + atomic write {1000 * write_s:.2f} ms")


if __name__ == "__main__":
    main()
