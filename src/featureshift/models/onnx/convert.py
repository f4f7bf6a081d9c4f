"""Any ONNX image classifier as a torch module (via onnx2torch) that takes normalized NCHW
images like every featureshift network, with readable layer names and `ModelInfo` attached.

Graphs are repaired first where onnx2torch cannot take them as they are (see repair), and
every converted module is checked against onnxruntime on a random batch before it is used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ...errors import FeatureshiftError
from ..info import ModelInfo, attach_info, band_stats
from .check import CHECK_TOLERANCE, OnnxCheck, check_with_onnxruntime, run_module
from .common import (
    STANDARD_DOMAINS, first_line, input_dims, is_nhwc, read_onnx, real_inputs, require_onnx, set_attr, size_text,
)
from .export import convert_opset
from .layouts import graph_layouts
from .metadata import read_metadata
from .names import clean, node_key, node_names
from .ops import register_converters, single_module
from .repair import (
    constants_to_initializers, explicit_same_padding, fill_shapes, fold_initializer_identities, free_batch,
    free_batch_in_reshapes, nchw_input, own_resizes, uneven_average_pools,
)

# Opsets tried, newest first, when onnx2torch has no converter for an operator's version.
_FALLBACK_OPSETS = (17, 13)
PREPROCESSING_HELP = (
    "Give --mean, --std and --input-size (in Python: mean=, std=, input_size=), e.g. --mean 0.485,0.456,0.406 "
    "--std 0.229,0.224,0.225 --input-size 224 for ImageNet torchvision networks, --mean 0.5,0.5,0.5 --std "
    "0.5,0.5,0.5 for Keras networks that take [-1, 1] input; --input-size HEIGHTxWIDTH (48x192) for one that "
    "is not square."
)


@dataclasses.dataclass
class OnnxImport:
    """An ONNX file converted to torch, and what featureshift learned doing it."""
    module: nn.Module  # eval mode, normalized NCHW RGB in, `featureshift_info` attached
    model: Any  # the file's own ModelProto, unchanged
    source_arch: str  # the architecture the file names (its metadata, else its graph's name)
    nhwc: bool  # the file's graph takes channels-last input
    check: OnnxCheck | None  # None when the check was skipped
    input_hw: tuple[int, int]  # the input's height and width the graph was converted and checked at
    unknown: tuple[str, ...] = ()  # preprocessing neither given nor in the file ("mean", "std"), when allowed


@dataclasses.dataclass
class _Graph:
    """An ONNX graph on its way to onnx2torch, and what was learned about it."""
    model: Any  # ModelProto, edited in place
    names: dict[str, str]  # node key -> layer name (with "/" separators)
    nhwc: bool = False
    batch: int = 0  # the batch size the original graph fixes (0: free)


@dataclasses.dataclass
class _Feeding:
    info: ModelInfo
    hw: tuple[int, int]
    unknown: tuple[str, ...]


def import_onnx(path: str | os.PathLike, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                input_size: int | tuple[int, int] | None = None, check: bool = True,
                tolerance: float = CHECK_TOLERANCE, data: bytes | None = None,
                require_preprocessing: bool = True) -> OnnxImport:
    """An ONNX image classifier converted to torch (`module`: eval mode, `featureshift_info` attached),
    with the file's graph, its layout and the check's result. Networks are opened with
    `network.open_network`, which calls this for an ONNX file.

    The module takes normalized NCHW images like every featureshift network (an NHWC graph is
    given a transposing input; `info.in_chans` is the graph's channel count), its layers are
    named after the graph's nodes (see names.node_names), and it is checked against onnxruntime
    on a random batch (check=False skips that): a FeatureshiftError when the largest difference
    is above TOLERANCE x max(1, largest |output|).
    Preprocessing comes from MEAN, STD and INPUT_SIZE where given, else from the metadata a
    featureshift export writes; input_size also from a graph that fixes its input size. INPUT_SIZE
    is pixels, or (height, width) for an input that is not square; `info.input_size` is then the
    larger side. For a graph of other than 3 bands, RGB MEAN and STD are fitted to its bands
    (models.info.band_stats). DATA: the file's bytes when they are already read.

    require_preprocessing=False: a file that does not say its mean and std is converted anyway
    (mean 0, std 1 stand in; `unknown` names them), for what needs only the graph, such as
    listing its layers; the input size is still needed."""
    require_onnx()
    import onnx

    path = Path(path)
    original = read_onnx(path, data)
    meta = read_metadata(original)
    inputs = real_inputs(original.graph)
    if len(inputs) != 1 or not original.graph.output:
        raise FeatureshiftError(
            f"{path} has {len(inputs)} inputs and {len(original.graph.output)} outputs; featureshift takes "
            "networks with one image input and a class-score output."
        )
    dims = input_dims(original.graph)
    if dims is None or len(dims) != 4:
        raise FeatureshiftError(
            f"The input of {path} is not a batch of images (rank {len(dims) if dims else 'unknown'}, not 4)."
        )
    elem_type = inputs[0].type.tensor_type.elem_type
    if elem_type != onnx.TensorProto.FLOAT:
        raise FeatureshiftError(
            f"{path} takes {onnx.helper.tensor_dtype_to_np_dtype(elem_type)} input; featureshift feeds networks "
            "float32 images. Convert the network with a float32 input (tf2onnx: the model's own input, not a "
            "decoding step)."
        )
    graph = _Graph(onnx.ModelProto(), {})
    graph.model.CopyFrom(original)
    graph.nhwc = is_nhwc(graph.model.graph, dims)
    # a graph that leaves its channel count open is taken for an RGB one
    in_chans = (dims[3] if graph.nhwc else dims[1]) or 3
    graph.batch = dims[0]
    fixed = (dims[1], dims[2]) if graph.nhwc else (dims[2], dims[3])
    # Not the file's name: the epochs of one network, saved under different names, are one architecture.
    source_arch = str(meta.get("arch") or clean([original.graph.name or "graph"])[0])
    feeding = _feeding(path, meta, mean, std, input_size, fixed, in_chans, require_preprocessing)
    info = feeding.info
    model, layouts = _prepare(graph, feeding.hw, path)
    module = _convert(graph, path)
    info.num_classes = _output_width(module, feeding.hw, info.in_chans)
    if len(info.class_names) != info.num_classes:
        info.class_names = [str(i) for i in range(info.num_classes)]
    info.arch = f"onnx/{source_arch}@{_structure_digest(model)}"
    attach_info(module, info)
    # what the layer listing reads (models.layers): which modules are layers, the input's size
    # and the tokens before a transformer's patch tokens
    module.featureshift_layouts = {graph.names[key].replace("/", "."): kind for key, kind in layouts.layouts.items()
                                   if key in graph.names}
    module.featureshift_input_hw = feeding.hw
    if layouts.prefix:
        module.num_prefix_tokens = layouts.prefix
    result = None
    if check:
        result = check_with_onnxruntime(module, original, size=feeding.hw, nhwc=graph.nhwc, tolerance=tolerance)
        if not result.ok:
            raise FeatureshiftError(
                f"{path} converted to torch does not compute what onnxruntime computes: {result.describe()}. "
                "The graph uses something featureshift does not convert faithfully."
            )
    return OnnxImport(module, original, source_arch, graph.nhwc, result, feeding.hw, feeding.unknown)


def _feeding(path: Path, meta: dict[str, Any], mean, std, input_size, fixed: tuple[int, int], in_chans: int,
             require_preprocessing: bool) -> _Feeding:
    mean = tuple(float(v) for v in mean) if mean is not None else _numbers(meta.get("mean"))
    std = tuple(float(v) for v in std) if std is not None else _numbers(meta.get("std"))
    given = input_size if input_size is not None else _size(meta.get("input_size"))
    if given is None:
        hw = fixed if all(fixed) else None
    elif isinstance(given, int):
        hw = (fixed[0] or given, fixed[1] or given)
    else:
        hw = (fixed[0] or int(given[0]), fixed[1] or int(given[1]))
    missing = [flag for flag, value in (("--mean", mean), ("--std", std), ("--input-size", hw)) if not value]
    if hw is None and not require_preprocessing:
        raise FeatureshiftError(f"{path} leaves its input size open and its metadata does not say it: give "
                                "--input-size (pixels, or HEIGHTxWIDTH such as 48x192).")
    if missing and require_preprocessing:
        raise FeatureshiftError(
            f"{path} does not say how to preprocess its input (no {', '.join(m[2:] for m in missing)} in its "
            f"metadata or its graph). {PREPROCESSING_HELP}"
        )
    unknown = tuple(m[2:] for m in missing)
    mean = mean or (0.0,) * in_chans
    std = std or (1.0,) * in_chans
    if in_chans != 3:
        # RGB statistics (what --mean and --std take) fitted to the graph's bands
        mean, std = (band_stats(v, in_chans) if len(v) == 3 else v for v in (mean, std))
    for what, values in (("mean", mean), ("std", std)):
        if len(values) != in_chans:
            raise FeatureshiftError(f"The {what} must have {in_chans} value(s), one per input band of {path}, "
                                    f"not {len(values)}.")
    if min(std) <= 0:
        raise FeatureshiftError(f"The std values must be positive, not {', '.join(map(str, std))}.")
    names = meta.get("class_names")
    size = given if isinstance(given, int) else max(hw)
    info = ModelInfo(
        arch="", num_classes=len(names) if isinstance(names, list) else 0,
        class_names=[str(n) for n in names] if isinstance(names, list) else [],
        mean=mean, std=std, input_size=size,
        resize_size=int(meta.get("resize_size") or round(size * 256 / 224)), weights=str(path), in_chans=in_chans,
    )
    return _Feeding(info, (int(hw[0]), int(hw[1])), unknown)


def _numbers(value) -> tuple[float, ...] | None:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    return None


def _size(value) -> int | tuple[int, int] | None:
    """An input size from the metadata: pixels, or [height, width]."""
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return (value[0], value[1])
    return None


def _prepare(graph: _Graph, hw: tuple[int, int], path: Path):
    """Edit the graph into one onnx2torch converts exactly; returns the edited ModelProto and its layers."""
    model = graph.model
    del model.graph.output[1:]  # the class scores; other outputs (auxiliary heads) are not used
    graph.names = node_names(model.graph)
    constants_to_initializers(model.graph)
    if graph.nhwc:
        nchw_input(model.graph, graph.names)
    fold_initializer_identities(model.graph)
    for node in model.graph.node:
        if node.op_type == "Reshape":
            # allowzero=1 (written by torch's exporter) differs from the default only for a target
            # shape holding 0, i.e. for a tensor with an empty axis, which image networks do not
            # make; onnx2torch refuses the attribute.
            set_attr(node, "allowzero", None)
    # the batch left free, the image size fixed: onnx2torch and the padding below need shapes,
    # found in the graph's own opset (the shapes stay in value_info through a conversion)
    free_batch(model, hw)
    register_converters()
    shapes = fill_shapes(model, path, hw)
    own_resizes(model)
    model = graph.model = _supported_opset(model, path)
    explicit_same_padding(model.graph, shapes, path)
    if graph.batch:
        free_batch_in_reshapes(model.graph, shapes, graph.batch)
    uneven_average_pools(model)
    layouts = graph_layouts(model)
    for node in model.graph.node:
        node.name = graph.names.get(node_key(node)) or node.name
    return model, layouts


def _supported_opset(model, path: Path):
    """MODEL, converted to an older opset when onnx2torch lacks a converter for an operator of its own."""
    missing = _unconvertible(model)
    if not missing:
        return model
    current = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
    reasons = []
    targets = [t for t in _FALLBACK_OPSETS if t < current]
    for target in targets:
        try:
            converted = convert_opset(model, target)
        except FeatureshiftError as e:
            reasons.append(str(e))
            continue
        if not _unconvertible(converted):
            return converted
    tried = (f"; converting to opset {', '.join(map(str, targets))} did not help" + (f": {reasons[0]}" if reasons
                                                                                      else "")) if targets else ""
    raise FeatureshiftError(
        f"{path} uses operators featureshift cannot convert to torch: {', '.join(sorted(missing))} "
        f"(opset {current}{tried})."
    )


def _unconvertible(model) -> set[str]:
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing = set()
    for node in model.graph.node:
        domain = node.domain or ""
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(domain, 1), domain=domain)
        except NotImplementedError:
            missing.add(f"{node.op_type}" + (f" ({domain})" if domain else ""))
    return missing


def _convert(graph: _Graph, path: Path) -> nn.Module:
    """onnx2torch's GraphModule, rebuilt so that its modules sit at the dotted layer names."""
    from onnx2torch import convert
    from onnx2torch.onnx_graph import OnnxGraph
    from torch import fx

    # onnx2torch's operators warn, at every run, about indexing and attributes they approximate;
    # the check against onnxruntime is what tells whether a conversion is right
    warnings.filterwarnings("ignore", category=UserWarning, module=r"onnx2torch\.")
    try:
        converted = convert(graph.model)
    except Exception as e:  # onnx2torch's converters raise whatever their code meets
        raise FeatureshiftError(f"{path} could not be converted to torch: {_conversion_failure(graph.model, e)}") from e
    # onnx2torch names each module as OnnxGraph.generate_node_name does; map those to ours
    targets = {OnnxGraph.generate_node_name(node): node.name.replace("/", ".") for node in graph.model.graph.node}
    root: dict[str, Any] = {}
    for node in converted.graph.nodes:
        if node.op == "call_module":
            module = single_module(converted.get_submodule(node.target))
            node.target = targets.get(node.target, node.target.replace("/", "."))
            root[node.target] = module
        elif node.op == "get_attr":
            root[node.target] = converted.get_buffer(node.target)
    module = fx.GraphModule(root, converted.graph, class_name="OnnxNetwork")
    return module.eval()


def _conversion_failure(model, error: Exception) -> str:
    """Which node onnx2torch could not convert, and why: each node's converter run on its own."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    why = f"{error.__class__.__name__}: {first_line(error)}"
    try:
        onnx_graph = OnnxGraph(safe_shape_inference(model).graph)
    except Exception:  # noqa: BLE001 - the error without the node is still the error
        return f"{why}."
    opsets = {o.domain or "": o.version for o in model.opset_import}
    for node in onnx_graph.nodes.values():
        try:
            get_converter(operation_type=node.operation_type, version=opsets.get(node.domain or "", 1),
                          domain=node.domain or "")(node, onnx_graph)
        except Exception as e:  # noqa: BLE001 - this node is the one to name
            hint = (" This input must be stored in the file (an initializer or a Constant), but the graph computes "
                    "it." if isinstance(e, KeyError) else "")
            return (f"its layer '{node.name.replace('/', '.')}' ({node.operation_type}) cannot be converted "
                    f"({e.__class__.__name__}: {first_line(e)}).{hint}")
    return f"{why}."


def _output_width(module: nn.Module, hw: tuple[int, int], in_chans: int = 3) -> int:
    out = run_module(module, torch.zeros(1, in_chans, *hw))
    if out.dim() < 2:
        raise FeatureshiftError(f"The network's output has shape {tuple(out.shape)} on a {size_text(hw)} input, "
                                "not (batch, classes).")
    return int(out.reshape(out.shape[0], -1).shape[1])


def _structure_digest(model) -> str:
    """What identifies the graph apart from its weights: networks with the same digest have the
    same layers, with the same widths (what featureshift traces once per architecture, and what
    two networks must share to be compared). Node inputs are left out beyond the shapes of the
    weight matrices and kernels: an exporter drops a bias that is all zeros (a fresh layer's)."""
    initializers = {i.name: list(i.dims) for i in model.graph.initializer}
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(f"{node.name}|{node.domain}|{node.op_type}|".encode())
        for a in sorted(node.attribute, key=lambda a: a.name):
            if a.type != a.TENSOR:  # a Constant's value is a weight, not structure
                h.update(a.SerializeToString(deterministic=True))
        for name in node.input:
            if len(initializers.get(name, ())) >= 2:
                h.update(str(initializers[name]).encode())
    return h.hexdigest()[:10]
