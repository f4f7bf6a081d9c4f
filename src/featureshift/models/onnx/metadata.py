"""featureshift's entries in an ONNX file's metadata_props (what a reader needs to feed the
network), and what a file carries, read without converting it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ...errors import FeatureshiftError
from ...version import __version__
from ..info import ModelInfo
from .common import INSTALL_HINT, declared_opset, input_dims, is_nhwc, read_onnx, real_inputs, value_shape

METADATA_PREFIX = "featureshift."


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
    inputs = real_inputs(model.graph)
    dims = input_dims(model.graph)
    images = dims is not None and len(dims) == 4
    nhwc = images and is_nhwc(model.graph, dims)
    in_chans = ((dims[3] if nhwc else dims[1]) or None) if images else None
    out_shape = value_shape(model.graph.output[0]) if model.graph.output else None
    classes = out_shape[-1] if out_shape and len(out_shape) == 2 and isinstance(out_shape[-1], int) else None
    return {
        "file": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        "opset": declared_opset(model),
        "ir_version": model.ir_version,
        "graph": model.graph.name or None,
        "inputs": {i.name: value_shape(i) for i in inputs},
        "outputs": {o.name: value_shape(o) for o in model.graph.output},
        "layout": ("NHWC" if nhwc else "NCHW") if images else None,
        "in_chans": in_chans,
        "num_classes": classes or (meta.get("num_classes") if isinstance(meta.get("num_classes"), int) else None),
        "nodes": len(model.graph.node),
        "featureshift": meta,
    }
