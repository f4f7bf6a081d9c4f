"""ONNX out (export with metadata, checked by onnxruntime) and in (any ONNX classifier as a
featureshift network), including the graphs TensorFlow converters write, built here with
onnx.helper so that the suite needs no TensorFlow. Random weights and tiny images throughout."""
import dataclasses
import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from featureshift.errors import FeatureshiftError  # noqa: E402
from featureshift.models.layers import list_layers  # noqa: E402
from featureshift.models.onnx.check import CHECK_TOLERANCE, check_with_onnxruntime  # noqa: E402
from featureshift.models.onnx.common import require_onnx  # noqa: E402
from featureshift.models.onnx.metadata import read_metadata  # noqa: E402
from featureshift.network import open_network  # noqa: E402

CLASSES = ["cat", "dog", "owl", "fox", "elk"]
SIZE = 64  # the exported networks' input size: small, and still deep enough for squeezenet
PREPROCESSING = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A random-weight squeezenet1_1 snapshot with its own classes and input size."""
    from featureshift.models.info import model_info
    from featureshift.snapshot import save_snapshot

    torch.manual_seed(0)
    model = open_network("squeezenet1_1", weights="random", num_classes=len(CLASSES)).module
    info = dataclasses.replace(model_info(model), class_names=list(CLASSES), input_size=SIZE, resize_size=73)
    path = tmp_path_factory.mktemp("snap") / "003.safetensors"
    save_snapshot(model, path, epoch=3, info=info)
    return path


@pytest.fixture(scope="module")
def exported(snapshot):
    from featureshift.commands.export import export

    return export(snapshot, snapshot.parent / "model.onnx")


@pytest.fixture(scope="module")
def loaded(exported):
    return open_network(exported.path).module


# ---------------------------------------------------------------- out

@pytest.mark.slow
def test_export_checks_with_onnxruntime_and_describes_it(exported):
    assert exported.path.is_file() and exported.opset == 17
    assert exported.check is not None and exported.check.ok
    assert exported.check.max_diff <= CHECK_TOLERANCE * max(1.0, exported.check.scale)
    assert exported.input_shape == ("batch", 3, "height", "width")  # a CNN takes any size, as in torch
    text = exported.describe()
    assert "onnxruntime check passed" in text and "largest difference" in text


@pytest.mark.slow
def test_export_writes_classes_and_preprocessing_in_the_metadata(exported):
    meta = read_metadata(onnx.load(str(exported.path)))
    assert meta["arch"] == "squeezenet1_1" and meta["class_names"] == CLASSES
    assert meta["input_size"] == SIZE and meta["num_classes"] == len(CLASSES)
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["epoch"] == 3 and meta["version"]


@pytest.mark.slow
def test_export_fails_above_the_tolerance_and_writes_nothing(snapshot, exported, monkeypatch):
    import featureshift.commands.export as export_command

    graph = onnx.load(str(exported.path))
    monkeypatch.setattr(export_command, "to_onnx", lambda *args, **kwargs: graph)  # the same graph, faster
    out = snapshot.parent / "never.onnx"
    with pytest.raises(FeatureshiftError, match="was not written"):
        export_command.export(snapshot, out, tolerance=-1.0)  # no difference passes a negative tolerance
    assert not out.exists() and not list(snapshot.parent.glob(".never.onnx*"))


def test_without_the_extra_the_error_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # makes `import onnx2torch` fail
    with pytest.raises(FeatureshiftError, match=re.escape("pip install 'featureshift[onnx]'")):
        require_onnx()


# ---------------------------------------------------------------- in

@pytest.mark.slow
def test_round_trip_gives_the_same_logits_classes_and_preprocessing(snapshot, loaded):
    opened = open_network(snapshot)
    original, meta = opened.module, opened.meta
    info = loaded.featureshift_info
    assert info.class_names == CLASSES and info.num_classes == len(CLASSES)
    assert info.mean == meta.info.mean and info.std == meta.info.std and info.input_size == SIZE
    assert info.arch.startswith("onnx/squeezenet1_1@")
    x = torch.randn(3, 3, SIZE, SIZE)  # another batch size than the export's example
    with torch.no_grad():
        want, got = original(x), loaded(x)
    assert (got - want).abs().max() <= CHECK_TOLERANCE * max(1.0, want.abs().max())


@pytest.mark.slow
def test_layers_are_readable_stable_and_listed_by_the_cli(exported, loaded):
    from click.testing import CliRunner

    from featureshift.cli import main

    names = [layer.name for layer in list_layers(loaded, 32)]
    assert names[:3] == ["features.0.Conv", "features.1.Relu", "features.2.MaxPool"]
    assert "features.3.expand3x3.Conv" in names and "features.12.Concat" in names
    assert all(re.fullmatch(r"[A-Za-z0-9_.]+", n) for n in names) and len(set(names)) == len(names)
    again = open_network(exported.path, check=False).module
    assert [layer.name for layer in list_layers(again, 32)] == names
    assert again.featureshift_info.arch == loaded.featureshift_info.arch  # same graph, same layers
    result = CliRunner().invoke(main, ["layers", str(exported.path)])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.output.splitlines()] == names


@pytest.mark.slow
def test_open_network_takes_an_onnx_path(exported):
    net = open_network(exported.path, weights="ignored for files")
    assert net.meta is None and net.path == exported.path and net.label == "model.onnx"
    assert net.info.class_names == CLASSES


@pytest.mark.slow
def test_a_layer_of_an_onnx_network_renders(loaded):
    from featureshift.optvis.engine import render

    result = render(loaded, [("features.6.Concat", 0)], steps=4, size=32, quiet=True, device="cpu")
    assert result.images.shape == (1, 32, 32, 3) and np.isfinite(result.images).all()


@pytest.mark.slow
def test_googlenet_from_torchs_default_exporter_is_converted_from_opset_18(tmp_path):
    torch.manual_seed(0)
    model = open_network("googlenet", weights="random").module
    path = tmp_path / "googlenet.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(path), verbose=False)
    assert max(o.version for o in onnx.load(str(path)).opset_import if o.domain == "") >= 18
    module = open_network(path, **PREPROCESSING).module  # checked against onnxruntime while loading
    info = module.featureshift_info
    assert info.input_size == SIZE and info.num_classes == 1000 and info.class_names[:2] == ["0", "1"]
    names = [layer.name for layer in list_layers(module, SIZE)]
    assert "inception4c.Concat" in names and "conv1.Relu" in names
    x = torch.randn(2, 3, SIZE, SIZE)  # exported at batch 1: the reshape before the head takes any
    with torch.no_grad():
        want, got = model(x), module(x)
    assert (got - want).abs().max() <= CHECK_TOLERANCE * max(1.0, want.abs().max())


def test_without_preprocessing_the_error_names_the_flags(tmp_path):
    path = _save(_tf_graph(nhwc=False), tmp_path / "bare.onnx")
    with pytest.raises(FeatureshiftError) as err:
        open_network(path).module
    assert all(flag in str(err.value) for flag in ("--mean", "--std", "--input-size"))
    assert open_network(path, **PREPROCESSING).module.featureshift_info.input_size == 16  # the graph fixes it


# ---------------------------------------------------------------- TensorFlow-shaped graphs

def _init(name, shape, rng):
    return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)


def _tf_graph(*, nhwc=True, transpose=True, same=True, lrn=True, pools=True, uneven=True, size=16, chans=3):
    """A small classifier as tf2onnx writes them: NHWC input behind a transpose, SAME padding at
    stride 2 (uneven at an even size), LRN, SAME max and average pooling, explicit uneven pads."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "input"
    shape = [1, size, size, chans] if nhwc else [1, chans, size, size]
    if nhwc and transpose:
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], name="model/conv1/Conv2D__6", perm=[0, 3, 1, 2]))
        x = "nchw"
    elif nhwc:  # a channels-last preprocessing op first, as in a Keras model with a Rescaling layer
        inits.append(numpy_helper.from_array(np.array([2.0, 1.5, 1.0], np.float32), "scale"))
        nodes.append(helper.make_node("Mul", [x, "scale"], ["scaled"], name="model/rescaling/mul"))
        nodes.append(helper.make_node("Transpose", ["scaled"], ["nchw"], name="model/conv1/Conv2D__6",
                                      perm=[0, 3, 1, 2]))
        x = "nchw"
    inits += [_init("conv1_w", [8, chans, 3, 3], rng), _init("conv1_b", [8], rng)]
    conv = dict(auto_pad="SAME_UPPER") if same else dict(pads=[1, 1, 1, 1])
    nodes.append(helper.make_node("Conv", [x, "conv1_w", "conv1_b"], ["c1"], name="model/conv1/Conv2D",
                                  strides=[2, 2], kernel_shape=[3, 3], **conv))
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="model/conv1/Relu"))
    x = "r1"
    if lrn:
        nodes.append(helper.make_node("LRN", [x], ["n1"], name="model/norm1/LRN", size=5, alpha=1e-2,
                                      beta=0.75, bias=1.0))
        x = "n1"
    if pools:
        nodes.append(helper.make_node("MaxPool", [x], ["p1"], name="model/pool1/MaxPool", kernel_shape=[3, 3],
                                      strides=[2, 2], auto_pad="SAME_UPPER"))
        nodes.append(helper.make_node("AveragePool", ["p1"], ["p2"], name="model/pool2/AvgPool",
                                      kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_UPPER"))
        x = "p2"
    if uneven:
        inits.append(_init("conv2_w", [6, 8, 2, 2], rng))
        nodes.append(helper.make_node("Conv", [x, "conv2_w"], ["c2"], name="model/conv2/Conv2D",
                                      kernel_shape=[2, 2], pads=[0, 0, 1, 1]))
        x = "c2"
    width = 6 if uneven else 8
    inits += [_init("fc_w", [4, width], rng), _init("fc_b", [4], rng)]
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="model/gap/Mean"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="model/flatten/Reshape"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="model/dense/MatMul",
                                  transB=1))
    graph = helper.make_graph(nodes, "tf_like", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    onnx.checker.check_model(model)
    return model


def _save(model, path):
    onnx.save(model, str(path))
    return path


TF_CASES = {
    "same-padding-at-a-stride": dict(nhwc=False, lrn=False, pools=False, uneven=False),
    "lrn": dict(nhwc=False, same=False, pools=False, uneven=False),
    "same-max-and-average-pools": dict(nhwc=False, lrn=False, uneven=False),
    "uneven-explicit-pads": dict(nhwc=False, same=False, lrn=False, pools=False),
    "nhwc-behind-a-transpose": dict(same=False, lrn=False, pools=False, uneven=False),
    "nhwc-with-an-op-before-the-transpose": dict(transpose=False, lrn=False, pools=False, uneven=False),
    "all-together": dict(),
}


@pytest.mark.parametrize("case", TF_CASES)
def test_tensorflow_shaped_graphs_match_onnxruntime(case, tmp_path):
    model = _tf_graph(**TF_CASES[case])
    path = _save(model, tmp_path / f"{case}.onnx")
    module = open_network(path, **PREPROCESSING).module  # raises when it differs from onnxruntime
    nhwc = TF_CASES[case].get("nhwc", True)
    check = check_with_onnxruntime(module, model, nhwc=nhwc, seed=1)
    assert check.ok and check.max_diff < 1e-4, check.describe()
    assert check.input_shape == (1, 3, 16, 16)  # the module takes NCHW, whatever the graph took
    names = [layer.name for layer in list_layers(module, 16)]
    assert "model.conv1.Conv2D" in names and "model.conv1.Relu" in names
    assert not any(re.search(r"\.\d+$", n) for n in names)  # a padded layer is one layer, not pad + layer
    x = torch.randn(3, 3, 16, 16)  # the graph fixes batch 1; the module takes any
    assert module(x).shape == (3, 4)


def test_export_of_an_onnx_file_adds_the_preprocessing_and_keeps_the_graph(tmp_path):
    from featureshift.commands.export import export

    source = _save(_tf_graph(), tmp_path / "epoch_05.onnx")
    result = export(source, tmp_path / "annotated" / "epoch_05.onnx", input_size=16, **PREPROCESSING)
    assert result.check is not None and result.check.ok and result.input_shape == (1, 16, 16, 3)
    written = onnx.load(str(result.path))
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in onnx.load(str(source)).graph.node]
    meta = read_metadata(written)
    assert meta["mean"] == list(PREPROCESSING["mean"]) and meta["input_size"] == 16 and "NHWC" in meta["input"]
    net = open_network(result.path)  # no preprocessing arguments needed any more
    assert net.info.mean == PREPROCESSING["mean"] and net.info.arch == open_network(
        source, **PREPROCESSING).info.arch  # the same layers as the original file


# ---------------------------------------------------------------- a folder of ONNX files

TIMELINE_LAYER = "features.3.squeeze.Conv"
TINY = dict(steps=4, size=32, device="cpu", quiet=True)


def _variant(model, path, seed, epoch=None):
    """MODEL's graph with its weights moved a little (another epoch of the same network), saved at PATH."""
    from featureshift.models.onnx.metadata import set_metadata

    rng = np.random.default_rng(seed)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype == np.float32 and values.ndim == 4:
            init.CopyFrom(numpy_helper.from_array(values + 0.02 * values.std() * rng.standard_normal(values.shape)
                                                  .astype(np.float32), init.name))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != "featureshift.epoch"]
    del model.metadata_props[:]
    set_metadata(model, dict(kept, **({} if epoch is None else {"featureshift.epoch": str(epoch)})))
    return _save(model, path)


@pytest.mark.slow
def test_timeline_over_a_folder_of_onnx_files(exported, tmp_path):
    import hashlib

    from click.testing import CliRunner

    from featureshift.cli import main
    from featureshift.commands.timeline import row_label, timeline
    from featureshift.states import list_states

    graph = onnx.load(str(exported.path))
    folder = tmp_path / "exports"
    folder.mkdir()
    _variant(graph, folder / "epoch10.onnx", 10)  # no epoch in its metadata: labelled by its name
    _variant(graph, folder / "epoch2.onnx", 2, epoch=2)
    result = timeline(folder, TIMELINE_LAYER, 2, **TINY)
    assert result.epochs == [0, 1] and result.files == {0: "epoch2.onnx", 1: "epoch10.onnx"}  # natural order
    assert result.rendered == 4 and result.cached == 0
    out = folder / "timeline" / TIMELINE_LAYER
    assert (out / "merged.png").is_file() and sorted(p.name for p in out.glob("0*.png")) == ["000.png", "001.png"]
    states = list_states(folder)
    assert [row_label(s) for s in states] == ["epoch 2\nepoch2", "epoch10"]
    assert states[0].checksum == hashlib.sha256((folder / "epoch2.onnx").read_bytes()).hexdigest()

    again = CliRunner().invoke(main, ["timeline", str(folder), "--layer", TIMELINE_LAYER, "--columns", "2",
                                      "--steps", "4", "--size", "32", "--device", "cpu", "-q"])
    assert again.exit_code == 0, again.output
    assert "0 tile(s) rendered, 4 from the cache" in again.output

    _variant(graph, folder / "epoch5.onnx", 5)
    grown = timeline(folder, TIMELINE_LAYER, 2, **TINY)
    assert list(grown.files.values()) == ["epoch2.onnx", "epoch5.onnx", "epoch10.onnx"]
    assert grown.rendered == 2 and grown.cached == 4  # only the new file's row


def test_timeline_over_onnx_files_without_metadata_takes_the_preprocessing(tmp_path):
    from featureshift.commands.timeline import timeline

    graph = _tf_graph(nhwc=False, lrn=False, pools=False, uneven=False)
    for epoch in (1, 2):
        _variant(graph, tmp_path / f"e{epoch}.onnx", epoch)
    with pytest.raises(FeatureshiftError, match="--mean"):
        timeline(tmp_path, "model.conv1.Relu", 2, **TINY)
    result = timeline(tmp_path, "model.conv1.Relu", 2, **TINY, **PREPROCESSING)
    assert result.rendered == 4 and not result.missing and not result.failed


@pytest.mark.slow
def test_info_on_an_onnx_file(exported):
    import json

    from click.testing import CliRunner

    from featureshift.cli import main

    text = CliRunner().invoke(main, ["info", str(exported.path)])
    assert text.exit_code == 0, text.output
    assert re.search(r"^opset\s+17$", text.output, re.M) and re.search(r"^\s+arch\s+squeezenet1_1$", text.output, re.M)
    about = json.loads(CliRunner().invoke(main, ["info", str(exported.path), "--json"]).output)
    assert about["in_chans"] == 3 and about["num_classes"] == len(CLASSES) and about["layout"] == "NCHW"
    assert about["inputs"] == {"input": ["batch", 3, "height", "width"]} and about["producer"].startswith("pytorch")
    assert about["featureshift"]["class_names"] == CLASSES and about["featureshift"]["epoch"] == 3


def test_in_chans_comes_from_the_graphs_input(tmp_path):
    from featureshift.models.onnx.metadata import describe

    path = _save(_tf_graph(nhwc=False, lrn=False, pools=False, uneven=False, chans=1), tmp_path / "gray.onnx")
    module = open_network(path, mean=(0.5,), std=(0.25,)).module  # checked against onnxruntime on one band
    assert module.featureshift_info.in_chans == 1 and module.featureshift_info.mean == (0.5,)
    assert module(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    fitted = open_network(path, **PREPROCESSING).module.featureshift_info  # RGB values fitted to the one band
    assert fitted.mean == pytest.approx((0.4,)) and fitted.std == pytest.approx((0.25,))
    assert describe(path)["in_chans"] == 1


# ---------------------------------------------------------------- ONNX files from other exporters

def _graph(nodes, inits, input_dims, output_dims, *, opset=13, name="g"):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _conv_net(input_dims, *, stride=2, names=("model/conv/Conv2D", "model/conv/Relu", "model/gap/Mean")):
    """Conv, Relu, global average pool and a dense layer: takes any image size its input leaves free."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name=names[0], kernel_shape=[3, 3],
                              strides=[stride, stride], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name=names[1]),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name=names[2]),
             helper.make_node("Flatten", ["gap"], ["flat"], name="model/flatten/Reshape"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="model/dense/MatMul", transB=1)]
    inits = [_init("w", [8, 3, 3, 3], rng), _init("b", [8], rng), _init("fc_w", [4, 8], rng), _init("fc_b", [4], rng)]
    return _graph(nodes, inits, input_dims, [input_dims[0], 4])


def _weights_as_constant_nodes(model):
    """MODEL with every initializer stored as a Constant node instead, as PaddlePaddle's exporter
    writes weights (1-D float ones as value_floats, the other form Constant takes)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    constants = []
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        value = dict(value_floats=values.tolist()) if values.ndim == 1 and values.dtype == np.float32 else dict(
            value=init)
        constants.append(helper.make_node("Constant", [], [init.name], name=f"{init.name}_weights", **value))
    del model.graph.initializer[:]
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def test_weights_stored_as_constant_nodes_are_taken(tmp_path):
    model = _weights_as_constant_nodes(_tf_graph(transpose=False, lrn=False, uneven=False))
    assert not model.graph.initializer and sum(n.op_type == "Constant" for n in model.graph.node) == 5
    module = open_network(_save(model, tmp_path / "paddle.onnx"), **PREPROCESSING).module  # checked against onnxruntime
    check = check_with_onnxruntime(module, model, nhwc=True, seed=2)
    assert check.ok and check.max_diff < 1e-4, check.describe()
    names = [layer.name for layer in list_layers(module, 16)]
    assert "model.conv1.Conv2D" in names and not any("weights" in n for n in names)  # weights are no layers


@pytest.mark.parametrize("free", [-1, 0])
def test_a_batch_written_as_minus_one_or_zero_is_free(free, tmp_path):
    from click.testing import CliRunner

    from featureshift.cli import main
    from featureshift.models.onnx.metadata import describe

    model = _conv_net([1, 3, 16, 16])
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = free
    # a reshape that keeps the batch axis free the other ways exporters write it
    flat = next(n for n in model.graph.node if n.op_type == "Flatten")
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 8], np.int64), "to_rows"))
    model.graph.node.insert(list(model.graph.node).index(flat), helper.make_node(
        "Reshape", ["gap", "to_rows"], ["rows"], name="model/reshape/Reshape"))
    flat.input[0] = "rows"
    path = _save(model, tmp_path / f"batch{free}.onnx")
    module = open_network(path, **PREPROCESSING).module  # the check runs onnxruntime at batch 2
    assert module(torch.randn(3, 3, 16, 16)).shape == (3, 4)
    assert describe(path)["inputs"] == {"input": [None, 3, 16, 16]}
    listed = CliRunner().invoke(main, ["layers", str(path), "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"])
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines()[0].split("\t") == ["model.conv.Conv2D", "Conv2d", "8", "8x8"]


def test_input_size_height_by_width(tmp_path):
    from click.testing import CliRunner

    from featureshift.cli import main

    free = _save(_conv_net(["N", 3, "H", "W"]), tmp_path / "text_direction.onnx")
    module = open_network(free, input_size=(48, 192), **PREPROCESSING).module
    info = module.featureshift_info
    assert info.input_size == 192 and module.featureshift_input_hw == (48, 192)
    assert [(l.name, l.height, l.width) for l in list_layers(module)][:2] == [
        ("model.conv.Conv2D", 24, 96), ("model.conv.Relu", 24, 96)]  # listed at 48x192, not square
    runner = CliRunner()
    listed = runner.invoke(main, ["layers", str(free), "--input-size", "48x192", "-q"])
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines()[0].endswith("\t8\t24x96")
    fixed = _save(_conv_net([1, 3, 48, 192]), tmp_path / "fixed.onnx")  # the graph says it: no flag needed
    assert runner.invoke(main, ["layers", str(fixed), "-q"]).stdout.splitlines()[0].endswith("\t24x96")
    wrong = runner.invoke(main, ["layers", str(free), "--input-size", "48x"])
    assert wrong.exit_code == 2 and "HEIGHTxWIDTH" in wrong.output and "Traceback" not in wrong.output
    annotated = tmp_path / "annotated.onnx"  # the size written into the file is read back
    written = runner.invoke(main, ["export", str(free), "-o", str(annotated), "--input-size", "48x192", "--mean",
                                   "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", "-q"])
    assert written.exit_code == 0, written.output
    assert open_network(annotated).module.featureshift_input_hw == (48, 192)


def test_layers_of_an_onnx_file_without_preprocessing_say_it_is_unknown(tmp_path):
    from click.testing import CliRunner

    from featureshift.cli import main

    path = _save(_conv_net([1, 3, 16, 16]), tmp_path / "bare.onnx")
    runner = CliRunner()
    listed = runner.invoke(main, ["layers", str(path)])
    assert listed.exit_code == 0, listed.output
    assert [row.split("\t")[0] for row in listed.stdout.splitlines()] == [
        "model.conv.Conv2D", "model.conv.Relu", "model.gap.Mean"]
    assert "does not say how to normalize its input" in listed.stderr and "--mean" in listed.stderr
    rendered = runner.invoke(main, ["vis", str(path), "model.conv.Relu", "-o", str(tmp_path / "x.png"),
                                    "--steps", "2", "--size", "16", "-q"])
    assert rendered.exit_code == 2 and "--mean, --std and --input-size" in rendered.stderr
    unsized = _save(_conv_net(["N", 3, "H", "W"]), tmp_path / "unsized.onnx")  # listing needs the size
    sizeless = runner.invoke(main, ["layers", str(unsized)])
    assert sizeless.exit_code == 2 and "leaves its input size open" in sizeless.stderr


def _keras_like_graph():
    """NHWC input behind a Transpose, a feature map transposed back to NHWC before a Keras Flatten
    (tf2onnx's `block1_pool/MaxPool__76`), and an elementwise operator between the two layouts."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["input"], ["nchw"], name="model/block1_conv1/Conv2D__6", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w", "b"], ["c"], name="model/block1_conv1/Conv2D",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="model/block1_conv1/Relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="model/block1_pool/MaxPool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["p_nhwc"], name="model/block1_pool/MaxPool__76", perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["p_nhwc", "scale"], ["s"], name="model/scale/mul"),
             helper.make_node("Reshape", ["s", "flat_shape"], ["flat"], name="model/flatten/Reshape"),
             helper.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="model/dense/MatMul")]
    inits = [_init("w", [8, 3, 3, 3], rng), _init("b", [8], rng), _init("scale", [8], rng),
             numpy_helper.from_array(np.array([1, 8 * 8 * 8], np.int64), "flat_shape"), _init("fc_w", [512, 5], rng)]
    return _graph(nodes, inits, [1, 16, 16, 3], [1, 5])


def test_nhwc_graph_lists_feature_maps_with_their_channels_not_layout_transposes(tmp_path):
    module = open_network(_save(_keras_like_graph(), tmp_path / "vgg_like.onnx"), **PREPROCESSING).module
    layers = list_layers(module)
    assert [(l.name, l.channels, l.shape, l.layout) for l in layers] == [
        ("model.block1_conv1.Conv2D", 8, "16x16", "NCHW"), ("model.block1_conv1.Relu", 8, "16x16", "NCHW"),
        ("model.block1_pool.MaxPool", 8, "8x8", "NCHW"),
        ("model.scale.mul", 8, "8x8", "NHWC")]  # channels last between the transposes, seen channels first
    assert module(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_detection_head_reshapes_are_no_layers_and_repeated_scopes_collapse(tmp_path):
    rng = np.random.default_rng(0)
    scope = "/model.22/cv2.0/cv2.0.0"  # as torch's old exporter names YOLOv8's head
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name=f"{scope}/conv/Conv", kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["c"], ["sig"], name=f"{scope}/act/Sigmoid"),
             helper.make_node("Mul", ["c", "sig"], ["m"], name=f"{scope}/act/Mul"),
             helper.make_node("Reshape", ["m", "rows"], ["r"], name="/model.22/Reshape"),
             helper.make_node("Reshape", ["r", "bins"], ["bins_out"], name="/model.22/dfl/Reshape"),
             helper.make_node("Transpose", ["bins_out"], ["t"], name="/model.22/dfl/Transpose", perm=[0, 2, 1, 3]),
             helper.make_node("Softmax", ["t"], ["sm"], name="/model.22/dfl/Softmax", axis=1),
             helper.make_node("Flatten", ["sm"], ["logits"], name="/model.22/Flatten")]
    inits = [_init("w", [12, 3, 1, 1], rng), numpy_helper.from_array(np.array([1, 12, 64], np.int64), "rows"),
             numpy_helper.from_array(np.array([1, 4, 3, 64], np.int64), "bins")]
    path = _save(_graph(nodes, inits, [1, 3, 8, 8], [1, 768]), tmp_path / "head.onnx")
    layers = list_layers(open_network(path, **PREPROCESSING).module)
    assert [(l.name, l.channels, l.shape) for l in layers] == [
        ("model.22.cv2.0.0.conv.Conv", 12, "8x8"), ("model.22.cv2.0.0.act.Sigmoid", 12, "8x8"),
        ("model.22.cv2.0.0.act.Mul", 12, "8x8")]


def test_scope_pieces_that_repeat_the_path_are_collapsed():
    from featureshift.models.onnx.names import scope_path

    assert scope_path("/model.22/cv2.0/cv2.0.0/act/Mul") == ["model", "22", "cv2", "0", "0", "act", "Mul"]
    assert scope_path("/features/features.3/squeeze/Conv") == ["features", "3", "squeeze", "Conv"]
    assert scope_path("/layer1/layer1.0/conv1/Conv") == ["layer1", "0", "conv1", "Conv"]
    assert scope_path("StatefulPartitionedCall/model/block1_conv1/Conv2D") == ["model", "block1_conv1", "Conv2D"]
    assert scope_path("/backbone/backbone/Conv") == ["backbone", "backbone", "Conv"]  # a module in one of its name


def test_shapes_lost_before_a_batchnorm_are_found_at_the_input_size(tmp_path):
    """A reshape to sizes computed in a way shape inference does not follow leaves the BatchNorm
    after it without a rank, which onnx2torch needs; onnxruntime's run at the input size supplies it."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["sf"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("Neg", ["sf"], ["neg"], name="neg"),
             helper.make_node("Neg", ["neg"], ["sf2"], name="neg_again"),
             helper.make_node("Cast", ["sf2"], ["s2"], name="to_int", to=TensorProto.INT64),
             helper.make_node("Reshape", ["c", "s2"], ["r"], name="reshape"),
             helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("GlobalAveragePool", ["bn"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["logits"], name="flat")]
    inits = [_init("w", [4, 3, 3, 3], rng), _init("g", [4], rng), _init("b", [4], rng), _init("m", [4], rng),
             numpy_helper.from_array(np.ones(4, np.float32), "v")]
    model = _graph(nodes, inits, ["N", 3, "H", "W"], ["N", 4])
    assert "r" not in {v.name for v in onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info
                       if v.type.tensor_type.HasField("shape")}  # the loss this test is about
    module = open_network(_save(model, tmp_path / "recogniser.onnx"), input_size=(24, 40), **PREPROCESSING).module
    assert type(module.get_submodule("bn")).__name__ == "BatchNorm2d"
    assert [(l.name, l.shape) for l in list_layers(module)][:2] == [("conv", "24x40"), ("bn", "24x40")]


@pytest.mark.parametrize("mode", ["cubic", "linear"])
def test_resize_with_antialias_converts_as_onnxruntime_computes_it(mode, tmp_path):
    """Opset 18's antialias=1 (what torch's exporter writes for interpolate(antialias=True), as a
    vision transformer resizes its position embeddings) shrinking an image."""
    rng = np.random.default_rng(0)
    cubic = dict(cubic_coeff_a=-0.5) if mode == "cubic" else {}
    nodes = [helper.make_node("Resize", ["input", "", "scales"], ["small"], name="pos_embed/Resize", mode=mode,
                              antialias=1, exclude_outside=1, coordinate_transformation_mode="half_pixel", **cubic),
             helper.make_node("Conv", ["small", "w"], ["c"], name="conv/Conv", kernel_shape=[1, 1]),
             helper.make_node("Flatten", ["c"], ["logits"], name="flat")]
    inits = [numpy_helper.from_array(np.array([1, 1, 0.375, 0.375], np.float32), "scales"),
             _init("w", [2, 3, 1, 1], rng)]
    model = _graph(nodes, inits, ["N", 3, 32, 32], ["N", 2 * 12 * 12], opset=18)
    module = open_network(_save(model, tmp_path / "resize.onnx"), **PREPROCESSING).module  # raises when it differs
    check = check_with_onnxruntime(module, model, seed=3)
    assert check.max_diff < 1e-4, check.describe()


def test_opset_17_takes_an_antialias_that_changes_nothing_and_refuses_one_that_does():
    from featureshift.models.onnx.export import convert_opset

    def graph(scale):
        nodes = [helper.make_node("Resize", ["input", "", "scales"], ["logits"], name="resize", mode="cubic",
                                  antialias=1, cubic_coeff_a=-0.5, exclude_outside=1)]
        inits = [numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales")]
        side = int(8 * scale)
        return _graph(nodes, inits, [1, 3, 8, 8], [1, 3, side, side], opset=18)

    kept = convert_opset(graph(1.0), 17)
    assert kept.opset_import[0].version == 17 and not [a for a in kept.graph.node[0].attribute if a.name == "antialias"]
    with pytest.raises(FeatureshiftError, match=r"'resize' \(Resize\) shrinks .*--opset 18"):
        convert_opset(graph(0.5), 17)


def test_weights_the_graph_computes_are_refused_naming_the_layer(tmp_path):
    from click.testing import CliRunner

    from featureshift.cli import main

    model = _conv_net([1, 3, 16, 16])
    model.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    model.graph.node.insert(0, helper.make_node("Mul", ["w", "two"], ["w_scaled"], name="model/conv/scale"))
    model.graph.node[1].input[1] = "w_scaled"
    path = _save(model, tmp_path / "computed.onnx")
    result = CliRunner().invoke(main, ["layers", str(path), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "layer 'model.conv.Conv2D' (Conv) cannot be converted" in result.stderr
    assert "must be stored in the file" in result.stderr


def test_an_operator_that_fails_at_the_input_size_is_named(tmp_path):
    model = _keras_like_graph()  # its Keras Flatten fixes the 16x16 input through a constant shape
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "H"
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "W"
    with pytest.raises(FeatureshiftError, match=r"'model\.flatten\.Reshape'.*24x24"):
        open_network(_save(model, tmp_path / "fixed_flatten.onnx"), input_size=24, **PREPROCESSING).module
