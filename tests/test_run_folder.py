"""A new run's folder, before training writes it: which folder, which runs in it are refused,
which start again, and what --force removes (featureshift.run). Hand-written run.json files:
no training needed."""
from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from featureshift.errors import FeatureshiftError
from featureshift.run import (METRICS_FILE, RUN_FILE, SPLIT_FILE, STATE_FILE, choose_run_dir, clear_run,
                              default_run_dir, refuse_if_training, restartable, snapshot_path, write_run)


def a_run(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    run = {"status": "finished", "epochs_done": 3, "model": {"arch": "squeezenet1_1"},
           "dataset": {"root": "/data/digits"}, **fields}
    write_run(folder, run)
    return run


def test_a_folder_without_a_run_is_taken_as_it_is(tmp_path):
    assert choose_run_dir(str(tmp_path / "new"), "squeezenet1_1", str(tmp_path / "data"), force=False).path == \
        tmp_path / "new"


def test_without_out_each_run_gets_a_folder_named_by_model_data_and_time(tmp_path):
    path = default_run_dir("models/squeezenet1_1.safetensors", str(tmp_path / "digits"))
    assert path.parent.name == "runs"
    assert re.fullmatch(r"squeezenet1_1-digits-\d{8}-\d{6}", path.name), path.name


def test_a_folder_holding_a_finished_run_is_refused_unless_forced(tmp_path):
    a_run(tmp_path / "out")
    with pytest.raises(FeatureshiftError, match=r"already holds a training run \(squeezenet1_1 on /data/digits, "
                                                r"3 epochs, finished\).*--resume.*--force"):
        choose_run_dir(str(tmp_path / "out"), "squeezenet1_1", str(tmp_path / "data"), force=False)
    chosen = choose_run_dir(str(tmp_path / "out"), "squeezenet1_1", str(tmp_path / "data"), force=True)
    assert chosen.path == tmp_path / "out" and chosen.restarting is None


def test_a_run_that_never_finished_an_epoch_starts_again_until_it_has_a_trained_snapshot(tmp_path):
    out = tmp_path / "out"
    a_run(out, status="failed", epochs_done=0)
    assert restartable(out)
    chosen = choose_run_dir(str(out), "squeezenet1_1", str(tmp_path / "data"), force=False)
    assert chosen.path == out and chosen.restarting == "failed"
    snapshot_path(out, 1).parent.mkdir()
    snapshot_path(out, 1).write_bytes(b"")  # a trained snapshot: there is more to lose than the untrained network
    assert not restartable(out)
    with pytest.raises(FeatureshiftError, match="already holds a training run"):
        choose_run_dir(str(out), "squeezenet1_1", str(tmp_path / "data"), force=False)


def test_out_inside_the_data_or_a_file_is_refused(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(FeatureshiftError, match="inside the dataset folder"):
        choose_run_dir(str(data / "run"), "squeezenet1_1", str(data), force=True)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FeatureshiftError, match="is a file; give a folder"):
        choose_run_dir(str(tmp_path / "a_file"), "squeezenet1_1", str(data), force=True)


def test_clear_run_removes_only_what_featureshift_wrote(tmp_path):
    out = tmp_path / "out"
    a_run(out)
    for name in (METRICS_FILE, SPLIT_FILE, STATE_FILE, "notes.txt"):
        (out / name).write_text("")
    snapshot_path(out, 0).parent.mkdir()
    for p in (snapshot_path(out, 0), snapshot_path(out, 2), snapshot_path(out, 0).parent / "readme.txt"):
        p.write_bytes(b"")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events").write_text("")
    clear_run(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["notes.txt", "snapshots", "snapshots/readme.txt"]
    assert not (out / RUN_FILE).exists()


def test_a_run_that_a_live_process_is_training_is_not_replaced_even_by_force(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = a_run(tmp_path / "out", status="running", epochs_done=0,
                    trainer={"pid": other.pid, "host": socket.gethostname()})
        with pytest.raises(FeatureshiftError, match=f"being trained right now by process {other.pid}; "
                                                    "--force replacing it would write"):
            choose_run_dir(str(tmp_path / "out"), "squeezenet1_1", str(tmp_path / "data"), force=True)
        refuse_if_training({**run, "status": "finished"}, tmp_path / "out", "resuming it")  # not running: no refusal
    finally:
        other.kill()
        other.wait()
