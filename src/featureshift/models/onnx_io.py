"""Networks in ONNX files, both ways.

Out: a featureshift network becomes an ONNX graph (torch's default exporter) carrying its
classes and preprocessing in the metadata, so the file alone says how to feed it.

In: any ONNX image classifier becomes a torch module (via onnx2torch) that takes normalized
NCHW RGB like every featureshift network, with readable layer names and `ModelInfo` attached.
Graphs converted from TensorFlow (tf2onnx) are repaired first where onnx2torch cannot take
them as they are: SAME padding, uneven pooling pads, NHWC inputs, opsets newer than its
converters, shapes baked for one batch size. Every converted module is checked against
onnxruntime on a random batch before it is used.

onnx, onnxruntime and onnx2torch are an optional extra (`featureshift[onnx]`); they are
imported only inside the functions here.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import keyword
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FeatureshiftError
from ..io import atomic_path
from ..version import __version__
from .info import ModelInfo, attach_info, band_stats

ONNX_SUFFIX = ".onnx"
INSTALL_HINT = "pip install 'featureshift[onnx]'"

# A converted network passes when its largest absolute difference from onnxruntime is at most
# CHECK_TOLERANCE times the scale of the reference output (its largest magnitude, at least 1):
# float32 graphs computed by two libraries differ by ~1e-6 of that scale, while a wrongly
# converted layer (padding, layout, window) shows up as differences of 1e-2 and more.
CHECK_TOLERANCE = 1e-3

METADATA_PREFIX = "featureshift."
# The layer names a featureshift export gives its nodes come from torch's module paths; the
# exporter keeps the path of each node here (onnx's version converter drops it, so the names
# are set before converting).
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# torch's default exporter writes this opset natively; older ones go through onnx's converter.
_EXPORTER_OPSET = 18
# Opsets tried, newest first, when onnx2torch has no converter for an operator's version.
_FALLBACK_OPSETS = (17, 13)
# Operators featureshift converts itself (onnx2torch cannot), under their own ONNX domain.
_DOMAIN = "featureshift"


def require_onnx() -> None:
    """Import the optional ONNX stack, or say how to install it."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnx2torch"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise FeatureshiftError(
            f"ONNX support needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed. Install it with: {INSTALL_HINT}"
        )


def is_onnx_path(spec: str | os.PathLike) -> bool:
    """Whether a model argument names an ONNX file."""
    return str(spec).lower().endswith(ONNX_SUFFIX)


# ---------------------------------------------------------------- metadata

def metadata_entries(info: ModelInfo, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The metadata_props featureshift writes: what a reader needs to feed the network."""
    entries = {
        "version": __version__,
        "arch": info.arch,
        "num_classes": info.num_classes,
        "class_names": info.class_names,
        "mean": list(info.mean),
        "std": list(info.std),
        "input_size": info.input_size,
        "resize_size": info.resize_size,
        "weights": info.weights,
        "in_chans": info.in_chans,
        "input": (f"float32 NCHW {'RGB' if info.in_chans == 3 else f'{info.in_chans}-band images'}, scaled to "
                  "[0, 1] then normalized with mean and std"),
        **(extra or {}),
    }
    return {METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in entries.items()}


def read_metadata(model) -> dict[str, Any]:
    """featureshift's entries of an ONNX ModelProto's metadata_props, prefix removed, JSON decoded."""
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            key = prop.key[len(METADATA_PREFIX):]
            try:
                out[key] = json.loads(prop.value)
            except ValueError:
                out[key] = prop.value
    return out


def set_metadata(model, entries: dict[str, str]) -> None:
    """Write ENTRIES into the ModelProto's metadata_props, replacing earlier values of the same keys."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


# ---------------------------------------------------------------- export

def to_onnx(module: nn.Module, info: ModelInfo, *, opset: int = 17, batch: int = 2,
            extra_metadata: dict[str, Any] | None = None):
    """MODULE (normalized NCHW images in) as an ONNX ModelProto: torch's default exporter, any batch
    size at INFO's input size, node names from the module paths, INFO in the metadata."""
    require_onnx()
    import onnx

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    x = torch.randn(batch, info.in_chans, info.input_size, info.input_size, device=device)
    program = None
    errors = []
    was_training = module.training
    module.eval()
    try:
        # A batch dimension left free lets any reader run any batch size; a network whose code
        # fixes it (a view to a constant shape) still exports, for its example batch size only.
        for shapes in (({0: torch.export.Dim("batch")},), None):
            try:
                program = torch.onnx.export(module, (x,), dynamo=True, opset_version=max(opset, _EXPORTER_OPSET),
                                            dynamic_shapes=shapes, input_names=["input"], output_names=["logits"],
                                            verbose=False)
                break
            except Exception as e:  # the exporter raises many types; the message is what helps
                errors.append(f"{e.__class__.__name__}: {str(e).strip().splitlines()[0]}")
    finally:
        module.train(was_training)
    if program is None:
        raise FeatureshiftError(f"torch could not export this {info.arch} network to ONNX ({errors[-1]}).")
    model = program.model_proto
    _name_exported_nodes(model)
    if opset < _EXPORTER_OPSET:
        try:
            model = convert_opset(model, opset)
        except Exception as e:
            raise FeatureshiftError(
                f"The exported graph could not be converted to opset {opset} "
                f"({str(e).strip().splitlines()[-1]}). Export at opset {_EXPORTER_OPSET} or later."
            ) from e
    set_metadata(model, metadata_entries(info, extra_metadata))
    model.doc_string = f"{info.arch} exported by featureshift {__version__}"
    onnx.checker.check_model(model)
    return model


def _name_exported_nodes(model) -> None:
    names = node_names(model.graph)
    for node in model.graph.node:
        node.name = names[_node_key(node)].replace("/", ".")


def convert_opset(model, opset: int):
    """MODEL converted to OPSET by onnx's version converter, without the attributes the converter
    carries over from newer operator versions (ReduceMean-18's noop_with_empty_axes into
    ReduceMean-13), which the older version does not allow."""
    from onnx import defs, version_converter

    model = version_converter.convert_version(model, opset)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            allowed = defs.get_schema(node.op_type, max_inclusive_version=opset).attributes
        except defs.SchemaError:
            continue
        for a in [a for a in node.attribute if a.name not in allowed]:
            node.attribute.remove(a)
    return model


def save_onnx(model, path: str | os.PathLike) -> Path:
    """Write an ONNX ModelProto to PATH atomically."""
    import onnx

    path = Path(path)
    if model.ByteSize() >= 2**31:
        raise FeatureshiftError(
            f"The network is over 2 GB, more than one ONNX file holds; {path} was not written."
        )
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path


# ---------------------------------------------------------------- checking

@dataclasses.dataclass(frozen=True)
class OnnxCheck:
    """A torch module against onnxruntime on one random batch."""
    max_diff: float  # the largest absolute difference of the outputs
    scale: float  # the largest magnitude of onnxruntime's output
    tolerance: float  # the pass mark, relative to max(1, scale)
    input_shape: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance * max(1.0, self.scale)

    def describe(self) -> str:
        return (f"largest difference from onnxruntime {self.max_diff:.2e} on outputs up to {self.scale:.3g} "
                f"(tolerance {self.tolerance:g} x max(1, {self.scale:.3g})) on a random "
                f"{'x'.join(map(str, self.input_shape))} batch")


def check_with_onnxruntime(module: nn.Module, model, *, batch: int = 2, size: int | None = None,
                           nhwc: bool = False, tolerance: float = CHECK_TOLERANCE, seed: int = 0) -> OnnxCheck:
    """Run MODULE and the ONNX ModelProto MODEL (whose first output is compared) on the same random
    NCHW batch; NHWC: MODEL takes the batch channels-last. Sizes the graph fixes win over the
    arguments."""
    import numpy as np
    import onnxruntime as ort

    fixed = _input_dims(model.graph)
    channels = 3
    if fixed is not None:
        n, h, w = (fixed[0], fixed[1], fixed[2]) if nhwc else (fixed[0], fixed[2], fixed[3])
        channels = (fixed[3] if nhwc else fixed[1]) or channels
        batch = n or batch
        size_h, size_w = h or size, w or size
    else:
        size_h = size_w = size
    if not size_h or not size_w:
        raise FeatureshiftError("The ONNX graph's input size is not fixed; give the input size to check it.")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size_h, size_w, generator=g)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    feed = x.permute(0, 2, 3, 1).numpy() if nhwc else x.numpy()
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        ref = session.run([model.graph.output[0].name], {input_name: np.ascontiguousarray(feed)})[0]
    except Exception as e:  # onnxruntime's own exception types
        raise FeatureshiftError(
            f"onnxruntime could not run the graph to check it ({str(e).strip().splitlines()[0][:300]})."
        ) from e
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(x.to(device))
    finally:
        module.train(was_training)
    out = out[0] if isinstance(out, (list, tuple)) else out
    got = out.detach().float().cpu().numpy()
    if got.shape != ref.shape:
        raise FeatureshiftError(
            f"The converted network's output has shape {got.shape}, onnxruntime's {ref.shape}."
        )
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    if not math.isfinite(diff):
        diff = math.inf
    return OnnxCheck(diff, float(np.abs(ref).max()) if ref.size else 0.0, tolerance, tuple(x.shape))


def _input_dims(graph) -> list[int] | None:
    """The first real input's dims (0 where not fixed), or None when its rank is unknown."""
    inputs = _real_inputs(graph)
    if not inputs or not inputs[0].type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim]


def _real_inputs(graph) -> list:
    initializers = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


# ---------------------------------------------------------------- layer names

def node_names(graph) -> dict[str, str]:
    """A readable, unique layer name for every node, keyed by its first output (see _node_key).

    torch's default exporter records each node's module path (`features.3.squeeze`), the old
    exporter and tf2onnx put it in the node name (`/features/features.3/squeeze/Conv`,
    `model/block1_conv1/Conv2D`); either way the name is the path plus the operator, e.g.
    `features.3.squeeze.Conv`. The parts are joined by "/" here, as onnx2torch takes them
    (it allows no dots in a module's name), and by "." in the converted module. The same graph
    always gets the same names.
    """
    raw = [_name_parts(node) for node in graph.node]
    leaves = ["/".join(parts) for parts in raw]
    used: set[str] = set()
    containers = {"/".join(parts[:i]) for parts in raw for i in range(1, len(parts))}
    out = {}
    for node, name in zip(graph.node, leaves):
        unique, k = name, 0
        # a name that is also another's prefix would make one module both a layer and a folder
        while unique in used or unique in containers:
            k += 1
            unique = f"{name}_{k}"
        used.add(unique)
        out[_node_key(node)] = unique
    return out


def _node_key(node) -> str:
    return node.output[0] if node.output and node.output[0] else f"#{node.name}"


def _name_parts(node) -> list[str]:
    scopes = next((p.value for p in node.metadata_props if p.key == _SCOPES_KEY), None)
    if scopes is not None:
        try:  # written as a Python list literal: ['', 'features', 'features.3', 'conv2d_1']
            path = [str(s) for s in ast.literal_eval(scopes)[:-1] if s]
        except (ValueError, SyntaxError, TypeError):
            path = []
        module = path[-1].split(".") if path else []
        return _clean(module + [node.op_type])
    if not node.name:
        return _clean([node.op_type])
    parts: list[str] = []
    for piece in node.name.split("/"):
        if not piece or piece in ("StatefulPartitionedCall", "PartitionedCall"):
            continue
        prefix = ".".join(parts)
        # the old exporter repeats the path in every scope: /features/features.3/squeeze
        if prefix and piece.startswith(prefix + "."):
            piece = piece[len(prefix) + 1:]
        parts.extend(piece.split("."))
    return _clean(parts or [node.op_type])


@functools.cache
def _reserved() -> frozenset[str]:
    # Attributes of the module classes the names become children of: a child called `train`
    # or `graph` would be shadowed by the method or break the generated forward.
    from torch import fx

    return frozenset(dir(fx.GraphModule)) | {"initializers"}


def _clean(parts: list[str]) -> list[str]:
    out = []
    for p in parts:
        p = re.sub(r"\W+", "_", p).strip("_") or "_"
        if keyword.iskeyword(p) or p in _reserved():
            p += "_"
        out.append(p)
    return out


# ---------------------------------------------------------------- import

def read_onnx(path: str | os.PathLike, data: bytes | None = None):
    """The ModelProto in the file at PATH (or in DATA, its bytes already read), or a FeatureshiftError."""
    import onnx

    path = Path(path)
    if data is None and not path.is_file():
        raise FeatureshiftError(f"ONNX file {path} does not exist.")
    try:
        return onnx.load_model_from_string(data) if data is not None else onnx.load(str(path))
    except Exception as e:
        raise FeatureshiftError(
            f"{path} is not a readable ONNX file ({e.__class__.__name__}: {str(e).strip()[:200]})."
        ) from e


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What an ONNX file carries, read without converting it: producer, opset, input and output
    shapes (None for a free axis, e.g. the batch), layout, input bands, class count (from the
    output's shape, else the metadata; None when neither says), featureshift's metadata ({} for
    a file featureshift did not write), node count and the sha256 of the file's bytes."""
    try:
        import onnx  # noqa: F401 - only onnx is needed to read a file
    except ImportError as e:
        raise FeatureshiftError(f"Reading ONNX files needs onnx, which is not installed: {INSTALL_HINT}") from e
    path = Path(path)
    if not path.is_file():
        raise FeatureshiftError(f"ONNX file {path} does not exist.")
    data = path.read_bytes()
    model = read_onnx(path, data)
    meta = read_metadata(model)

    def shape(value) -> list[int | str | None] | None:
        t = value.type.tensor_type
        if not t.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]

    inputs = _real_inputs(model.graph)
    dims = _input_dims(model.graph)
    images = dims is not None and len(dims) == 4
    nhwc = images and _is_nhwc(model.graph, dims)
    in_chans = ((dims[3] if nhwc else dims[1]) or None) if images else None
    out_shape = shape(model.graph.output[0]) if model.graph.output else None
    classes = out_shape[-1] if out_shape and len(out_shape) == 2 and isinstance(out_shape[-1], int) else None
    return {
        "file": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        "opset": declared_opset(model),
        "ir_version": model.ir_version,
        "graph": model.graph.name or None,
        "inputs": {i.name: shape(i) for i in inputs},
        "outputs": {o.name: shape(o) for o in model.graph.output},
        "layout": ("NHWC" if nhwc else "NCHW") if images else None,
        "in_chans": in_chans,
        "num_classes": classes or (meta.get("num_classes") if isinstance(meta.get("num_classes"), int) else None),
        "nodes": len(model.graph.node),
        "featureshift": meta,
    }


@dataclasses.dataclass
class _Graph:
    """An ONNX graph on its way to onnx2torch, and what was learned about it."""
    model: Any  # ModelProto, edited in place
    names: dict[str, str]  # node key -> layer name (with "/" separators)
    nhwc: bool = False
    batch: int = 0  # the batch size the original graph fixes (0: free)


@dataclasses.dataclass
class OnnxImport:
    """An ONNX file converted to torch, and what featureshift learned doing it."""
    module: nn.Module  # eval mode, normalized NCHW RGB in, `featureshift_info` attached
    model: Any  # the file's own ModelProto, unchanged
    source_arch: str  # the architecture the file names (its metadata, else its graph's name)
    nhwc: bool  # the file's graph takes channels-last input
    check: OnnxCheck | None  # None when the check was skipped


def load_onnx(path: str | os.PathLike, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              input_size: int | None = None, check: bool = True, tolerance: float = CHECK_TOLERANCE,
              data: bytes | None = None) -> nn.Module:
    """An ONNX image classifier as a torch module in eval mode, with `featureshift_info` attached.

    The module takes normalized NCHW images like every featureshift network (an NHWC graph is
    given a transposing input; `info.in_chans` is the graph's channel count), its layers are named after the graph's nodes (see node_names),
    and it is checked against onnxruntime on a random batch (check=False skips that): a
    FeatureshiftError when the largest difference is above TOLERANCE x max(1, largest |output|).
    Preprocessing comes from MEAN, STD and INPUT_SIZE where given, else from the metadata a
    featureshift export writes; input_size also from a graph that fixes its input size. For a
    graph of other than 3 bands, RGB MEAN and STD are fitted to its bands (models.info.band_stats).
    DATA: the file's bytes when they are already read (PATH then only names the file).
    """
    return import_onnx(path, mean=mean, std=std, input_size=input_size, check=check, tolerance=tolerance,
                       data=data).module


def import_onnx(path: str | os.PathLike, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                input_size: int | None = None, check: bool = True, tolerance: float = CHECK_TOLERANCE,
                data: bytes | None = None) -> OnnxImport:
    """load_onnx, with the file's graph, its layout and the check's result."""
    require_onnx()
    import onnx

    path = Path(path)
    original = read_onnx(path, data)
    meta = read_metadata(original)
    inputs = _real_inputs(original.graph)
    if len(inputs) != 1 or not original.graph.output:
        raise FeatureshiftError(
            f"{path} has {len(inputs)} inputs and {len(original.graph.output)} outputs; featureshift takes "
            "networks with one image input and a class-score output."
        )
    dims = _input_dims(original.graph)
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
    graph.nhwc = _is_nhwc(graph.model.graph, dims)
    # a graph that leaves its channel count open is taken for an RGB one
    in_chans = (dims[3] if graph.nhwc else dims[1]) or 3
    graph.batch = dims[0]
    fixed = dims[1:3] if graph.nhwc else dims[2:4]
    # Not the file's name: the epochs of one network, saved under different names, are one architecture.
    source_arch = str(meta.get("arch") or _clean([original.graph.name or "graph"])[0])
    info = _model_info(path, meta, mean, std, input_size, fixed, in_chans)
    model = _prepare(graph, info.input_size, fixed, path)
    module = _convert(graph, path)
    info.num_classes = _output_width(module, info.input_size, info.in_chans)
    if len(info.class_names) != info.num_classes:
        info.class_names = [str(i) for i in range(info.num_classes)]
    info.arch = f"onnx/{source_arch}@{_structure_digest(model)}"
    attach_info(module, info)
    result = None
    if check:
        result = check_with_onnxruntime(module, original, size=info.input_size, nhwc=graph.nhwc, tolerance=tolerance)
        if not result.ok:
            raise FeatureshiftError(
                f"{path} converted to torch does not compute what onnxruntime computes: {result.describe()}. "
                "The graph uses something featureshift does not convert faithfully."
            )
    return OnnxImport(module, original, source_arch, graph.nhwc, result)


def _is_nhwc(graph, dims: list[int]) -> bool:
    inputs = _real_inputs(graph)  # once: it gathers the graph's initializer names
    consumers = [n for n in graph.node if inputs[0].name in n.input] if inputs else []
    if consumers and all(n.op_type == "Transpose" and _attr(n, "perm") == [0, 3, 1, 2] for n in consumers):
        return True
    # no transposing node to go by: channels last when the last axis looks like colours
    return dims[3] in (1, 3, 4) and dims[1] not in (0, 1, 3, 4)


def _model_info(path: Path, meta: dict[str, Any], mean, std, input_size, fixed: list[int],
                in_chans: int = 3) -> ModelInfo:
    mean = tuple(float(v) for v in mean) if mean is not None else _triple(meta.get("mean"))
    std = tuple(float(v) for v in std) if std is not None else _triple(meta.get("std"))
    size = input_size or meta.get("input_size") or (fixed[0] if fixed[0] and fixed[0] == fixed[1] else None)
    missing = [flag for flag, value in (("--mean", mean), ("--std", std), ("--input-size", size)) if not value]
    if missing:
        raise FeatureshiftError(
            f"{path} does not say how to preprocess its input (no {', '.join(m[2:] for m in missing)} in its "
            "metadata or its graph). Give --mean, --std and --input-size (in Python: mean=, std=, input_size=), "
            "e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --input-size 224 for ImageNet torchvision "
            "networks, --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 for Keras networks that take [-1, 1] input."
        )
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
    size = int(size)
    return ModelInfo(
        arch="", num_classes=len(names) if isinstance(names, list) else 0,
        class_names=[str(n) for n in names] if isinstance(names, list) else [],
        mean=mean, std=std, input_size=size,
        resize_size=int(meta.get("resize_size") or round(size * 256 / 224)), weights=str(path), in_chans=in_chans,
    )


def _triple(value) -> tuple[float, ...] | None:
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    return None


def _prepare(graph: _Graph, size: int, fixed: list[int], path: Path):
    """Edit the graph into one onnx2torch converts exactly; returns the edited ModelProto."""
    import onnx

    model = graph.model
    del model.graph.output[1:]  # the class scores; other outputs (auxiliary heads) are not used
    graph.names = node_names(model.graph)
    model = graph.model = _supported_opset(model, path)
    if graph.nhwc:
        _nchw_input(model.graph, graph.names)
    _fold_initializer_identities(model.graph)
    for node in model.graph.node:
        if node.op_type == "Reshape":
            # allowzero=1 (written by torch's exporter) differs from the default only for a target
            # shape holding 0, i.e. for a tensor with an empty axis, which image networks do not
            # make; onnx2torch refuses the attribute.
            _set_attr(node, "allowzero", None)
    # the batch left free, the image size fixed: onnx2torch and the padding below need shapes,
    # inferred afresh (shapes an exporter stored hold its example's batch size)
    del model.graph.value_info[:]
    for value in model.graph.output:
        if value.type.tensor_type.HasField("shape") and value.type.tensor_type.shape.dim:
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    value = _real_inputs(model.graph)[0]
    dims = value.type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_param = "batch"
    for d, known in zip(dims[2:], fixed):
        if not known:
            d.Clear()
            d.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise FeatureshiftError(f"The shapes in {path} could not be inferred ({str(e).strip()[:300]}).") from e
    shapes = _shapes(inferred.graph)
    _explicit_same_padding(model.graph, shapes, path)
    if graph.batch:
        _free_batch_in_reshapes(model.graph, shapes, graph.batch)
    _uneven_average_pools(model, inferred.graph)
    for node in model.graph.node:
        node.name = graph.names.get(_node_key(node)) or node.name
    return model


def _supported_opset(model, path: Path):
    """MODEL, converted to an older opset when onnx2torch lacks a converter for an operator of its own."""
    missing = _unconvertible(model)
    if not missing:
        return model
    current = declared_opset(model)
    for target in _FALLBACK_OPSETS:
        if target >= current:
            continue
        try:
            converted = convert_opset(model, target)
        except Exception:  # noqa: BLE001 - the next opset may work; the final error names the operators
            continue
        if not _unconvertible(converted):
            return converted
    raise FeatureshiftError(
        f"{path} uses operators featureshift cannot convert to torch: {', '.join(sorted(missing))} "
        f"(opset {current}; converting to opset {', '.join(map(str, _FALLBACK_OPSETS))} did not help)."
    )


def declared_opset(model) -> int:
    """The version of the standard ONNX operator set a ModelProto declares."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


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


def _nchw_input(graph, names: dict[str, str]) -> None:
    """Give an NHWC graph an NCHW input: drop the transposes that undo the layout, or add one."""
    from onnx import helper

    value = _real_inputs(graph)[0]
    old = value.name
    new = old + "_nchw"
    n, h, w, c = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                  for d in value.type.tensor_type.shape.dim]
    copies = [n, c, h, w]
    value.name = new
    del value.type.tensor_type.shape.dim[:]
    for d in copies:
        dim = value.type.tensor_type.shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif d:
            dim.dim_param = d
    consumers = [node for node in graph.node if old in node.input]
    if consumers and all(node.op_type == "Transpose" and _attr(node, "perm") == [0, 3, 1, 2] for node in consumers):
        gone = {node.output[0] for node in consumers}
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in gone:
                    node.input[i] = new
        for out in graph.output:
            if out.name in gone:
                raise FeatureshiftError("The graph's output is its transposed input; there is no network in it.")
        for node in consumers:
            graph.node.remove(node)
        return
    transpose = helper.make_node("Transpose", [new], [old], perm=[0, 2, 3, 1])
    graph.node.insert(0, transpose)
    names[_node_key(transpose)] = "input/Transpose"


def _fold_initializer_identities(graph) -> None:
    """Read weights straight from the initializers: torch's older exporter aliases equal
    initializers through Identity nodes, and onnx2torch takes a Conv's weights and bias only
    from initializers."""
    initializers = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {node.output[0]: node.input[0] for node in graph.node
             if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs}
    if not alias:
        return
    for node in list(graph.node):
        if node.op_type == "Identity" and node.output[0] in alias:
            graph.node.remove(node)
            continue
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a) if a.type != a.INTS else list(a.ints)
    return default


def _set_attr(node, name: str, value) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def _shapes(graph) -> dict[str, list[int | None]]:
    out = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def _explicit_same_padding(graph, shapes: dict[str, list], path: Path) -> None:
    """Rewrite auto_pad SAME_UPPER/SAME_LOWER (TensorFlow's SAME) as the explicit pads it means at
    the input size: onnx2torch refuses auto_pad SAME. A strided layer's pads depend on the size,
    so at other sizes its padding stays that of the input size."""
    initializers = {i.name: i for i in graph.initializer}
    for node in graph.node:
        mode = _attr(node, "auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("SAME_UPPER", "SAME_LOWER") or node.op_type not in ("Conv", "MaxPool", "AveragePool"):
            continue
        kernel = _attr(node, "kernel_shape")
        if kernel is None and node.op_type == "Conv" and node.input[1] in initializers:
            kernel = list(initializers[node.input[1]].dims[2:])
        shape = shapes.get(node.input[0])
        if kernel is None or shape is None:
            raise FeatureshiftError(f"The padding of node {node.name or node.op_type} in {path} cannot be worked out.")
        rank = len(kernel)
        strides = _attr(node, "strides") or [1] * rank
        dilations = _attr(node, "dilations") or [1] * rank
        begins, ends = [], []
        for i in range(rank):
            size = shape[2 + i] if len(shape) == rank + 2 else None
            extent = (kernel[i] - 1) * dilations[i] + 1
            if strides[i] == 1:
                total = extent - 1
            elif size:
                total = max((math.ceil(size / strides[i]) - 1) * strides[i] + extent - size, 0)
            else:
                raise FeatureshiftError(
                    f"The input size of node {node.name or node.op_type} in {path} is unknown, so its SAME "
                    "padding cannot be made explicit; give --input-size."
                )
            small, large = total // 2, total - total // 2
            begins.append(small if mode == "SAME_UPPER" else large)
            ends.append(large if mode == "SAME_UPPER" else small)
        _set_attr(node, "auto_pad", None)
        _set_attr(node, "pads", begins + ends)


def _free_batch_in_reshapes(graph, shapes: dict[str, list], batch: int) -> None:
    """A graph exported for one batch size reshapes to constant shapes starting with that size
    (torch's `x.view(1, -1)`); 0 ("keep this axis") makes them take any batch."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or _attr(node, "allowzero", 0):
            continue
        target = initializers.get(node.input[1])
        data_shape = shapes.get(node.input[0])
        # only where the data's first axis is the (now free) batch axis
        if target is None or not data_shape or data_shape[0] is not None:
            continue
        values = numpy_helper.to_array(target).copy()
        if values.ndim != 1 or not len(values) or values[0] != batch:
            continue
        values[0] = 0
        replacement = numpy_helper.from_array(values, name=f"{target.name}_any_batch")
        if consumers.get(target.name, 0) == 1:
            graph.initializer.remove(target)
        if replacement.name not in initializers:
            graph.initializer.append(replacement)
            initializers[replacement.name] = replacement
        node.input[1] = replacement.name


def _uneven_average_pools(model, inferred) -> None:
    """AveragePool with uneven pads (TensorFlow's SAME at a stride) becomes featureshift's own
    operator: onnx2torch refuses it and torch's pooling cannot pad unevenly. INFERRED: the graph
    with its shapes, which shape inference cannot find past an operator it does not know."""
    known = {v.name: v for v in inferred.value_info}
    rewritten = False
    for node in model.graph.node:
        if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
            continue
        pads = _attr(node, "pads")
        kernel = _attr(node, "kernel_shape")
        if not pads or len(kernel) != 2 or pads[:2] == pads[2:] or _attr(node, "ceil_mode", 0):
            continue
        node.domain = _DOMAIN
        node.op_type = "PaddedAveragePool"
        if node.output[0] in known:
            model.graph.value_info.append(known[node.output[0]])
        rewritten = True
    if rewritten:
        if not any(o.domain == _DOMAIN for o in model.opset_import):
            op = model.opset_import.add()
            op.domain, op.version = _DOMAIN, 1
        _register_converters()


class PaddedAvgPool2d(nn.Module):
    """2-D average pooling with uneven zero padding, dividing by the window (COUNT_INCLUDE_PAD)
    or by the window's part inside the image, as ONNX's AveragePool does."""

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], pads: Sequence[int],
                 count_include_pad: bool):
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        top, left, bottom, right = pads  # ONNX order: begins then ends
        self.padding = (left, right, top, bottom)  # F.pad's order: last axis first
        self.count_include_pad = count_include_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = F.avg_pool2d(F.pad(x, self.padding), self.kernel_size, self.stride)
        if self.count_include_pad:
            return total
        inside = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), self.padding), self.kernel_size, self.stride)
        return total / inside

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"count_include_pad={self.count_include_pad}")


@functools.cache
def _register_converters() -> None:
    from onnx2torch.node_converters.registry import add_converter
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    @add_converter(operation_type="PaddedAveragePool", version=1, domain=_DOMAIN)
    def padded_average_pool(node, graph):  # noqa: ARG001 - onnx2torch's converter signature
        attrs = node.attributes
        kernel = list(attrs["kernel_shape"])
        module = PaddedAvgPool2d(kernel, list(attrs.get("strides", [1] * len(kernel))), list(attrs["pads"]),
                                 bool(attrs.get("count_include_pad", 0)))
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


def _convert(graph: _Graph, path: Path) -> nn.Module:
    """onnx2torch's GraphModule, rebuilt so that its modules sit at the dotted layer names."""
    from onnx2torch import convert
    from onnx2torch.onnx_graph import OnnxGraph
    from torch import fx

    try:
        converted = convert(graph.model)
    except (NotImplementedError, ValueError, KeyError, RuntimeError) as e:
        raise FeatureshiftError(
            f"{path} could not be converted to torch ({e.__class__.__name__}: {str(e).strip()[:300]})."
        ) from e
    # onnx2torch names each module as OnnxGraph.generate_node_name does; map those to ours
    targets = {OnnxGraph.generate_node_name(node): node.name.replace("/", ".") for node in graph.model.graph.node}
    root: dict[str, Any] = {}
    for node in converted.graph.nodes:
        if node.op == "call_module":
            module = _single_module(converted.get_submodule(node.target))
            node.target = targets.get(node.target, node.target.replace("/", "."))
            root[node.target] = module
        elif node.op == "get_attr":
            root[node.target] = converted.get_buffer(node.target)
    module = fx.GraphModule(root, converted.graph, class_name="OnnxNetwork")
    return module.eval()


class PaddedConv2d(nn.Conv2d):
    """A convolution after uneven zero padding (TensorFlow's SAME at a stride)."""

    def __init__(self, *args, pads: Sequence[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.pads = tuple(pads)  # F.pad's order: last axis first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pads={self.pads}"


class PaddedMaxPool2d(nn.MaxPool2d):
    """Max pooling after uneven padding that no window maximum can come from."""

    def __init__(self, *args, pads: Sequence[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.pads = tuple(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads, value=float("-inf")))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pads={self.pads}"


def _single_module(module: nn.Module) -> nn.Module:
    """onnx2torch's (pad, layer) pair for uneven pads as one module: a layer is one name, listed once."""
    from onnx2torch.node_converters.pad import OnnxPadStatic

    if not (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], OnnxPadStatic)
            and module[0].mode == "constant" and len(module[0].pads) == 4):
        return module
    pad, layer = module
    if type(layer) is nn.Conv2d and pad.constant_value == 0:
        single = PaddedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                              layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                              layer.padding_mode, pads=pad.pads)
        single.load_state_dict(layer.state_dict())
        return single
    if type(layer) is nn.MaxPool2d and pad.constant_value == float("-inf"):
        return PaddedMaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                               ceil_mode=layer.ceil_mode, pads=pad.pads)
    return module


def _output_width(module: nn.Module, size: int, in_chans: int = 3) -> int:
    with torch.no_grad():
        out = module(torch.zeros(1, in_chans, size, size))
    out = out[0] if isinstance(out, (list, tuple)) else out
    if out.dim() < 2:
        raise FeatureshiftError(f"The network's output has shape {tuple(out.shape)}, not (batch, classes).")
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
