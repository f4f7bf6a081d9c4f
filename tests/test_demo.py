"""`make demo` as a user runs it: one real process, offline, ending in the report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_fine_tunes_renders_and_writes_the_report(tmp_path):
    # (the tests' FEATURESHIFT_CACHE, set in conftest.py, is inherited: the offline weights convert once)
    r = subprocess.run([sys.executable, "-m", "featureshift", "demo", "--out", str(tmp_path / "demo"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --quiet
    index = Path(r.stdout.strip())  # the one line printed: the report to open
    assert index == tmp_path / "demo" / "run" / "report" / "index.html" and index.is_file()
    run = index.parent.parent
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [f"{e:03d}.safetensors" for e in range(5)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # ImageNet features fine-tuned on four texture classes: far better than chance after four epochs
    assert rows[-1]["epoch"] == 4 and rows[-1]["val_acc"] >= 0.6 > rows[0]["val_acc"]
    assert (run / "timeline" / "features.7.expand3x3_activation" / "merged.png").is_file()
    assert "features.7.expand3x3_activation" in index.read_text()
