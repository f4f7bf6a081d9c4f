"""Write a network (a snapshot, or a model name with its weights) as an ONNX file that carries
its classes and preprocessing, after checking it against onnxruntime.

The check runs the network and the ONNX graph on the same random batch; the file is written
(atomically) only when their largest difference is within the tolerance, so an ONNX file
featureshift wrote always computes what the network does.

An ONNX file from elsewhere (tf2onnx's, say) is copied with its graph unchanged and the
preprocessing given here added to its metadata, so that every command reads it without flags.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

from ..errors import FeatureshiftError
from ..models.info import ModelInfo
from ..models.onnx.check import CHECK_TOLERANCE, OnnxCheck, check_with_onnxruntime
from ..models.onnx.common import declared_opset, is_onnx_path, require_onnx
from ..models.onnx.convert import import_onnx
from ..models.onnx.export import save_onnx, to_onnx
from ..models.onnx.metadata import metadata_entries, set_metadata


@dataclasses.dataclass
class ExportResult:
    path: Path
    info: ModelInfo
    opset: int  # the opset the file declares
    input_shape: tuple[int | str, ...]  # as the graph declares it ("batch": any batch size)
    check: OnnxCheck | None  # None when the check was skipped

    def describe(self) -> str:
        """Lines for people: what was written and how it compares with onnxruntime."""
        shape = "x".join(map(str, self.input_shape))
        lines = [f"wrote {self.path} ({self.info.arch}, {self.info.num_classes} classes, opset {self.opset}, "
                 f"input {shape})"]
        if self.check is not None:
            lines.append(f"onnxruntime check passed: {self.check.describe()}")
        else:
            lines.append("onnxruntime check skipped")
        return "\n".join(lines)


def export(snapshot_or_model: str | os.PathLike, output: str | os.PathLike, *, weights: str = "imagenet",
           opset: int | None = None, tolerance: float = CHECK_TOLERANCE, check: bool = True,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           input_size: int | tuple[int, int] | None = None) -> ExportResult:
    """Write SNAPSHOT_OR_MODEL (a snapshot file, or a model name with WEIGHTS: imagenet, random or
    a weights file) to OUTPUT as ONNX at OPSET (None: 17, or 18 where the graph needs it to take
    any image size; see models.onnx.export.to_onnx), with its classes and preprocessing in the
    metadata.

    check: run the network and the ONNX graph (onnxruntime) on a random batch first and raise
    FeatureshiftError, writing nothing, when the largest absolute difference of the logits is
    above TOLERANCE x max(1, largest |logit|).

    An ONNX file as SNAPSHOT_OR_MODEL is copied, graph unchanged (OPSET ignored), with MEAN, STD
    and INPUT_SIZE (pixels, or (height, width); else what its metadata already says) written into
    its metadata; check: its conversion to torch is checked against onnxruntime as when it is loaded.
    """
    require_onnx()
    from ..network import open_network

    if is_onnx_path(snapshot_or_model):
        return _annotate(Path(snapshot_or_model), Path(output), mean=mean, std=std, input_size=input_size,
                         tolerance=tolerance, check=check)
    if mean is not None or std is not None or input_size is not None:
        raise FeatureshiftError(
            "--mean, --std and --input-size are for an ONNX file that lacks them; a snapshot or a model "
            "name carries its own preprocessing."
        )
    net = open_network(snapshot_or_model, weights, device="cpu")
    extra = {}
    if net.meta is not None:
        extra = {"epoch": net.meta.epoch, "checksum": net.meta.checksum, "source": net.path.name}
    model = to_onnx(net.module, net.info, opset=opset, extra_metadata=extra)
    result = None
    if check:
        result = check_with_onnxruntime(net.module, model, size=net.info.input_size, tolerance=tolerance)
        if not result.ok:
            raise FeatureshiftError(
                f"The ONNX graph does not compute what the network does: {result.describe()}. "
                f"{output} was not written."
            )
    path = save_onnx(model, output)
    return ExportResult(path, net.info, declared_opset(model), _input_shape(model), result)


def _annotate(source: Path, output: Path, *, mean, std, input_size, tolerance: float, check: bool) -> ExportResult:
    imported = import_onnx(source, mean=mean, std=std, input_size=input_size, check=check, tolerance=tolerance)
    info = dataclasses.replace(imported.module.featureshift_info, arch=imported.source_arch)
    model = imported.model
    extra = {"input": "float32 NHWC RGB, scaled to [0, 1] then normalized with mean and std"} if imported.nhwc else {}
    h, w = imported.input_hw
    if h != w:  # read back as the input's height and width
        extra["input_size"] = [h, w]
    set_metadata(model, metadata_entries(info, extra))
    path = save_onnx(model, output)
    return ExportResult(path, info, declared_opset(model), _input_shape(model), imported.check)


def _input_shape(model) -> tuple[int | str, ...]:
    initializers = {i.name for i in model.graph.initializer}
    value = next(i for i in model.graph.input if i.name not in initializers)
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
