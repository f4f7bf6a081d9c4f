"""Every command that writes, on a really full file system: a small tmpfs filled up, the real
command line in its own process. A full disk is one paragraph naming the file, what is saved and
how to continue, exit status 2; files are whole or absent; with room again the command finishes,
and training ends with the same weights as a run that never stopped.

Mounting needs root; elsewhere these tests are skipped (the fault-injection tests in
test_train.py and test_cli_behaviour.py cover the messages there)."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import featureshift
from featureshift import read_meta

TRAIN = ["--model", "squeezenet1_1", "--weights", "imagenet", "--image-size", "32", "--batch-size", "8",
         "--workers", "0", "--device", "cpu", "--quiet"]
RENDER = ["--steps", "2", "--size", "32", "--device", "cpu", "--quiet"]
EPOCHS = 2
RUN_FILES = ("split.json", "run.json", "metrics.jsonl", "train_state.pt", "snapshots")


def featureshift_cli(*args) -> subprocess.CompletedProcess:
    """The installed command line in a process of its own, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread each, on shared cores
    return subprocess.run([sys.executable, "-m", "featureshift", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def mount_tmpfs(folder: Path, size: str, inodes: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"a small tmpfs could not be mounted to fill up ({r.stderr.strip() or r.returncode})")


def remount(folder: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(folder)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size, inodes=None) -> a folder on a tmpfs of that size, unmounted after the test."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("filling a real file system needs a tmpfs, which only root can mount (Linux)")
    mounted: list[Path] = []

    def mount(size: str, inodes: int | None = None) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        mount_tmpfs(folder, size, inodes)
        mounted.append(folder)
        return folder

    yield mount
    gc.collect()  # a failed writer's file, still open from a caught exception, keeps its tmpfs busy
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all but LEAVE bytes of DISK's free space."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        size = st.f_bavail * st.f_frsize - leave
        if size > 0:
            os.posix_fallocate(f.fileno(), 0, size)
    return filler


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from _digits import export_digits

    return export_digits(tmp_path_factory.mktemp("digits") / "digits", per_class=6)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The run the interrupted ones must end up equal to, trained on a disk with room."""
    run = tmp_path_factory.mktemp("whole") / "run"
    r = featureshift_cli("train", "--data", data, "--epochs", EPOCHS, *TRAIN, "--out", run)
    assert r.returncode == 0, r.stderr
    return run


def final_checksum(run: Path) -> str:
    return read_meta(run / "snapshots" / f"{EPOCHS:03d}.safetensors").checksum


def assert_one_paragraph(r: subprocess.CompletedProcess, under: Path, *expected: str) -> Path:
    """Exit 2 and one paragraph on stderr naming a file under UNDER; returns that file."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("featureshift: error: Could not write "), r.stderr
    assert r.stderr.count("\n") == 1 and "No space left on device" in r.stderr, r.stderr
    for part in expected:
        assert part in r.stderr, (part, r.stderr)
    named = Path(r.stderr.removeprefix("featureshift: error: Could not write ").split(": No space")[0])
    assert named == under or under in named.parents, (named, under)
    assert not named.name.startswith("."), f"names a temporary file: {named}"
    return named


def test_writers_that_give_no_errno_raise_a_full_disk_as_enospc_naming_the_file(small_disk):
    """torch.save raises RuntimeError and safetensors its own error on a full disk: both become the
    OSError every caller already handles, and the space of the failed file is given back."""
    import errno

    import torch

    from featureshift.training.state import TrainState, save_state
    from featureshift.io import write_json

    disk = small_disk("1m")
    net = featureshift.open_network("squeezenet1_1", weights="random").module  # ~5 MB of weights
    with pytest.raises(OSError) as e:
        featureshift.save_snapshot(net, disk / "net.safetensors")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(disk / "net.safetensors"))
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(OSError) as e:
        save_state(disk, TrainState(epoch=0, model=weights, optimizer={}, scaler={}, rng={"torch": torch.get_rng_state()},
                                    parent=None, history=[], skipped=[]))
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(disk / "train_state.pt"))
    assert os.listdir(disk) == []
    write_json(disk / "run.json", {"status": "failed"})  # what training records next has room


def test_a_write_that_fails_for_another_reason_keeps_its_error(tmp_path):
    from featureshift.io import atomic_path

    with pytest.raises(RuntimeError, match="not about space"):
        with atomic_path(tmp_path / "file", size=1 << 20) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("not about space")
    assert os.listdir(tmp_path) == []


def assert_nothing_half_written(folder: Path) -> None:
    """No temporary file left behind, and every file under a final name reads whole."""
    from PIL import Image

    for path in folder.rglob("*"):
        assert not path.name.startswith("."), f"left behind: {path}"
        if path.suffix == ".safetensors":
            featureshift.open_network(path)  # its weights match the checksum stored with them
        elif path.suffix in (".json", ".jsonl"):
            for line in (path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]):
                json.loads(line)
        elif path.suffix in (".png", ".gif"):
            with Image.open(path) as im:
                im.load()


@pytest.mark.slow
def test_training_on_a_full_disk_stops_cleanly_and_resumes_with_room_to_the_same_weights(data, uninterrupted,
                                                                                        small_disk):
    disk = small_disk("12m")  # a snapshot of this network is ~3 MB, its training state up to 3 times that
    run = disk / "run"
    command = ["train", "--data", data, "--epochs", EPOCHS, *TRAIN, "--out", run]
    r = featureshift_cli(*command)
    named = assert_one_paragraph(r, run, f"featureshift train --resume {run}", "nothing half-written")
    assert named.name in RUN_FILES or named.parent.name == "snapshots"
    assert_nothing_half_written(run)
    assert json.loads((run / "run.json").read_text())["status"] == "failed"

    # still full: the same paragraph, and nothing lost
    r = featureshift_cli("train", "--resume", run, "--quiet")
    assert_one_paragraph(r, run, f"featureshift train --resume {run}")
    assert_nothing_half_written(run)

    remount(disk, "size=200m")
    r = featureshift_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert final_checksum(run) == final_checksum(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("fails, room", [  # room: free space left, in snapshots
    ("split.json", 0.0),  # the first file written: nothing fits
    ("000.safetensors", 0.5),  # the split fits, the snapshot does not
    ("train_state.pt", 1.5),  # the state holds the weights and more
])
def test_each_kind_of_training_file_on_a_full_disk(data, uninterrupted, small_disk, fails, room):
    snapshot = (uninterrupted / "snapshots" / "000.safetensors").stat().st_size
    disk = small_disk("40m")  # room for the whole run once the filler is gone
    filler = fill(disk, int(room * snapshot))
    run = disk / "run"
    command = ["train", "--data", data, "--epochs", EPOCHS, *TRAIN, "--out", run]
    r = featureshift_cli(*command)
    assert assert_one_paragraph(r, run, "Nothing of the run", "run the same command again").name == fails
    assert_nothing_half_written(run)
    if fails != "train_state.pt":  # one is enough to show that the paragraph's advice works
        return
    filler.unlink()
    r = featureshift_cli(*command)  # what the paragraph says
    assert r.returncode == 0, r.stderr
    assert final_checksum(run) == final_checksum(uninterrupted)


@pytest.mark.slow
def test_every_training_write_on_a_disk_out_of_inodes(data, small_disk):
    """A file system also fills up by its number of files: each new file training makes, in turn,
    is the one that does not fit."""
    named = set()
    for inodes in range(1, 20):
        disk = small_disk("24m", inodes=inodes)
        run = disk / "run"
        r = featureshift_cli("train", "--data", data, "--epochs", 0, *TRAIN, "--out", run)
        if r.returncode == 0:
            break
        path = assert_one_paragraph(r, run, "Free some space")
        named.add(path.name)
        if (run / "train_state.pt").exists():
            assert f"featureshift train --resume {run}" in r.stderr
        else:
            assert "run the same command again" in r.stderr
        assert_nothing_half_written(run)
    assert r.returncode == 0, r.stderr
    assert {"run", "split.json", "run.json", "000.safetensors", "metrics.jsonl"} <= named, named


@pytest.fixture
def run_on_disk(uninterrupted, small_disk):
    """A copy of the trained run on a tmpfs with a little room to spare."""
    disk = small_disk("16m")
    run = disk / "run"
    shutil.copytree(uninterrupted, run, ignore=shutil.ignore_patterns("train_state.pt"))
    return run


@pytest.mark.slow
def test_timeline_on_a_full_disk(run_on_disk):
    run = run_on_disk
    command = ["timeline", run, "--layer", "features.3", "--columns", 2, *RENDER]
    filler = fill(run.parent, 0)
    r = featureshift_cli(*command)
    assert_one_paragraph(r, run / "timeline" / "cache", "0 of 6 tiles are saved", "renders only the missing tiles")
    assert_nothing_half_written(run)
    filler.unlink()
    r = featureshift_cli(*command)
    assert r.returncode == 0, r.stderr

    # the tiles are there, the pictures made of them are not
    shutil.rmtree(run / "timeline" / "features.3")
    filler = fill(run.parent, 0)
    r = featureshift_cli(*command)
    assert_one_paragraph(r, run / "timeline" / "features.3", "All 6 tiles are saved")
    assert_nothing_half_written(run)


@pytest.mark.slow
def test_atlas_on_a_full_disk(run_on_disk):
    run = run_on_disk
    command = ["atlas", run, "--layer", "features.3", "--channels", "0-3", *RENDER]
    filler = fill(run.parent, 0)
    r = featureshift_cli(*command)
    assert_one_paragraph(r, run / "timeline" / "cache", "0 of 8 tiles are saved", "atlas.json was not updated",
                         "renders only the missing tiles")
    assert_nothing_half_written(run)
    filler.unlink()
    r = featureshift_cli(*command)
    assert r.returncode == 0 and (run / "atlas.json").is_file(), r.stderr

    (run / "atlas.json").unlink()
    filler = fill(run.parent, 0)
    r = featureshift_cli(*command)
    assert_one_paragraph(r, run / "atlas.json", "8 of 8 tiles are saved")
    assert_nothing_half_written(run)


@pytest.mark.slow
def test_report_on_a_full_disk_keeps_the_earlier_report(run_on_disk):
    run = run_on_disk
    command = ["report", run, "--layer", "features.3", "--columns", 2, "--examples", 2, "--probe-limit", 10, *RENDER]
    filler = fill(run.parent, 0)
    r = featureshift_cli(*command)
    assert_one_paragraph(r, run, "run the same command again")
    assert_nothing_half_written(run)
    filler.unlink()
    r = featureshift_cli(*command)
    assert r.returncode == 0, r.stderr
    index = run / "report" / "index.html"
    before = index.read_bytes()

    # everything it needs is cached; the pages themselves do not fit
    filler = fill(run.parent, 0)
    r = featureshift_cli(*command)
    assert_one_paragraph(r, run, f"The report {run / 'report'} was not updated", "an earlier report there is unchanged")
    assert index.read_bytes() == before
    assert_nothing_half_written(run)
