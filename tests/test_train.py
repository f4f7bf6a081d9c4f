import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import featureshift
from featureshift import FeatureshiftError, read_meta
from featureshift.training.config import TrainConfig, make_config
from featureshift.training.cutoff import plan_cutoff
from featureshift.commands.train import train
from featureshift.data import make_synthetic_dataset
from featureshift.run import (list_snapshots, probe_samples, read_metrics, read_run, read_split, snapshot_path,
                             write_metrics, write_run)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "textures", per_class=6, size=40)


def fit(data, out, **kw):
    opts = dict(data=str(data), model="squeezenet1_1", weights="imagenet", epochs=2, batch_size=8, image_size=48,
                workers=0, quiet=True, out=str(out))
    opts.update(kw)
    return train(**opts)


def without_time(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_snapshots_before_training_and_every_k(data, tmp_path):
    run = fit(data, tmp_path / "run", epochs=3, snapshot_every=2, cutoff=3)
    assert [e for e, _ in list_snapshots(run)] == [0, 2, 3]  # 0, every 2nd, and the last
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rows[0]["train_loss"] is None
    assert all(0 <= r["val_acc"] <= 1 and r["val_loss"] > 0 for r in rows)
    assert all(r["train_loss"] > 0 and r["lr"] == 1e-3 for r in rows[1:])
    metas = [read_meta(p) for _, p in list_snapshots(run)]
    assert [m.epoch for m in metas] == [0, 2, 3]
    assert metas[1].metrics == rows[2] and metas[2].metrics == rows[3]
    assert metas[0].parent is None and metas[1].parent == metas[0].checksum and metas[2].parent == metas[1].checksum
    assert metas[2].info.class_names == ["checkers", "dots", "stripes"] and metas[2].info.num_classes == 3
    assert metas[2].config["cutoff"] == 3 and metas[2].config["data"] == str(data)
    info = read_run(run)
    assert info["status"] == "finished" and info["epochs_done"] == 3
    assert info["dataset"]["counts"]["dots"] == {"train": 5, "val": 1}
    assert info["versions"]["torch"] == torch.__version__
    model = featureshift.open_network(snapshot_path(run, 3)).module
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 3)
    assert len(probe_samples(run)) == 3


def test_frozen_layers_stay_bit_identical(data, tmp_path):
    # resnet18 has batch norm: frozen ones must keep their running statistics too
    run = fit(data, tmp_path / "run", model="resnet18", weights="random", cutoff="layer2", epochs=1, image_size=32)
    first, last = (load_file(str(p)) for p in (snapshot_path(run, 0), snapshot_path(run, 1)))
    frozen = read_run(run)["cutoff"]["frozen"]
    assert frozen[0] == "conv1" and frozen[-1] == "layer2.1.bn2"
    for k in first:
        module = k.rsplit(".", 1)[0]
        if module in frozen:
            assert torch.equal(first[k], last[k]), k
        elif k.endswith(("weight", "running_mean")) and module.startswith(("layer3", "layer4", "fc")):
            assert not torch.equal(first[k], last[k]), k


def test_cutoff_by_count_and_by_name():
    model = featureshift.open_network("squeezenet1_1", weights="random").module
    plan = plan_cutoff(model, 4, 64)
    assert plan.frozen == ["features.0", "features.3.squeeze", "features.3.expand1x1", "features.3.expand3x3"]
    assert plan_cutoff(model, "features.3", 64).frozen == plan.frozen
    assert plan_cutoff(model, "features.3.expand1x1_activation", 64).frozen == plan.frozen[:3]
    assert plan_cutoff(model, None, 64).frozen == []
    assert "frozen" in plan.table(4) and "trainable" in plan.table(4)
    with pytest.raises(FeatureshiftError, match="Did you mean.*features.3"):
        plan_cutoff(model, "features.3.squeze", 64)
    with pytest.raises(FeatureshiftError, match="more than the 26"):
        plan_cutoff(model, 99, 64)


@pytest.mark.slow  # test-fast stays under a minute: trains, spawns or builds a large network
def test_the_number_of_workers_does_not_change_the_result(data, tmp_path):
    # Augmentation is seeded per sample from the main process, so a run is reproducible on
    # another machine with another default worker count.
    opts = dict(epochs=1, augment=True, cutoff="features.5")
    runs = [fit(data, tmp_path / f"w{w}", workers=w, **opts) for w in (0, 2)]
    assert without_time(read_metrics(runs[0])) == without_time(read_metrics(runs[1]))
    assert read_meta(snapshot_path(runs[0], 1)).checksum == read_meta(snapshot_path(runs[1], 1)).checksum


class Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(data, tmp_path):
    opts = dict(epochs=3, schedule="cosine", workers=1, augment=True, cutoff="features.5")
    whole = fit(data, tmp_path / "whole", **opts)

    def kill_after_2(epoch, row):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        fit(data, tmp_path / "cut", on_epoch_end=kill_after_2, **opts)
    cut = tmp_path / "cut"
    assert read_run(cut)["status"] == "failed" and read_run(cut)["epochs_done"] == 2
    # a kill during epoch 3 may leave its row half-done: resume rewrites the log from the state
    (cut / "metrics.jsonl").write_text((cut / "metrics.jsonl").read_text() + '{"epoch": 3, "train_lo')
    train(resume=str(cut), quiet=True)
    assert without_time(read_metrics(cut)) == without_time(read_metrics(whole))
    assert read_meta(snapshot_path(cut, 3)).checksum == read_meta(snapshot_path(whole, 3)).checksum
    assert read_split(cut) == read_split(whole)  # the seeded split: identical across runs and on resume
    assert read_run(cut)["status"] == "finished" and len(read_run(cut)["sessions"]) == 2

    # a finished run extends to more epochs; its snapshot chain continues
    train(resume=str(cut), epochs=4, quiet=True)
    assert read_meta(snapshot_path(cut, 4)).parent == read_meta(snapshot_path(cut, 3)).checksum
    with pytest.raises(FeatureshiftError, match="already trained 4 epochs"):
        train(resume=str(cut), epochs=2)
    with pytest.raises(FeatureshiftError, match="'lr' was 0.001 and cannot change"):
        train(resume=str(cut), lr=0.1)


def test_epochs_zero_saves_only_the_original_network(data, tmp_path):
    run = fit(data, tmp_path / "run", epochs=0, model="resnet18", weights="random", image_size=32)
    assert [e for e, _ in list_snapshots(run)] == [0]
    assert [r["epoch"] for r in read_metrics(run)] == [0]
    meta = featureshift.open_network(snapshot_path(run, 0)).meta
    assert meta.info.weights == "random" and meta.info.num_classes == 3


def test_odd_files_and_names_are_handled(data, tmp_path):
    root = tmp_path / "odd"
    for name, src in (("a b", "checkers"), ("ünï", "dots"), ("<b>&amp;", "stripes")):
        shutil.copytree(data / src, root / name)
    (root / "a b" / "zero.jpg").write_bytes(b"")
    (root / "ünï" / "README.md").write_text("not an image")
    jpg = (root / "a b" / "checkers_000.jpg").read_bytes()
    (root / "a b" / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    Image.open(root / "ünï" / "dots_000.jpg").convert("CMYK").save(root / "ünï" / "cmyk.jpg")
    Image.open(root / "ünï" / "dots_001.jpg").convert("L").save(root / "ünï" / "gray.png")
    Image.open(root / "ünï" / "dots_002.jpg").convert("RGBA").save(root / "ünï" / "alpha.png")
    Image.open(root / "ünï" / "dots_003.jpg").convert("I;16").save(root / "ünï" / "sixteen.png")
    run = fit(root, tmp_path / "run", epochs=1)
    info = read_run(run)
    assert info["dataset"]["classes"] == ["<b>&amp;", "a b", "ünï"]
    assert read_meta(snapshot_path(run, 1)).info.class_names == ["<b>&amp;", "a b", "ünï"]
    skipped = {s["path"].rsplit("/", 1)[-1] for s in info["dataset"]["skipped"]}
    assert skipped == {"zero.jpg", "README.md", "cut.jpg"} and info["dataset"]["skipped_count"] == 3
    assert sum(c["train"] + c["val"] for c in info["dataset"]["counts"].values()) == 18 + 4


def test_bad_input_errors_before_anything_is_written(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    single = tmp_path / "single"
    shutil.copytree(data / "dots", single / "dots")
    cases = [
        (dict(data=str(tmp_path / "nope")), "does not exist"),
        (dict(data=str(empty)), "no class sub-folders"),
        (dict(data=str(single)), "single class"),
        (dict(optimizer="adan"), "Did you mean: adam"),
        (dict(cutoff="features.99"), "not a layer"),
        (dict(lr=0), "above 0"),
        (dict(val_fraction=1.5), "below 1"),
        (dict(model="resnet1"), "Unknown model"),
        (dict(out=str(data / "run")), "inside the dataset"),
    ]
    for kw, msg in cases:
        out = tmp_path / "out"
        with pytest.raises(FeatureshiftError, match=msg):
            fit(kw.pop("data", data), kw.pop("out", out), **kw)
        assert not out.exists(), kw
    with pytest.raises(FeatureshiftError, match="Unknown training option 'epoch'.*epochs"):
        train(data=str(data), epoch=3)


def test_out_holding_a_run_is_refused_unless_force(data, tmp_path):
    run = fit(data, tmp_path / "run", epochs=0)
    before = snapshot_path(run, 0).read_bytes()
    with pytest.raises(FeatureshiftError, match="already holds a training run.*--resume.*--force"):
        fit(data, run, epochs=1)
    assert snapshot_path(run, 0).read_bytes() == before and read_run(run)["epochs_done"] == 0
    fit(data, run, epochs=1, force=True, seed=1)
    assert read_run(run)["config"]["seed"] == 1 and [e for e, _ in list_snapshots(run)] == [0, 1]


def test_tensorboard_missing_is_a_clear_error(data, tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(FeatureshiftError, match="pip install 'featureshift\\[tensorboard\\]'"):
        fit(data, tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()


def test_config_file_and_flags(tmp_path):
    (tmp_path / "run.toml").write_text('data = "imgs"\nepochs = 7\nbatch-size = 4\noptimizer = "sgd"\ncutoff = "12"\n')
    cfg = make_config(tmp_path / "run.toml", epochs=2)
    assert (cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.cutoff) == (2, 4, "sgd", 12)
    assert cfg.data == str(tmp_path / "imgs")  # relative to the file
    assert TrainConfig().model == "googlenet"
    (tmp_path / "bad.toml").write_text("lr = 0.1\nlearning_rate = 3\n")
    with pytest.raises(FeatureshiftError, match="Unknown training option 'learning_rate'"):
        make_config(tmp_path / "bad.toml")


def test_cli_end_to_end(data, tmp_path):
    from featureshift.cli import main

    (tmp_path / "run.toml").write_text(
        f'[train]\ndata = "{data}"\nmodel = "squeezenet1_1"\nepochs = 5\nbatch_size = 8\nimage_size = 48\n'
        'optimizer = "sgd"\nnesterov = true\nschedule = "step"\nstep_size = 1\ngamma = 0.5\n')
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "run.toml"), "--epochs", "2", "--out", str(out),
                                  "--cutoff", "features.3", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    assert "frozen" in r.stderr and "epoch   2/2" in r.stderr  # the table and per-epoch lines
    cfg = read_run(out)["config"]
    assert (cfg["epochs"], cfg["optimizer"], cfg["nesterov"], cfg["cutoff"]) == (2, "sgd", True, "features.3")
    assert [r["lr"] for r in read_metrics(out)[1:]] == [0.001, 0.0005]
    r = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out)])
    assert r.exit_code == 2 and "already holds a training run" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "--resume", str(out), "--quiet"])
    assert r.exit_code == 0 and "nothing to do" not in r.output


def test_gpu_out_of_memory_suggests_a_smaller_batch(data, tmp_path):
    def oom(epoch, row):
        if epoch == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(FeatureshiftError, match="--batch-size 4"):
        fit(data, tmp_path / "run", on_epoch_end=oom)
    assert read_run(tmp_path / "run")["status"] == "failed"
    train(resume=str(tmp_path / "run"), batch_size=4, quiet=True)  # the batch size may change on resume
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_separate_validation_folder(data, tmp_path):
    val = tmp_path / "val"
    for c in ("dots", "stripes"):
        (val / c).mkdir(parents=True)
        for p in sorted((data / c).iterdir())[:2]:
            shutil.copy(p, val / c / p.name)
    run = fit(data, tmp_path / "run", val=str(val), epochs=1)
    ds = read_run(run)["dataset"]
    assert ds["split"] == "folder" and ds["train_images"] == 18 and ds["val_images"] == 4
    assert ds["counts"]["checkers"] == {"train": 6, "val": 0} and ds["counts"]["dots"] == {"train": 6, "val": 2}
    assert {p.parent.parent for p, _ in probe_samples(run)} == {val}
    (val / "cats").mkdir()
    with pytest.raises(FeatureshiftError, match="'cats' that the training data does not have"):
        fit(data, tmp_path / "run2", val=str(val), epochs=1)


@pytest.mark.slow
def test_a_run_being_trained_is_not_written_twice_and_a_killed_one_says_so(data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from featureshift.run import describe_status

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "featureshift", "train", "--data", str(data), "--model", "squeezenet1_1",
           "--epochs", "500", "--batch-size", "8", "--image-size", "32", "--workers", "0", "--quiet",
           "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "run.json").is_file() or read_run(run).get("epochs_done", 0) < 1:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "training did not get going"
            time.sleep(0.2)
        assert describe_status(read_run(run)) == f"running (process {proc.pid})"
        for extra in (["--resume", str(run)], [*cmd[4:], "--force"]):
            r = subprocess.run([sys.executable, "-m", "featureshift", "train", *extra],
                               capture_output=True, text=True)
            assert r.returncode == 2 and f"being trained right now by process {proc.pid}" in r.stderr
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to record anything
        proc.wait()
    info = read_run(run)
    assert info["status"] == "running" and describe_status(info).startswith("stopped unexpectedly")
    done = info["epochs_done"]
    train(resume=str(run), epochs=done + 1, quiet=True)
    assert read_run(run)["status"] == "finished" and read_run(run)["epochs_done"] == done + 1


def test_resume_after_a_kill_between_the_state_and_the_log(data, tmp_path):
    # The state of epoch 2 was saved, then the process died before metrics.jsonl and run.json caught up.
    run = fit(data, tmp_path / "run", epochs=2, cutoff="features.5")
    rows = read_metrics(run)
    info = read_run(run)
    info.update(status="running", epochs_done=1)
    write_run(run, info)
    write_metrics(run, rows[:2])
    train(resume=str(run), epochs=2, quiet=True)  # nothing left to train, but the books are put right
    assert read_run(run)["status"] == "finished" and read_run(run)["epochs_done"] == 2
    assert read_metrics(run) == rows


@pytest.mark.slow
def test_a_run_that_cannot_train_fails_before_writing_anything(data, tmp_path):
    # batch norm cannot train on one image whose last maps are 1x1: found by a training step up front
    out = tmp_path / "run"
    with pytest.raises(FeatureshiftError, match="could not train on 32 px images"):
        fit(data, out, model="resnet18", weights="random", image_size=32, batch_size=1)
    assert not out.exists()
    fit(data, out, model="resnet18", weights="random", image_size=32, batch_size=2, epochs=1)  # the retry
    assert read_run(out)["status"] == "finished"


def test_the_training_step_up_front_leaves_no_trace(data):
    from featureshift.training.cutoff import plan_cutoff
    from featureshift.training.precheck import check_training_step, first_batch

    model = featureshift.open_network("resnet18", weights="random", num_classes=3).module
    info = featureshift.model_info(model)
    samples = [(p, 0) for p in sorted((data / "dots").iterdir())]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.eval()
    check_training_step(model, first_batch(samples, info, 32, 4), info=info, plan=plan_cutoff(model, None, 32),
                        criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_a_run_that_never_finished_an_epoch_starts_again_with_the_same_command(data, tmp_path):
    import json

    def fail_at_0(epoch, row):
        if epoch == 0:
            raise Killed

    run = tmp_path / "run"
    with pytest.raises(Killed):
        fit(data, run, on_epoch_end=fail_at_0)
    assert read_run(run)["status"] == "failed" and [e for e, _ in list_snapshots(run)] == [0]
    fit(data, run)  # no --force needed: nothing was trained
    assert read_run(run)["status"] == "finished" and [e for e, _ in list_snapshots(run)] == [0, 1, 2]
    assert len(read_run(run)["sessions"]) == 1

    # a killed process (status still "running", its process gone) is started again too
    info = read_run(run)
    info.update(status="running", epochs_done=0, trainer={"pid": 2**22 + 12345, "host": info["trainer"]["host"]})
    for p in (run / "snapshots").glob("00[12].safetensors"):
        p.unlink()
    (run / "run.json").write_text(json.dumps(info))
    fit(data, run, epochs=1)
    assert read_run(run)["epochs_done"] == 1

    # once an epoch is trained, the run is kept: resume it or --force
    def fail_at_2(epoch, row):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        fit(data, run, force=True, on_epoch_end=fail_at_2)
    with pytest.raises(FeatureshiftError, match="already holds a training run"):
        fit(data, run)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return fit(data, tmp_path_factory.mktemp("whole") / "run", epochs=3, cutoff="features.5")


# Each case trains the run twice; the first two answer the two ways out (resume, or run again),
# the rest are left to `make test`.
@pytest.mark.parametrize("name, nth, code", [
    ("train_state.pt", 3, "ENOSPC"),  # epochs 0, 1, 2
    ("split.json", 1, "ENOSPC"),  # before anything is saved
    pytest.param("002.safetensors", 1, "ENOSPC", marks=pytest.mark.slow),
    pytest.param("metrics.jsonl", 3, "EDQUOT", marks=pytest.mark.slow),
    pytest.param("run.json", 4, "EROFS", marks=pytest.mark.slow),  # at the start, then epochs 0, 1, 2
])
def test_a_full_disk_stops_training_with_a_clear_error_and_the_run_resumes(data, tmp_path, monkeypatch, uninterrupted,
                                                                            name, nth, code):
    import errno
    import os

    import featureshift.io

    real_replace = os.replace
    calls = []

    def replace(src, dst):
        if os.path.basename(dst) == name:
            calls.append(dst)
            if len(calls) == nth:
                with open(src, "r+b") as f:  # the disk filled up halfway through the file
                    f.truncate(os.path.getsize(src) // 2)
                raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real_replace(src, dst)

    monkeypatch.setattr(featureshift.io.os, "replace", replace)
    run = tmp_path / "run"
    with pytest.raises(FeatureshiftError) as e:
        fit(data, run, epochs=3, cutoff="features.5")
    monkeypatch.undo()
    msg = str(e.value)
    assert f"Could not write {run}" in msg and name in msg and "nothing half-written is left" in msg
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    for _, p in list_snapshots(run) if (run / "snapshots").exists() else []:
        featureshift.open_network(p)  # complete, and matching their checksums
    if name == "split.json":
        assert "Nothing of the run" in msg and "run the same command again" in msg
        fit(data, run, epochs=3, cutoff="features.5")
    else:
        saved = 2 if name in ("metrics.jsonl", "run.json") else 1
        assert f"saved up to epoch {saved}" in msg and f"featureshift train --resume {run}" in msg
        assert "free some space or make the folder writable" in msg.lower()
        train(resume=str(run), quiet=True)
    assert read_run(run)["status"] == "finished"
    assert without_time(read_metrics(run)) == without_time(read_metrics(uninterrupted))
    assert read_meta(snapshot_path(run, 3)).checksum == read_meta(snapshot_path(uninterrupted, 3)).checksum


def test_a_snapshot_records_the_size_it_was_trained_at(data, tmp_path):
    from featureshift.cli import main
    from featureshift.models.layers import list_layers
    from featureshift.snapshot import save_snapshot

    run = fit(data, tmp_path / "run", epochs=1, image_size=48)
    snap = snapshot_path(run, 1)
    meta = read_meta(snap)
    assert (meta.info.input_size, meta.info.resize_size) == (48, 55)  # 256/224 of 48
    r = CliRunner().invoke(main, ["info", str(snap)])
    assert r.exit_code == 0 and re.search(r"input\s+48\s*px", r.output), r.output
    model = featureshift.open_network(snap).module
    expected = {l.name: f"{l.height}x{l.width}" for l in list_layers(model, 48)}
    r = CliRunner().invoke(main, ["layers", str(snap)])
    rows = [line.split("\t") for line in r.output.strip().splitlines()]
    assert r.exit_code == 0 and {row[0]: row[-1] for row in rows if row[0] in expected} == expected
    assert expected["features.0"] == "23x23"  # not 111x111, as at 224 px

    # snapshots written before the size was recorded take it from their training configuration
    old = featureshift.open_network("squeezenet1_1", weights="random").module
    save_snapshot(old, tmp_path / "old.safetensors", config={"image_size": 48})
    assert read_meta(tmp_path / "old.safetensors").info.input_size == 48


def test_a_full_disk_is_one_paragraph_and_exit_2_on_the_command_line(data, tmp_path, monkeypatch):
    import errno
    import os

    import featureshift.io
    from featureshift.cli import main

    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "train_state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(featureshift.io.os, "replace", replace)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", str(data), "--model", "squeezenet1_1", "--epochs", "1",
                                  "--batch-size", "8", "--image-size", "48", "--workers", "0", "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"Could not write {out / 'train_state.pt'}: No space left on device" in r.stderr
    assert "run the same command again" in r.stderr
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["train", "--data", str(data), "--model", "squeezenet1_1", "--epochs", "1",
                                  "--batch-size", "8", "--image-size", "48", "--workers", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
