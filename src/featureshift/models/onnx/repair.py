"""Graph edits that let onnx2torch convert what exporters write, each computing what the graph
computed: weights in Constant nodes, SAME padding, uneven pooling pads, NHWC inputs, shapes
fixed for one batch size, shapes that shape inference loses."""
from __future__ import annotations

import math
from pathlib import Path

from ...errors import FeatureshiftError
from .check import ort_session
from .common import (
    BATCH, DOMAIN, STANDARD_DOMAINS, attr, first_line, graph_shapes, node_label, real_inputs, set_attr, set_dims,
    size_text, value_shape,
)
from .names import node_key
from .ops import register_converters, resize_module


def constants_to_initializers(graph) -> None:
    """Weights stored as Constant nodes (PaddlePaddle's exporter, some TensorFlow graphs) become
    initializers: onnx2torch takes a layer's weights only from initializers."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if (node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS or node.output[0] in outputs
                or len(node.attribute) != 1):
            continue
        a = node.attribute[0]
        if a.name == "value" and a.t.data_type != TensorProto.STRING:
            tensor = numpy_helper.to_array(a.t)
        elif a.name in ("value_float", "value_floats"):
            tensor = np.array(a.f if a.name == "value_float" else list(a.floats), np.float32)
        elif a.name in ("value_int", "value_ints"):
            tensor = np.array(a.i if a.name == "value_int" else list(a.ints), np.int64)
        else:
            continue  # strings and sparse tensors are not weights
        graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        graph.node.remove(node)


def fold_initializer_identities(graph) -> None:
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


def nchw_input(graph, names: dict[str, str]) -> None:
    """Give an NHWC graph an NCHW input: drop the transposes that undo the layout, or add one."""
    from onnx import helper

    value = real_inputs(graph)[0]
    old = value.name
    new = old + "_nchw"
    n, h, w, c = value_shape(value)
    value.name = new
    set_dims(value, [n, c, h, w])
    consumers = [node for node in graph.node if old in node.input]
    if consumers and all(node.op_type == "Transpose" and attr(node, "perm") == [0, 3, 1, 2] for node in consumers):
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
    names[node_key(transpose)] = "input/Transpose"


def free_batch(model, hw: tuple[int, int]) -> None:
    """Leave the batch free and fix the image size at HW where the graph leaves it free; stored
    shapes are dropped (an exporter's hold its example's batch size; inferred afresh by fill_shapes)."""
    del model.graph.value_info[:]
    for value in model.graph.output:
        shape = value_shape(value)
        if shape:  # other free dims (-1, 0) as free names: shape inference rejects negative sizes
            set_dims(value, [BATCH] + [d if isinstance(d, int) else None for d in shape[1:]])
    value = real_inputs(model.graph)[0]
    n, c, h, w = value_shape(value)
    set_dims(value, [BATCH, c, h if isinstance(h, int) else hw[0], w if isinstance(w, int) else hw[1]])


def fill_shapes(model, path: Path, hw: tuple[int, int]):
    """Store every tensor's shape in MODEL's value_info, as onnx2torch needs them (a BatchNorm's
    rank, a pooling's) and featureshift's edits and layer listing do; returns the shapes by name
    (see graph_shapes).

    Shape inference (with the input size given) finds most. Where it loses them (a reshape to
    sizes computed in a way it does not follow, padding to whole patches), onnxruntime runs the
    graph once at the input size and the sizes it left open are read off its tensors; a free
    first axis (the batch, or a batch of windows) stays free. Where onnxruntime cannot run it
    (an operator it lacks) they stay open: the conversion then names what needs them."""
    import onnx
    from onnx import helper

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # onnx's inference errors have no common type
        raise FeatureshiftError(
            f"The shapes in {path} could not be worked out at a {size_text(hw)} input ({first_line(e)}). "
            "Give the input size the network was made for (--input-size)."
        ) from e
    known = {v.name: v for v in inferred.graph.value_info if value_shape(v) is not None}
    shapes = graph_shapes(inferred.graph)
    open_ = [o for node in model.graph.node for o in node.output
             if o and (shapes.get(o) is None or not all(isinstance(d, int) for d in shapes[o][1:]))]
    if open_:
        for name, (dtype, measured) in _shapes_from_onnxruntime(model, open_, hw).items():
            guess = shapes.get(name)
            if guess is not None and len(guess) == len(measured):
                measured = [g if isinstance(g, int) or (i == 0 and g) else m
                            for i, (g, m) in enumerate(zip(guess, measured))]
            known[name] = helper.make_tensor_value_info(name, dtype, measured)
    del model.graph.value_info[:]
    model.graph.value_info.extend(known.values())
    return graph_shapes(model.graph)


def _shapes_from_onnxruntime(model, names: list[str], hw: tuple[int, int]) -> dict[str, tuple]:
    """name -> (element type, shape) of NAMES when onnxruntime runs MODEL on one image at HW."""
    import numpy as np
    import onnx
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    value = real_inputs(probe.graph)[0]
    _, c, h, w = value_shape(value)
    elem = value.type.tensor_type.elem_type
    x = np.zeros((1, c if isinstance(c, int) else 3, h or hw[0], w or hw[1]), helper.tensor_dtype_to_np_dtype(elem))
    try:
        session = ort_session(probe, "find the shapes shape inference could not")
        results = session.run(names, {value.name: x})
    except Exception:  # noqa: BLE001 - onnxruntime's own types, and ours from ort_session
        return {}
    return {name: (helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))
            for name, array in zip(names, results) if isinstance(array, np.ndarray)}


def explicit_same_padding(graph, shapes: dict[str, list], path: Path) -> None:
    """Rewrite auto_pad SAME_UPPER/SAME_LOWER (TensorFlow's SAME) as the explicit pads it means at
    the input size: onnx2torch refuses auto_pad SAME. A strided layer's pads depend on the size,
    so at other sizes its padding stays that of the input size."""
    initializers = {i.name: i for i in graph.initializer}
    for node in graph.node:
        mode = attr(node, "auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("SAME_UPPER", "SAME_LOWER") or node.op_type not in ("Conv", "MaxPool", "AveragePool"):
            continue
        kernel = attr(node, "kernel_shape")
        if kernel is None and node.op_type == "Conv" and node.input[1] in initializers:
            kernel = list(initializers[node.input[1]].dims[2:])
        shape = shapes.get(node.input[0])
        if kernel is None or shape is None:
            raise FeatureshiftError(f"The padding of {node_label(node)} in {path} cannot be worked out.")
        rank = len(kernel)
        strides = attr(node, "strides") or [1] * rank
        dilations = attr(node, "dilations") or [1] * rank
        begins, ends = [], []
        for i in range(rank):
            size = shape[2 + i] if len(shape) == rank + 2 and isinstance(shape[2 + i], int) else None
            extent = (kernel[i] - 1) * dilations[i] + 1
            if strides[i] == 1:
                total = extent - 1
            elif size:
                total = max((math.ceil(size / strides[i]) - 1) * strides[i] + extent - size, 0)
            else:
                raise FeatureshiftError(
                    f"The input size of {node_label(node)} in {path} is unknown, so its SAME padding cannot be "
                    "made explicit; give --input-size."
                )
            small, large = total // 2, total - total // 2
            begins.append(small if mode == "SAME_UPPER" else large)
            ends.append(large if mode == "SAME_UPPER" else small)
        set_attr(node, "auto_pad", None)
        set_attr(node, "pads", begins + ends)


def free_batch_in_reshapes(graph, shapes: dict[str, list], batch: int) -> None:
    """A graph exported for one batch size reshapes to constant shapes starting with that size
    (torch's `x.view(1, -1)`); 0 ("keep this axis") makes them take any batch."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or attr(node, "allowzero", 0):
            continue
        target = initializers.get(node.input[1])
        data_shape = shapes.get(node.input[0])
        # only where the data's first axis is the (now free) batch axis
        if target is None or not data_shape or isinstance(data_shape[0], int):
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


def uneven_average_pools(model) -> None:
    """AveragePool with uneven pads (TensorFlow's SAME at a stride) becomes featureshift's own
    operator: onnx2torch refuses it and torch's pooling cannot pad unevenly."""
    rewritten = False
    for node in model.graph.node:
        if node.op_type != "AveragePool" or node.domain not in STANDARD_DOMAINS:
            continue
        pads = attr(node, "pads")
        kernel = attr(node, "kernel_shape")
        if not pads or len(kernel) != 2 or pads[:2] == pads[2:] or attr(node, "ceil_mode", 0):
            continue
        node.domain = DOMAIN
        node.op_type = "PaddedAveragePool"
        rewritten = True
    if rewritten:
        _declare_domain(model)
    register_converters()


def _declare_domain(model) -> None:
    if not any(o.domain == DOMAIN for o in model.opset_import):
        op = model.opset_import.add()
        op.domain, op.version = DOMAIN, 1


def own_resizes(model) -> None:
    """Resize nodes (opset 11 and later) that torch's interpolate computes exactly become
    featureshift's own operator (ops.Resize): onnx2torch has no converter for opsets 18 and 19
    and gives cubic resampling torch's coefficient whatever the graph says. Run after the shapes
    are stored (shape inference does not know the operator) and before an opset conversion
    (which leaves the operator as it is, antialiasing included)."""
    from onnx import helper

    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
    if opset < 11:
        return
    rewritten = False
    for node in model.graph.node:
        if node.op_type != "Resize" or node.domain not in STANDARD_DOMAINS:
            continue
        try:
            resize_module({a.name: helper.get_attribute_value(a) for a in node.attribute})
        except NotImplementedError:
            continue  # onnx2torch's converter approximates it; the check says whether that is close enough
        node.domain = DOMAIN
        rewritten = True
    if rewritten:
        _declare_domain(model)
    register_converters()
