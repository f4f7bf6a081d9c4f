"""A converted network against onnxruntime, and running a converted network so that a failure
names the operator."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import fx, nn

from ...errors import FeatureshiftError
from .common import first_line, input_dims, with_free_dims

# A converted network passes when its largest absolute difference from onnxruntime is at most
# CHECK_TOLERANCE times the scale of the reference output (its largest magnitude, at least 1):
# float32 graphs computed by two libraries differ by ~1e-6 of that scale, while a wrongly
# converted layer (padding, layout, window) shows up as differences of 1e-2 and more.
CHECK_TOLERANCE = 1e-3


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


def ort_session(model, what: str):
    """An onnxruntime CPU session of the ModelProto MODEL; WHAT says why, for the error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: its errors reach the user as our paragraph, not as log lines
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise FeatureshiftError(f"onnxruntime cannot load the graph to {what} ({first_line(e)}).") from e


def check_with_onnxruntime(module: nn.Module, model, *, batch: int = 2, size: int | tuple[int, int] | None = None,
                           nhwc: bool = False, tolerance: float = CHECK_TOLERANCE, seed: int = 0) -> OnnxCheck:
    """Run MODULE and the ONNX ModelProto MODEL (whose first output is compared) on the same random
    NCHW batch at SIZE (pixels, or height and width); NHWC: MODEL takes the batch channels-last.
    Sizes the graph fixes win over the arguments."""
    import numpy as np

    fixed = input_dims(model.graph)
    h, w = (size, size) if not isinstance(size, (tuple, list)) else size
    channels = 3
    if fixed is not None and len(fixed) == 4:
        n, fh, fw = (fixed[0], fixed[1], fixed[2]) if nhwc else (fixed[0], fixed[2], fixed[3])
        channels = (fixed[3] if nhwc else fixed[1]) or channels
        batch, h, w = n or batch, fh or h, fw or w
    if not h or not w:
        raise FeatureshiftError("The ONNX graph's input size is not fixed; give the input size to check it.")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g)
    feed = x.permute(0, 2, 3, 1).numpy() if nhwc else x.numpy()
    session = ort_session(with_free_dims(model), "check the conversion")
    try:
        input_name = session.get_inputs()[0].name
        ref = session.run([model.graph.output[0].name], {input_name: np.ascontiguousarray(feed)})[0]
    except Exception as e:  # onnxruntime's own exception types
        raise FeatureshiftError(
            f"onnxruntime could not run the graph on a {'x'.join(map(str, feed.shape))} batch to check it "
            f"({first_line(e)})."
        ) from e
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    got = run_module(module, x.to(device)).detach().float().cpu().numpy()
    if got.shape != ref.shape:
        raise FeatureshiftError(
            f"The converted network's output has shape {got.shape}, onnxruntime's {ref.shape}."
        )
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    if not math.isfinite(diff):
        diff = math.inf
    return OnnxCheck(diff, float(np.abs(ref).max()) if ref.size else 0.0, tolerance, tuple(x.shape))


def run_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MODULE's first output on X in eval mode without gradients; when a converted operator fails,
    a FeatureshiftError naming it (an fx graph runs node by node to know which)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = NamingInterpreter(module).run(x) if isinstance(module, fx.GraphModule) else module(x)
    finally:
        module.train(was_training)
    return out[0] if isinstance(out, (list, tuple)) else out


class NamingInterpreter(fx.Interpreter):
    """Runs an fx.GraphModule node by node; a node's failure, whatever its type, becomes a
    FeatureshiftError naming the layer and the input's shape."""

    def run(self, x: torch.Tensor, **kwargs):
        self.input_shape = tuple(x.shape)
        return super().run(x, **kwargs)

    def run_node(self, n):
        try:
            return super().run_node(n)
        except FeatureshiftError:
            raise
        except Exception as e:  # any operator's own exception types
            raise FeatureshiftError(self._failure(n, e)) from e

    def _failure(self, node, error: Exception) -> str:
        where = "x".join(map(str, self.input_shape))
        if node.op == "call_module":
            kind = type(self.module.get_submodule(node.target)).__name__
            return (f"The converted network fails at layer '{node.target}' ({kind}) on a {where} input "
                    f"({error.__class__.__name__}: {first_line(error)}). The graph may fix sizes (a reshape to "
                    "constant sizes) that this input does not have; give the input size the network was made for.")
        return (f"The converted network fails at its operation '{node.name}' on a {where} input "
                f"({error.__class__.__name__}: {first_line(error)}).")
