"""Start-up time of the command line: `featureshift --help` against a bare `python -c pass`
and against the old behaviour of loading torch first (what `import featureshift` used to do).

    python benchmarks/startup_speed.py            # 10 runs of each, median wall time
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    py = sys.executable
    bare = median_seconds([py, "-c", "pass"], args.runs)
    cases = {
        "featureshift --help": [py, "-m", "featureshift", "--help"],
        "featureshift vis --help": [py, "-m", "featureshift", "vis", "--help"],
        "featureshift --version": [py, "-m", "featureshift", "--version"],
        "import torch, torchvision (the old start-up)": [py, "-c", "import torch, torchvision"],
    }
    print(f"python -c pass: {bare * 1000:.0f} ms (median of {args.runs})")
    for name, argv in cases.items():
        t = median_seconds(argv, args.runs)
        print(f"{name}: {t * 1000:.0f} ms, {t / bare:.1f}x a bare interpreter")


if __name__ == "__main__":
    main()
