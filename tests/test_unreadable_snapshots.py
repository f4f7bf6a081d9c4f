"""A snapshot truncated after training (an interrupted copy, a full disk of another tool): what
timeline, atlas and train --resume tell the user, on which stream, and with which exit status.

The run is trained for real on a few of scikit-learn's handwritten digits and the snapshot file
is really cut short, as a user would meet it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from featureshift.cli import main
from featureshift.run import snapshot_path, unreadable_snapshots
from featureshift.snapshot import read_meta

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LAYER = "features.3.squeeze"
RENDER = ["--steps", "2", "--size", "32", "--batch-size", "16"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Epochs 0-3 of SqueezeNet on 60 digits, trained by the command a user types."""
    from _digits import export_digits

    root = tmp_path_factory.mktemp("unreadable")
    data = export_digits(root / "digits", per_class=6)
    out = root / "run"
    r = CliRunner().invoke(main, ["train", "--model", "squeezenet1_1", "--weights", "imagenet", "--data", str(data),
                                  "--epochs", "3", "--image-size", "32", "--batch-size", "16", "--workers", "0",
                                  "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def truncated_copy(run: Path, tmp_path: Path, epoch: int) -> Path:
    """A copy of RUN whose snapshot of EPOCH lost the second half of its bytes."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = snapshot_path(copy, epoch)
    os.truncate(path, path.stat().st_size // 2)
    return copy


def test_a_truncated_snapshot_is_found_by_its_header(trained, tmp_path):
    run = truncated_copy(trained, tmp_path, 1)
    found = unreadable_snapshots(run)
    assert [(s.epoch, s.path.name) for s in found] == [(1, "001.safetensors")]
    assert "001.safetensors" in found[0].why and "truncated" in found[0].why
    assert unreadable_snapshots(trained) == []


def test_timeline_writes_the_other_rows_names_the_file_on_stderr_and_exits_2(trained, tmp_path):
    run = truncated_copy(trained, tmp_path, 1)
    args = ["timeline", str(run), "--layer", LAYER, "--channels", "0-1", *RENDER, "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert "missing" not in r.stdout and "001.safetensors" not in r.stdout  # stdout: the result only
    assert r.stderr.startswith("featureshift: error: ") and r.stderr.count("\n") == 1, r.stderr
    for part in ("1 snapshot could not be read", str(snapshot_path(run, 1)), "truncated", "marks its row missing",
                 "restore the file", "--snapshots 0,2-3"):
        assert part in r.stderr, (part, r.stderr)
    folder = run / "timeline" / LAYER
    assert (folder / "merged.png").is_file()
    assert sorted(p.name for p in folder.glob("0*.png")) == ["000.png", "002.png", "003.png"]

    # What the message proposes works, and renders nothing again.
    r = CliRunner().invoke(main, args + ["--snapshots", "0,2-3"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert "0 tile(s) rendered, 6 from the cache" in r.stdout


def test_atlas_leaves_the_epoch_out_names_the_file_on_stderr_and_exits_2(trained, tmp_path):
    run = truncated_copy(trained, tmp_path, 1)
    args = ["atlas", str(run), "--layer", LAYER, "--channels", "0-1", "--snapshots", "all", *RENDER, "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert "001.safetensors" not in r.stdout and "6 tile(s) rendered" in r.stdout
    assert r.stderr.startswith("featureshift: error: ") and r.stderr.count("\n") == 1, r.stderr
    for part in ("leaves out epoch 1", str(snapshot_path(run, 1)), "--snapshots 0,2-3"):
        assert part in r.stderr, (part, r.stderr)
    assert (run / "atlas.json").is_file()
    r = CliRunner().invoke(main, args[:-len(RENDER) - 3] + ["--snapshots", "0,2-3", *RENDER, "--quiet"])
    assert r.exit_code == 0 and r.stderr == "", r.output


def test_atlas_prints_its_plan_once_on_stderr_or_with_dry_run_on_stdout(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ["atlas", str(run), "--layer", LAYER, "--channels", "0-1", *RENDER]
    r = CliRunner().invoke(main, args + ["--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.stdout.count("4 to render") == 1 and "to render" not in r.stderr
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert r.stderr.count("4 to render") == 1 and "to render" not in r.stdout  # progress on stderr
    assert "4 tile(s) rendered" in r.stdout


def test_resume_warns_about_a_truncated_snapshot_and_says_what_becomes_of_it(trained, tmp_path):
    run = truncated_copy(trained, tmp_path, 1)
    # A later snapshot, damaged too, from beyond the epoch train_state.pt holds: training writes it again.
    shutil.copy(snapshot_path(run, 3), snapshot_path(run, 4))
    os.truncate(snapshot_path(run, 4), 100)
    r = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "4", "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(run)
    warnings = [line for line in r.stderr.splitlines() if line.startswith("featureshift: warning: ")]
    assert len(warnings) == 2 and len(r.stderr.splitlines()) == 2, r.stderr
    old, new = warnings
    for part in (str(snapshot_path(run, 1)), "truncated", "does not write it again", "leave epoch 1 out",
                 "Restore the file"):
        assert part in old, (part, old)
    assert str(snapshot_path(run, 4)) in new and "writes it again when it reaches epoch 4" in new
    assert read_meta(snapshot_path(run, 4)).epoch == 4
    assert [s.epoch for s in unreadable_snapshots(run)] == [1]
