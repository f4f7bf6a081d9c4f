"""Torch modules and onnx2torch converters that featureshift adds: uneven padding (TensorFlow's
SAME at a stride) as one layer, and Resize as opsets 11 to 19 define it (onnx2torch has none
for 18 and 19, whose antialias a vision transformer's export uses, and approximates cubic
resampling with torch's own coefficient)."""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import DOMAIN

# Resize's modes as torch's interpolate names them, by the number of resized (spatial) axes.
_INTERPOLATE_MODES = {("nearest", 1): "nearest", ("nearest", 2): "nearest", ("nearest", 3): "nearest",
                      ("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear",
                      ("cubic", 2): "bicubic"}


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


def single_module(module: nn.Module) -> nn.Module:
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


class Resize(nn.Module):
    """ONNX's Resize of the spatial axes (batch and channels kept) as torch's interpolate, with
    antialiasing when downscaling (opset 18's antialias=1, what torch's exporter writes for
    interpolate(antialias=True))."""

    def __init__(self, mode: str, align_corners: bool | None, antialias: bool):
        super().__init__()
        self.mode, self.align_corners, self.antialias = mode, align_corners, antialias

    def forward(self, x: torch.Tensor, roi: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                sizes: torch.Tensor | None = None) -> torch.Tensor:
        mode = self.mode if self.mode == "nearest-exact" else _INTERPOLATE_MODES.get((self.mode, x.dim() - 2))
        if mode is None:
            raise NotImplementedError(f"Resize in {self.mode} mode of {x.dim() - 2} axes has no torch equivalent")
        size = scale = None
        if sizes is not None and sizes.numel():
            size = [int(s) for s in sizes.tolist()]
            if size[:2] != list(x.shape[:2]):
                raise NotImplementedError("Resize of the batch or channel axis has no torch equivalent")
            size = size[2:]
        elif scales is not None and scales.numel():
            scale = [float(s) for s in scales.tolist()]
            if scale[:2] != [1.0, 1.0]:
                raise NotImplementedError("Resize of the batch or channel axis has no torch equivalent")
            scale = scale[2:]
        antialias = self.antialias and mode in ("bilinear", "bicubic")
        return F.interpolate(x, size=size, scale_factor=scale, mode=mode, align_corners=self.align_corners,
                             antialias=antialias)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, align_corners={self.align_corners}, antialias={self.antialias}"


def resize_module(attributes: dict) -> Resize:
    """The Resize module for a node's ATTRIBUTES (opsets 11 to 19), or NotImplementedError naming
    what torch's interpolate does not do. Whatever is close but not exact is left to the check
    against onnxruntime."""
    def text(name, default):
        value = attributes.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    mode = text("mode", "nearest")
    transform = text("coordinate_transformation_mode", "half_pixel")
    antialias = bool(attributes.get("antialias", 0)) and mode != "nearest"
    unsupported = []
    if attributes.get("axes") is not None:
        unsupported.append("axes")
    if text("keep_aspect_ratio_policy", "stretch") != "stretch":
        unsupported.append("keep_aspect_ratio_policy " + text("keep_aspect_ratio_policy", ""))
    if mode == "nearest":
        # torch's nearest is ONNX's asymmetric floor; its nearest-exact the half-pixel one rounding up
        exact = transform in ("half_pixel", "pytorch_half_pixel") and text("nearest_mode", "") == "round_prefer_ceil"
        return Resize("nearest-exact" if exact else "nearest", None, False)
    if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        unsupported.append(f"coordinate_transformation_mode {transform}")
    if mode == "linear" and antialias and attributes.get("exclude_outside", 0) != 1:
        # torch's antialiased bilinear leaves the outside out (and its exporter says so)
        unsupported.append("antialias without exclude_outside")
    if mode == "cubic":
        # torch's bicubic is a = -0.75; its antialiased bicubic a = -0.5 with the outside excluded,
        # which is also what plain a = -0.5 cubic computes when enlarging
        cubic = (attributes.get("cubic_coeff_a", -0.75), attributes.get("exclude_outside", 0))
        if cubic == (-0.5, 1):
            antialias = True
        elif cubic != (-0.75, 0) or antialias:
            unsupported.append(f"cubic_coeff_a {cubic[0]} and exclude_outside {cubic[1]}")
    if unsupported:
        raise NotImplementedError(f"Resize with {', '.join(unsupported)} has no torch equivalent")
    return Resize(mode, transform == "align_corners", antialias)


@functools.cache
def register_converters() -> None:
    """Add featureshift's converters to onnx2torch's registry (once; only those it lacks)."""
    from onnx2torch.node_converters.registry import add_converter, get_converter
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def padded_average_pool(node, graph):  # noqa: ARG001 - onnx2torch's converter signature
        attrs = node.attributes
        kernel = list(attrs["kernel_shape"])
        module = PaddedAvgPool2d(kernel, list(attrs.get("strides", [1] * len(kernel))), list(attrs["pads"]),
                                 bool(attrs.get("count_include_pad", 0)))
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

    def resize(node, graph):  # noqa: ARG001 - onnx2torch's converter signature
        return OperationConverterResult(torch_module=resize_module(node.attributes),
                                        onnx_mapping=onnx_mapping_from_node(node))

    for op, version, domain, converter in (("PaddedAveragePool", 1, DOMAIN, padded_average_pool),
                                           ("Resize", 1, DOMAIN, resize)):
        try:
            get_converter(operation_type=op, version=version, domain=domain)
        except NotImplementedError:
            add_converter(operation_type=op, version=version, domain=domain)(converter)
