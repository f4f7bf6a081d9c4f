"""What every ONNX job needs: the optional stack, reading a file, node attributes, and the
dimensions a graph leaves free.

Exporters write a free dimension (the batch, mostly) as a name ("batch", "N"), as -1
(PaddlePaddle) or as 0; all three are free here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import FeatureshiftError

ONNX_SUFFIX = ".onnx"
INSTALL_HINT = "pip install 'featureshift[onnx]'"
# Operators featureshift converts itself (onnx2torch cannot), under their own ONNX domain.
DOMAIN = "featureshift"
STANDARD_DOMAINS = ("", "ai.onnx")
# The name featureshift gives a graph's free batch dimension while it converts the graph.
BATCH = "batch"


def require_onnx() -> None:
    """Import the optional ONNX stack, or say how to install it."""
    missing = []
    try:
        import onnx  # noqa: F401
    except ImportError:
        missing.append("onnx")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        missing.append("onnxruntime")
    try:
        import onnx2torch  # noqa: F401
    except ImportError:
        missing.append("onnx2torch")
    if missing:
        raise FeatureshiftError(
            f"ONNX support needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed. Install it with: {INSTALL_HINT}"
        )


def is_onnx_path(spec: str | os.PathLike) -> bool:
    """Whether a model argument names an ONNX file."""
    return str(spec).lower().endswith(ONNX_SUFFIX)


def read_onnx(path: str | os.PathLike, data: bytes | None = None):
    """The ModelProto in the file at PATH (or in DATA, its bytes already read), or a FeatureshiftError."""
    import onnx

    path = Path(path)
    if data is None and not path.is_file():
        raise FeatureshiftError(f"ONNX file {path} does not exist.")
    try:
        return onnx.load_model_from_string(data) if data is not None else onnx.load(str(path))
    except Exception as e:  # protobuf's and onnx's many types; the message is what helps
        raise FeatureshiftError(
            f"{path} is not a readable ONNX file ({e.__class__.__name__}: {first_line(e, 200)})."
        ) from e


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's message, at most LIMIT characters: libraries' messages
    run to stack dumps."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else error.__class__.__name__ if isinstance(error, BaseException) else "")[:limit]


def declared_opset(model) -> int:
    """The version of the standard ONNX operator set a ModelProto declares."""
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)


def real_inputs(graph) -> list:
    """The graph's inputs that are not initializers (older exporters list weights as inputs too)."""
    initializers = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def dim_of(d) -> int | str | None:
    """A TensorShapeProto dimension: its size when positive, else its name, else None."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    return d.dim_param or None


def value_shape(value) -> list | None:
    """The dims of a ValueInfoProto (see dim_of), or None when its rank is unknown."""
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [dim_of(d) for d in t.shape.dim]


def input_dims(graph) -> list[int] | None:
    """The first real input's sizes (0 where free), or None when its rank is unknown."""
    inputs = real_inputs(graph)
    shape = value_shape(inputs[0]) if inputs else None
    return None if shape is None else [d if isinstance(d, int) else 0 for d in shape]


def graph_shapes(graph) -> dict[str, list]:
    """Every tensor of GRAPH with a known rank, by name: its dims (see dim_of)."""
    out = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        shape = value_shape(v)
        if shape is not None:
            out[v.name] = shape
    return out


def with_free_dims(model):
    """MODEL, or a copy of it where the inputs' and outputs' dims written as 0 or -1 are free:
    onnxruntime takes 0 for an empty axis."""
    def shaped(m):
        return [v for v in [*m.graph.input, *m.graph.output] if v.type.tensor_type.HasField("shape")]

    dims = [d for v in shaped(model) for d in v.type.tensor_type.shape.dim]
    if not any(d.HasField("dim_value") and d.dim_value <= 0 for d in dims):
        return model
    copy = type(model).FromString(model.SerializeToString())
    for v in shaped(copy):
        set_dims(v, value_shape(v))
    return copy


def set_dims(value, dims: list) -> None:
    """Replace the dims of a ValueInfoProto: ints as sizes, strings as names, None as free."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif d:
            dim.dim_param = d


def is_nhwc(graph, dims: list[int]) -> bool:
    """Whether a graph whose first input has DIMS (0 where free) takes channels-last images."""
    inputs = real_inputs(graph)
    consumers = [n for n in graph.node if inputs[0].name in n.input] if inputs else []
    if consumers and all(n.op_type == "Transpose" and attr(n, "perm") == [0, 3, 1, 2] for n in consumers):
        return True
    # no transposing node to go by: channels last when the last axis looks like colours
    return dims[3] in (1, 3, 4) and dims[1] not in (0, 1, 3, 4)


def attr(node, name: str, default=None):
    """A node's attribute as a Python value (bytes for strings, a list for ints), or DEFAULT."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a) if a.type != a.INTS else list(a.ints)
    return default


def text_attr(node, name: str, default: str) -> str:
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def set_attr(node, name: str, value) -> None:
    """Set (or with None remove) a node's attribute."""
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def node_label(node) -> str:
    """How an error names a node: its name and operator."""
    return f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"


def size_text(size: int | tuple[int, int]) -> str:
    """An input size for people: 224x224, 48x192."""
    h, w = (size, size) if isinstance(size, int) else size
    return f"{h}x{w}"


def parse_size(text: str) -> int | tuple[int, int]:
    """An input size as the command line gives it: "224" (square) or "48x192" (height x width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*,]\s*(\d+)\s*)?", text)
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise FeatureshiftError(
            f"'{text}' is not an input size: give one number for a square input (224) or HEIGHTxWIDTH (48x192)."
        )
    h, w = int(m.group(1)), int(m.group(2) or m.group(1))
    return h if h == w else (h, w)
