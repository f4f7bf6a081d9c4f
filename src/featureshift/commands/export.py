"""Write a network (a snapshot, or a model name with its weights) as an ONNX file that carries
its classes and preprocessing, after checking it against onnxruntime.

The check runs the network and the ONNX graph on the same random batch; the file is written
(atomically) only when their largest difference is within the tolerance, so an ONNX file
featureshift wrote always computes what the network does.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import FeatureshiftError
from ..models.info import ModelInfo
from ..models.onnx_io import CHECK_TOLERANCE, OnnxCheck, check_with_onnxruntime, require_onnx, save_onnx, to_onnx


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
                 f"input {shape} normalized RGB)"]
        if self.check is not None:
            lines.append(f"onnxruntime check passed: {self.check.describe()}")
        else:
            lines.append("onnxruntime check skipped")
        return "\n".join(lines)


def export(snapshot_or_model: str | os.PathLike, output: str | os.PathLike, *, weights: str = "imagenet",
           opset: int = 17, tolerance: float = CHECK_TOLERANCE, check: bool = True) -> ExportResult:
    """Write SNAPSHOT_OR_MODEL (a snapshot file, or a model name with WEIGHTS: imagenet, random or
    a weights file) to OUTPUT as ONNX at OPSET, with its classes and preprocessing in the metadata.

    check: run the network and the ONNX graph (onnxruntime) on a random batch first and raise
    FeatureshiftError, writing nothing, when the largest absolute difference of the logits is
    above TOLERANCE x max(1, largest |logit|).
    """
    require_onnx()
    from ..network import open_network

    if opset < 7:
        raise FeatureshiftError(f"--opset {opset} is older than any exporter writes; use 13 or later.")
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
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_param or d.dim_value for d in dims)
    declared = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return ExportResult(path, net.info, declared, shape, result)
