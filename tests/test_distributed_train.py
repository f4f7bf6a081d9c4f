"""Training in two processes (DistributedDataParallel over gloo on the CPU), started by torchrun and
by `featureshift train` with nproc 2, against the same run in one process.

The network is ResNet-18 (random weights) with every layer but the classifier frozen: its frozen
batch-norm layers run in eval mode and it has no dropout, so two processes compute the same
function of the same images as one process. (Batch-norm layers in train mode would see each
process's half of the batch, and dropout draws its masks per process: both change the numbers
by far more than the tolerance below, by design.)
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from featureshift import read_meta
from featureshift.training.config import make_config
from featureshift.commands.train import train
from featureshift.data import SeededShuffle, ShardedSeededBatches, make_synthetic_dataset
from featureshift.errors import FeatureshiftError
from featureshift.run import list_snapshots, read_metrics, read_run, snapshot_path

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# 9 images per class, 2 of them held out: 21 training images in global batches of 8, 8 and 5.
# The last batch splits 3 + 2 between the processes, which exercises the loss weighting that makes
# the two processes' mean gradient the gradient of the global batch.
OPTIONS = ["--model", "resnet18", "--weights", "random", "--cutoff", "layer4", "--epochs", "2", "--batch-size", "8",
           "--image-size", "32", "--workers", "0", "--device", "cpu", "--quiet"]

# Relative tolerance of losses against one process. Not exact: the gradient is the mean of two
# half-batch means (all-reduced) instead of one mean over the batch, and validation sums two
# shards: float32 sums in another order differ by ~1e-7 relative per step, a few steps of Adam
# leave that far below 1e-4.
RTOL = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "textures", per_class=9, size=40)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The reference: the same run in this process."""
    return train(data=str(data), out=str(tmp_path_factory.mktemp("one") / "run"), model="resnet18", weights="random",
                 cutoff="layer4", epochs=2, batch_size=8, image_size=32, workers=0, device="cpu", quiet=True)


def featureshift(*args, env=None, torchrun=False):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*prefix, "-m", "featureshift", "train", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    """The same run in two processes, started by `featureshift train` with nproc 2; the second
    process kills itself (SIGKILL) as epoch 2 begins, after epoch 1 is on disk. Then torchrun
    resumes it to the end. (One run for all three: each start of two processes costs seconds.)"""
    run = tmp_path_factory.mktemp("two") / "run"
    killed = featureshift("--nproc", 2, "--data", data, "--out", run, *OPTIONS,
                          env={"FEATURESHIFT_TEST_DIE_AT_EPOCH": "2"})
    after_kill = read_run(run), [e for e, _ in list_snapshots(run)]
    resumed = featureshift("--resume", run, "--quiet", torchrun=True)
    return run, killed, after_kill, resumed


@pytest.mark.slow
def test_killed_process_ends_the_run_and_it_resumes(two_processes):
    run, killed, (info, snapshots), resumed = two_processes
    assert killed.returncode == 2, killed.stderr[-3000:]
    assert "rank 1" in killed.stderr and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert f"featureshift train --resume {run} --nproc 2" in killed.stderr, killed.stderr[-3000:]
    assert info["status"] == "failed" and info["epochs_done"] == 1 and "rank 1" in info["error"]
    assert info["processes"] == 2 and snapshots == [0, 1]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_run(run)["status"] == "finished"


def close(a, b):
    return a == b if a is None or b is None else abs(a - b) <= RTOL * abs(b)


@pytest.mark.slow
def test_two_processes_train_like_one(one_process, two_processes):
    # Epoch 2 was trained after the resume: it matches only if the optimizer's state, the data
    # order and the weights all came back.
    run = two_processes[0]
    one, two = read_metrics(one_process), read_metrics(run)
    assert [r["epoch"] for r in two] == [0, 1, 2]
    for a, b in zip(two, one, strict=True):
        assert a.get("train_images") == b.get("train_images")
        for k in ("train_loss", "val_loss"):
            assert close(a[k], b[k]), (a["epoch"], k, a[k], b[k])
        for k, n in (("train_acc", a.get("train_images")), ("val_acc", 6)):
            if b[k] is not None:  # within one image of a near-tie
                assert abs(a[k] - b[k]) <= 1 / n + 1e-9, (a["epoch"], k, a[k], b[k])
    assert read_run(run)["config"] == read_run(one_process)["config"]


@pytest.mark.slow
def test_snapshots_match_one_process_format_and_frozen_layers_stay(one_process, two_processes):
    run = two_processes[0]
    assert [e for e, _ in list_snapshots(run)] == [0, 1, 2]
    for e in (0, 2):
        p1, p2 = snapshot_path(one_process, e), snapshot_path(run, e)
        with safe_open(str(p1), "pt") as f1, safe_open(str(p2), "pt") as f2:
            assert json.loads(f2.metadata()["featureshift"]).keys() == json.loads(f1.metadata()["featureshift"]).keys()
            assert f2.metadata().keys() == f1.metadata().keys()
        t1, t2 = load_file(str(p1)), load_file(str(p2))
        assert t2.keys() == t1.keys()
        assert all(t2[k].dtype == t1[k].dtype and t2[k].shape == t1[k].shape for k in t1)
    m1, m2 = read_meta(snapshot_path(one_process, 2)), read_meta(snapshot_path(run, 2))
    assert m2.info == m1.info and m2.epoch == 2 and m2.parent == read_meta(snapshot_path(run, 1)).checksum
    start, first, last = (load_file(str(snapshot_path(r, e))) for r, e in ((one_process, 0), (run, 0), (run, 2)))
    frozen = read_run(run)["cutoff"]["frozen"]
    assert frozen[0] == "conv1" and frozen[-1] == "layer4.1.bn2"
    for k in start:
        assert torch.equal(first[k], start[k]), k  # the same seed starts from the same weights
        if k.rsplit(".", 1)[0] in frozen:
            assert torch.equal(last[k], start[k]), k  # weights and batch-norm statistics
    assert not torch.equal(last["fc.weight"], start["fc.weight"])


@pytest.mark.parametrize("n, batch, world", [(21, 8, 2), (24, 6, 3), (19, 4, 2), (17, 8, 4), (13, 4, 1)])
def test_ranks_share_out_the_batches_one_process_takes(n, batch, world):
    def generator():
        return torch.Generator().manual_seed(3)

    one = list(torch.utils.data.BatchSampler(SeededShuffle(n, generator()), batch, drop_last=False))
    if len(one[-1]) < 2 * world:  # a rank would get fewer than 2 images of the last batch
        one = one[:-1]
    gens = [generator() for _ in range(world)]
    parts = [list(ShardedSeededBatches(n, g, batch, rank, world)) for rank, g in enumerate(gens)]
    assert [sum((p[i] for p in parts), []) for i in range(len(one))] == one
    assert all(len(p) == len(one) for p in parts)  # every rank takes every step
    reference = generator()
    list(SeededShuffle(n, reference))
    assert all(torch.equal(g.get_state(), reference.get_state()) for g in gens)  # resumes the same whatever the world


def test_batch_size_must_divide_among_processes():
    with pytest.raises(FeatureshiftError, match="multiple of 4"):
        make_config(data="x", batch_size=30, nproc=4)
