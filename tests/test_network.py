"""The model gateway: one table of openers behind `open_network`, every caller going through it,
and every way of opening a snapshot giving the weights its file records."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import featureshift
from featureshift import FeatureshiftError, open_network, read_meta, save_snapshot
from featureshift.network import OPENERS, OpenRequest, spec_kind
from featureshift.snapshot import weights_checksum

PACKAGE = Path(featureshift.__file__).parent


@pytest.fixture()
def saved(tmp_path, squeezenet) -> Path:
    path = tmp_path / "snap" / "004.safetensors"
    save_snapshot(squeezenet, path, epoch=4)
    return path


def test_every_kind_of_spec_has_its_opener(saved, squeezenet, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(squeezenet.state_dict(), weights)
    kinds = {
        "module": OpenRequest(squeezenet),
        "name": OpenRequest("squeezenet1_1", "random"),
        "snapshot": OpenRequest(saved),
        "snapshot bytes": OpenRequest(saved, data=b"..."),
        "state dict": OpenRequest("squeezenet1_1", str(weights)),
        "onnx": OpenRequest(tmp_path / "net.onnx"),
        "skeleton": OpenRequest(saved, device="meta"),
    }
    assert {kind: spec_kind(request) for kind, request in kinds.items()} == {kind: kind for kind in kinds}
    assert spec_kind(OpenRequest("squeezenet1_1", str(saved))) == "snapshot"  # a snapshot as --weights
    assert set(OPENERS) == set(kinds)
    with pytest.raises(FeatureshiftError, match="neither 'imagenet', 'random', nor an existing file"):
        spec_kind(OpenRequest("squeezenet1_1", str(tmp_path / "absent.pt")))


def test_a_snapshot_opened_through_the_gateway_has_the_checksum_its_file_records(saved):
    recorded = read_meta(saved).checksum
    opened = [open_network(saved), open_network(str(saved), weights="random"),  # weights ignored for a file
              open_network("squeezenet1_1", str(saved)),  # the snapshot as the weights of its architecture
              open_network(Path("elsewhere") / saved.name, data=saved.read_bytes())]  # a Ray worker's bytes
    for net in opened:
        assert weights_checksum(net.module.state_dict()) == recorded == net.meta.checksum
        assert not net.module.training and net.info == read_meta(saved).info
    assert opened[-1].label == "004.safetensors, epoch 4"


def test_damaged_snapshot_bytes_fail_the_checksum(saved):
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the last tensor
    with pytest.raises(FeatureshiftError, match="checksum"):
        open_network(saved, data=bytes(data))


def test_a_skeleton_has_the_architecture_and_no_weights(saved, squeezenet):
    net = open_network(saved, device="meta")
    assert all(t.is_meta for t in net.module.state_dict().values())
    assert [n for n, _ in net.module.named_modules()] == [n for n, _ in squeezenet.named_modules()]
    assert net.meta.epoch == 4 and featureshift.model_info(net.module) == read_meta(saved).info


def test_the_public_api_opens_networks_one_way():
    for name in ("create_model", "load", "load_snapshot", "load_onnx"):
        assert name not in featureshift.__all__
        with pytest.raises(AttributeError):
            getattr(featureshift, name)
    assert featureshift.open_network is open_network and "Network" in featureshift.__all__


# The lower-level functions that open a network, and the modules that may call them: the gateway,
# and where a caller needs what a Network does not carry (an ONNX graph's file and check for the
# layer listing, export and a state's metadata; the training state's in-memory weights on resume).
LOWER_LEVEL = {
    "load_snapshot": {"featureshift.network"},
    "create_model": {"featureshift.network"},
    "build": {"featureshift.network", "featureshift.snapshot"},
    "build_from_state": {"featureshift.training.session"},
    "import_onnx": {"featureshift.network", "featureshift.states", "featureshift.cli", "featureshift.commands.export"},
}


def test_networks_are_opened_through_the_gateway():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("featureshift", *path.relative_to(PACKAGE).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    allowed = LOWER_LEVEL.get(alias.name)
                    if allowed is not None and module not in allowed and (node.module or "").split(".")[-1] in (
                            "snapshot", "zoo", "convert"):
                        wrong.append(f"{module}:{node.lineno} imports {alias.name}")
    assert not wrong, "open networks with network.open_network:\n" + "\n".join(wrong)


@pytest.mark.slow
def test_timeline_atlas_metrics_and_report_open_the_weights_their_snapshots_record(tmp_path, photos, monkeypatch):
    from _fakerun import LAYER, make_run
    from featureshift import network
    from featureshift.commands.atlas import atlas
    from featureshift.commands.report import build_report
    from featureshift.commands.timeline import timeline
    from featureshift.metrics.driver import run_metrics

    run = make_run(tmp_path, photos, epochs=(0, 1))
    opened: list[tuple[Path, str]] = []

    def recording(opener):
        def open_and_record(request):
            net = opener(request)
            opened.append((net.path, weights_checksum(net.module.state_dict())))
            return net
        return open_and_record

    for kind in ("snapshot", "snapshot bytes"):
        monkeypatch.setitem(network.OPENERS, kind, recording(OPENERS[kind]))
    tiny = dict(steps=2, size=32, quiet=True, device="cpu")
    commands = {
        "timeline": lambda: timeline(run, [LAYER], [2], **tiny),
        "atlas": lambda: atlas(run, [LAYER], channels=[2], **tiny),
        "metrics": lambda: run_metrics(run, [LAYER], {LAYER: [2]}, overview=["features.3"], image_size=64,
                                       examples=0, device="cpu", quiet=True),
        "report": lambda: build_report(run, [LAYER], [2], image_size=64, examples=0, accent=False, **tiny),
    }
    for name, command in commands.items():
        opened.clear()
        command()
        assert opened, f"{name} opened no snapshot through open_network"
        for path, checksum in opened:
            assert checksum == read_meta(path).checksum, f"{name}: {path.name}"
