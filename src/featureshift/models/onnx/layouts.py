"""Which nodes of an ONNX graph output a feature map or a token sequence, and how it is laid out.

A converted graph is a flat list of operators, so the rules that tell a torch network's layers
apart (module classes) do not apply: a layout Transpose, a detection head's reshapes or an
attention's (batch, heads, tokens, tokens) scores are 4-D or 3-D like the maps and tokens one
wants to see. Here the channel axis is followed through the graph from where it is certain:
the input and every convolution, pooling or normalization over images (channels on axis 1).

- Operators that keep the rank keep it (elementwise operators, Concat, Softmax, Pad, ...);
  a MatMul with a weight keeps it when it acts on the channels (the last axis).
- A Transpose moves it; a Reshape (Flatten, Squeeze, Unsqueeze) keeps it where the channels
  stay whole on one axis with the batch unchanged: NCHW -> (B, C, H*W), NHWC -> (B, H*W, C),
  swin's merge of 2x2 positions into 4C channels. Splitting channels (a transformer's heads,
  a detection head's bins) or folding the batch (swin's windows) loses it.
- Anything else loses it.

Listed are the nodes that compute (not the ones that only move or select values: Transpose,
Reshape, Slice, ...) whose output holds the batch on axis 0 and the channels on axis 1 of a
4-D map (NCHW), on the last axis of a 4-D map (NHWC) or of a 3-D sequence (tokens).
"""
from __future__ import annotations

import dataclasses
import math

from .common import attr, graph_shapes, real_inputs
from .names import node_key

NCHW, NHWC, TOKENS = "NCHW", "NHWC", "tokens"

# Operators whose output has its channels on axis 1 whatever their input: ONNX defines them so.
CHANNELS_FIRST_OPS = frozenset({
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "LRN", "BatchNormalization", "InstanceNormalization", "GroupNormalization", "DepthToSpace",
    "SpaceToDepth", "PaddedAveragePool", "MaxUnpool",
})
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# Operators that only move, copy or select values: they pass the layout on and are not listed
# (their output is what a listed layer before them computed).
MOVES = RESHAPES | {"Transpose", "Pad", "Identity", "Dropout", "Cast", "CastLike", "Expand", "Tile", "Slice", "Gather",
                    "GatherElements", "GatherND", "Split", "Shape", "Size"}
MATMULS = frozenset({"MatMul", "Gemm"})


@dataclasses.dataclass
class GraphLayouts:
    """What featureshift lists of a graph."""
    layouts: dict[str, str]  # node key -> NCHW, NHWC or tokens, for the nodes listed as layers
    prefix: int  # tokens put before the patch tokens (class token, registers); 0 when there are none


def graph_layouts(model) -> GraphLayouts:
    """The layers of MODEL, a ModelProto whose value_info holds every tensor's shape (see
    repair.fill_shapes) and whose first input is an NCHW image batch."""
    graph = model.graph
    shapes = graph_shapes(graph)
    axis: dict[str, int] = {real_inputs(graph)[0].name: 1}  # tensor -> its channel axis
    layouts: dict[str, str] = {}
    prefix = None
    for node in graph.node:
        out = node.output[0] if node.output else ""
        out_shape = shapes.get(out)
        if not out or out_shape is None:
            continue
        found = _channel_axis(node, axis, shapes, out_shape)
        if found is None:
            continue
        for name in node.output:  # Split's outputs, Dropout's mask aside
            if shapes.get(name) is not None and len(shapes[name]) == len(out_shape):
                axis[name] = found
        kind = _kind(len(out_shape), found)
        if kind is not None and node.op_type not in MOVES:
            layouts[node_key(node)] = kind
        if prefix is None and kind == TOKENS and node.op_type == "Concat":
            prefix = _prefix_tokens(node, axis, shapes)
    return GraphLayouts(layouts, prefix or 0)


def _kind(rank: int, channel_axis: int) -> str | None:
    if rank == 4:
        return {1: NCHW, 3: NHWC}.get(channel_axis)
    if rank == 3 and channel_axis == 2:
        return TOKENS
    return None


def _channel_axis(node, axis: dict[str, int], shapes: dict, out_shape: list) -> int | None:
    """Where NODE's output holds the channels, or None when it holds none on one axis."""
    op = node.op_type
    rank = len(out_shape)
    if op in CHANNELS_FIRST_OPS and node.domain in ("", "ai.onnx", "featureshift"):
        return 1 if rank >= 3 else None
    carriers = [name for name in node.input if name in axis]
    if not carriers:
        return None
    # the input the output takes its shape from (an elementwise operator's other inputs broadcast)
    source = next((n for n in carriers if shapes.get(n) == out_shape), carriers[0])
    in_shape, channel = shapes.get(source), axis[source]
    if in_shape is None:
        return None
    if op == "Transpose":
        perm = attr(node, "perm") or list(range(len(in_shape)))[::-1]
        return perm.index(channel) if perm[0] == 0 else None
    if op in RESHAPES:
        return _axis_after_reshape(in_shape, out_shape, channel)
    if op in MATMULS:
        if node.input[0] != source or any(n in axis for n in node.input[1:2]):
            return None  # a product of two activations (attention) or with the weight first
        last = len(in_shape) - 1
        return rank - 1 if channel == last and rank == len(in_shape) else None
    if op == "Concat" and len({axis[n] for n in carriers}) > 1:
        return None
    return channel if rank == len(in_shape) else None


def _axis_after_reshape(src: list, dst: list, channel: int) -> int | None:
    """The axis of a reshape's output DST that holds the channels on axis CHANNEL of its input SRC:
    the one axis its group of input axes becomes (axes grouped by equal sizes), None when the
    channels are split over several axes or the batch changes."""
    if channel == 0 or not all(isinstance(d, int) for d in [*src[1:], *dst[1:]]):
        return None
    src, dst = src[1:], dst[1:]
    if math.prod(src) != math.prod(dst):
        return None  # the batch axis took or gave some of the other axes
    i = j = 0
    while i < len(src) and j < len(dst):
        start_i, start_j = i, j
        a, b = src[i], dst[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b and i < len(src):
                a, i = a * src[i], i + 1
            elif b < a and j < len(dst):
                b, j = b * dst[j], j + 1
            else:
                return None
        if start_i <= channel - 1 < i:
            return start_j + 1 if j - start_j == 1 else None
    return None


def _prefix_tokens(node, axis: dict[str, int], shapes: dict) -> int | None:
    """The tokens a Concat puts before the first of the image's tokens (a class token, registers),
    when it joins them along the tokens axis; None for another Concat."""
    if attr(node, "axis") not in (1, -2):
        return None
    count = 0
    for name in node.input:
        if name in axis:
            return count
        shape = shapes.get(name)
        if shape is None or len(shape) != 3 or not isinstance(shape[1], int):
            return None
        count += shape[1]
    return None
