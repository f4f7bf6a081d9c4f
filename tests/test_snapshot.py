import json
import os

import pytest
import torch

import featureshift
from featureshift import FeatureshiftError, open_network, read_meta, save_snapshot
from featureshift.snapshot import weights_checksum


def outputs(model, seed=0):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


# googlenet's auxiliary heads and resnet18's batch norm take a second each to build: `make test`
@pytest.mark.parametrize("arch", ["squeezenet1_1", *(pytest.param(a, marks=pytest.mark.slow)
                                                     for a in ("googlenet", "resnet18"))])
def test_round_trip_gives_identical_outputs(tmp_path, arch):
    model = open_network(arch, weights="random", num_classes=5).module
    featureshift.model_info(model).class_names = ["a b", "ü", "<b>", "d", "e"]
    path = tmp_path / "000.safetensors"
    meta = save_snapshot(model, path, epoch=3, metrics={"val_acc": 0.5}, config={"lr": 1e-3}, parent="abc")
    opened = open_network(path)
    loaded, meta2 = opened.module, opened.meta
    assert torch.equal(outputs(model), outputs(loaded))
    assert not loaded.training
    assert meta2.epoch == 3 and meta2.metrics == {"val_acc": 0.5} and meta2.config == {"lr": 1e-3}
    assert meta2.parent == "abc" and meta2.checksum == meta.checksum
    assert meta2.info.class_names == ["a b", "ü", "<b>", "d", "e"] and meta2.info.arch == arch
    assert featureshift.model_info(loaded).num_classes == 5


def test_checksum_depends_on_weights_only(tmp_path, squeezenet):
    a = save_snapshot(squeezenet, tmp_path / "a.safetensors", epoch=0)
    b = save_snapshot(squeezenet, tmp_path / "b.safetensors", epoch=7, metrics={"x": 1.0})
    assert a.checksum == b.checksum == weights_checksum(squeezenet.state_dict())


# The caches are keyed by these: a change of either function orphans every cached probe
# statistic and tile. Computed on a network whose weights are exact small fractions.
KNOWN_WEIGHTS = "4aa70ebbd5439ca6e64abe65e4c7a69ea312a6d4aa73943cc353c28cb202547d"
KNOWN_HELD = "held-3cf78cb7e33537f4b6c0f3642226f788c47344fcefdc33e5a89d6567f0ded2b8"


def known_network():
    from torch import nn

    from featureshift.models.info import ModelInfo

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / (8.0 + i))
    return featureshift.attach_info(net.eval(), ModelInfo(arch="tiny", num_classes=2, class_names=["a", "b"],
                                                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))


def test_the_checksums_that_key_the_probe_and_tile_caches_are_unchanged(tmp_path):
    import dataclasses

    from featureshift.jobs.plan import hold_network
    from featureshift.snapshot import network_checksum

    net = known_network()
    assert network_checksum(net) == KNOWN_WEIGHTS == save_snapshot(net, tmp_path / "s.safetensors").checksum
    assert hold_network(net).checksum == network_checksum(net, with_preprocessing=True) == KNOWN_HELD
    # a snapshot's own checksum wins, for the probe statistics and the tiles alike
    assert network_checksum(net, "abc") == hold_network(net, "abc").checksum == "abc"
    # the preprocessing changes the pictures, so it changes a tile's key, never a snapshot's checksum
    other = featureshift.attach_info(net, dataclasses.replace(featureshift.model_info(net), mean=(0.4, 0.5, 0.5)))
    assert network_checksum(other) == KNOWN_WEIGHTS and hold_network(other).checksum != KNOWN_HELD


def test_write_is_atomic(tmp_path, squeezenet, monkeypatch):
    path = tmp_path / "s.safetensors"
    save_snapshot(squeezenet, path, epoch=0)
    before = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a snapshot")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_snapshot(squeezenet, path, epoch=1)
    assert path.read_bytes() == before  # the old snapshot is untouched
    assert os.listdir(tmp_path) == ["s.safetensors"]  # no temp file left behind
    with pytest.raises(OSError):
        save_snapshot(squeezenet, tmp_path / "new.safetensors", epoch=1)
    assert not (tmp_path / "new.safetensors").exists()


def test_written_files_get_the_usual_permissions(tmp_path, squeezenet):
    # Atomic writes go through a private temporary file; the result must not stay private
    # (0600), or a run folder shared with colleagues or served as a web page cannot be read.
    from featureshift.io import current_umask, write_text

    mode = 0o666 & ~current_umask()
    save_snapshot(squeezenet, tmp_path / "s.safetensors", epoch=0)
    write_text(tmp_path / "n.json", "{}")
    for name in ("s.safetensors", "n.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode


def test_truncated_snapshot_is_a_clear_error(tmp_path, squeezenet):
    path = tmp_path / "s.safetensors"
    save_snapshot(squeezenet, path, epoch=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureshiftError, match="s.safetensors"):
        open_network(path)
    path.write_bytes(b"")
    with pytest.raises(FeatureshiftError, match="not a readable featureshift snapshot"):
        read_meta(path)


def test_damaged_weights_fail_the_checksum(tmp_path, squeezenet):
    path = tmp_path / "s.safetensors"
    save_snapshot(squeezenet, path, epoch=0)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(FeatureshiftError, match="checksum"):
        open_network(path)


def test_architecture_mismatch_is_a_clear_error(tmp_path, squeezenet):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "s.safetensors"
    save_snapshot(squeezenet, path, epoch=0)
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
    meta = json.loads(raw["featureshift"])
    meta["info"]["arch"] = "resnet18"
    raw["featureshift"] = json.dumps(meta)
    save_file(load_file(path), str(path), metadata=raw)
    with pytest.raises(FeatureshiftError, match="do not fit the 'resnet18' architecture"):
        open_network(path)


def test_plain_safetensors_file_is_not_a_snapshot(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(FeatureshiftError, match="no featureshift metadata"):
        read_meta(path)


def test_missing_snapshot(tmp_path):
    with pytest.raises(FeatureshiftError, match="does not exist"):
        open_network(tmp_path / "nope.safetensors")


def test_snapshot_bytes_are_checked_like_a_snapshot_file(tmp_path):
    # Ray workers receive a snapshot's bytes: the same format check and message as reading the file
    from safetensors.torch import save as save_bytes

    plain = save_bytes({"w": torch.zeros(2)})  # safetensors weights without featureshift metadata
    with pytest.raises(FeatureshiftError, match="no featureshift metadata"):
        open_network("plain.safetensors", data=plain)
    with pytest.raises(FeatureshiftError, match="not a readable featureshift snapshot"):
        open_network("short.safetensors", data=b"\x01")
