"""A featureshift network as an ONNX graph (torch's default exporter) carrying its classes and
preprocessing in the metadata, so the file alone says how to feed it; opset conversion; saving."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import FeatureshiftError
from ...io import atomic_path
from ...version import __version__
from ..info import ModelInfo
from .common import STANDARD_DOMAINS, attr, first_line, graph_shapes, node_label, require_onnx, set_attr
from .metadata import metadata_entries, set_metadata
from .names import node_key, node_names

# torch's default exporter writes this opset natively; older ones go through onnx's converter.
EXPORTER_OPSET = 18
# What an export writes unless told otherwise: read by every runtime of the last years.
DEFAULT_OPSET = 17
# Where Pad nodes wait while onnx's converter runs (it has no Pad adapter from opset 18 down).
_PASS_THROUGH = "featureshift.pass_through"


def to_onnx(module: nn.Module, info: ModelInfo, *, opset: int | None = None, batch: int = 2,
            extra_metadata: dict[str, Any] | None = None):
    """MODULE (normalized NCHW images in) as an ONNX ModelProto: torch's default exporter, node
    names from the module paths, INFO in the metadata.

    The graph takes any batch size and, where the network does, any image size (a network whose
    code fixes them exports for INFO's input size, or for its example batch size). OPSET: the
    opset to write; None: DEFAULT_OPSET, or the exporter's own where a size-free graph needs it
    (a vision transformer resamples its position embeddings with antialiasing, which opset 17
    cannot express; at one input size that resampling does nothing and opset 17 takes it)."""
    require_onnx()
    import onnx

    target = opset or DEFAULT_OPSET
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    x = torch.randn(batch, info.in_chans, info.input_size, info.input_size, device=device)
    dim = torch.export.Dim
    attempts = (({0: dim("batch"), 2: dim("height"), 3: dim("width")},), ({0: dim("batch")},), None)
    errors: list[str] = []
    model = None
    was_training = module.training
    module.eval()
    try:
        for shapes in attempts:
            try:
                program = torch.onnx.export(module, (x,), dynamo=True, opset_version=max(target, EXPORTER_OPSET),
                                            dynamic_shapes=shapes, input_names=["input"], output_names=["logits"],
                                            verbose=False)
            except Exception as e:  # the exporter raises many types; the message is what helps
                errors.append(f"torch could not export this {info.arch} network to ONNX ({e.__class__.__name__}: "
                              f"{first_line(e)}).")
                continue
            model = program.model_proto
            _name_exported_nodes(model)  # before converting: onnx's converter drops the module paths
            if shapes is attempts[0]:
                # stored shapes are the example's; at other sizes they would mislead a reader
                del model.graph.value_info[:]
            if target < EXPORTER_OPSET:
                try:
                    model = convert_opset(model, target)
                except FeatureshiftError as e:
                    if opset is None and shapes is attempts[0]:
                        break  # size-free at the exporter's opset
                    errors.append(str(e))
                    model = None
                    continue
            break
    finally:
        module.train(was_training)
    if model is None:
        raise FeatureshiftError(errors[-1])
    set_metadata(model, metadata_entries(info, extra_metadata))
    model.doc_string = f"{info.arch} exported by featureshift {__version__}"
    onnx.checker.check_model(model)
    return model


def _name_exported_nodes(model) -> None:
    names = node_names(model.graph)
    for node in model.graph.node:
        node.name = names[node_key(node)].replace("/", ".")


def convert_opset(model, opset: int):
    """MODEL converted to OPSET by onnx's version converter, or a FeatureshiftError naming the
    operator that OPSET cannot express.

    Beyond the converter: a Resize that antialiases (opset 18) where it does not shrink the image
    (a vision transformer's position embeddings at their own size) loses the attribute, which
    changes nothing there; a Pad without axes (the same in opsets 13 to 18) keeps its form;
    attributes the converter carries over from newer operator versions (ReduceMean-18's
    noop_with_empty_axes into ReduceMean-13), which the older version does not allow, are dropped.
    """
    import onnx
    from onnx import defs, version_converter

    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's stays as it was
    _drop_idle_antialias(model, opset)
    passed = [node for node in model.graph.node if node.op_type == "Pad" and node.domain in STANDARD_DOMAINS
              and (len(node.input) < 4 or not node.input[3])]
    for node in passed:
        node.domain = _PASS_THROUGH
    if passed:
        entry = model.opset_import.add()
        entry.domain, entry.version = _PASS_THROUGH, 1
    try:
        model = version_converter.convert_version(model, opset)
    except Exception as e:  # the converter's C++ assertions arrive as RuntimeError, others as they come
        message = first_line(e)
        op = message.rsplit(" for ", 1)[-1].strip(". ") if "No Adapter" in message else None
        raise FeatureshiftError(
            f"The graph could not be converted to opset {opset}: "
            + (f"onnx's converter cannot express its {op} operators in that opset. " if op else f"{message}. ")
            + f"Use opset {max(opset + 1, EXPORTER_OPSET)} or later (--opset)."
        ) from e
    for node in model.graph.node:
        if node.domain == _PASS_THROUGH:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != _PASS_THROUGH]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            continue
        try:
            allowed = defs.get_schema(node.op_type, max_inclusive_version=opset).attributes
        except defs.SchemaError:
            continue
        for a in [a for a in node.attribute if a.name not in allowed]:
            node.attribute.remove(a)
    return model


def _drop_idle_antialias(model, opset: int) -> None:
    if opset >= 18:
        return
    resizes = [n for n in model.graph.node
               if n.op_type == "Resize" and n.domain in STANDARD_DOMAINS and attr(n, "antialias", 0)]
    if not resizes:
        return
    import onnx

    shapes = graph_shapes(model.graph)
    if any(n.input[0] not in shapes or n.output[0] not in shapes for n in resizes):
        try:
            shapes.update(graph_shapes(onnx.shape_inference.infer_shapes(model, data_prop=True).graph))
        except Exception:  # noqa: BLE001 - without shapes the error below says what cannot be converted
            pass
    for node in resizes:
        before, after = shapes.get(node.input[0]), shapes.get(node.output[0])
        if (before is None or after is None or len(before) != len(after) or not all(
                isinstance(b, int) and isinstance(a, int) and a >= b for b, a in zip(before[2:], after[2:]))):
            raise FeatureshiftError(
                f"The graph's {node_label(node)} shrinks an image with antialiasing (or its sizes are not known), "
                f"which opset {opset} cannot express. Use opset 18 or later (--opset 18)."
            )
        set_attr(node, "antialias", None)


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
