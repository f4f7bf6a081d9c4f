"""Which layers a network has (every module whose output is a 4-D feature map), and
running a network only as far as the layers you need.

Names are the model's own module paths (`inception4c.branch4.1`), so they are stable
across weights and snapshots and can be passed straight back to any command.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import FeatureshiftError, did_you_mean


@dataclasses.dataclass
class LayerInfo:
    name: str
    type: str
    channels: int
    height: int
    width: int
    calls: int = 1  # a module reused in one forward pass (resnet's relu) is called more than once
    first: int = 0  # index among all hook events: forward-execution order
    last: int = 0

    def row(self) -> str:
        return f"{self.name}\t{self.type}\t{self.channels}\t{self.height}x{self.width}"


def _input_size(model: nn.Module, size: int | None) -> int:
    if size:
        return size
    info = getattr(model, "featureshift_info", None)
    return info.input_size if info is not None else 224


def trace_layers(model: nn.Module, size: int | None = None) -> list[LayerInfo]:
    """Every module with a 4-D output, in forward-execution order, at a square input of `size`."""
    size = _input_size(model, size)
    found: dict[str, LayerInfo] = {}
    counter = [0]
    handles = []

    def hook(name):
        def fn(module, args, out):
            counter[0] += 1
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                if name in found:
                    found[name].calls += 1
                    found[name].last = counter[0]
                    found[name].channels, found[name].height, found[name].width = out.shape[1:]
                else:
                    found[name] = LayerInfo(name, type(module).__name__, *out.shape[1:], first=counter[0], last=counter[0])
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, 3, size, size, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            model(x)
    except RuntimeError as e:
        raise FeatureshiftError(
            f"The network could not run on a {size}x{size} image ({str(e).splitlines()[0]}). "
            "Try a larger --size."
        ) from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sorted(found.values(), key=lambda l: l.first)


def list_layers(model: nn.Module, size: int | None = None) -> list[LayerInfo]:
    """The visualizable layers of `model` (see trace_layers)."""
    return trace_layers(model, size)


def resolve_layers(model: nn.Module, names: Iterable[str], size: int | None = None) -> list[LayerInfo]:
    """LayerInfo for each requested name, or an error naming the closest real layers."""
    layers = {l.name: l for l in trace_layers(model, size)}
    out = []
    for name in names:
        if name not in layers:
            kind = "a layer with a 4-D output" if name in dict(model.named_modules()) else "a layer"
            raise FeatureshiftError(
                f"'{name}' is not {kind} of this network.{did_you_mean(name, layers)} "
                "`featureshift layers MODEL` lists every layer name."
            )
        out.append(layers[name])
    return out


class _Stop(Exception):
    pass


class Truncated:
    """Run a network only until every requested layer has produced its (last) output.

    Layers after the deepest target never run. Use as a context manager so the hooks
    are removed afterwards:

        with Truncated(model, ["inception4a", "conv2"]) as net:
            feats = net(x)   # {"inception4a": tensor, "conv2": tensor}
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], size: int | None = None,
                 layer_infos: Sequence[LayerInfo] | None = None):
        self.model = model
        infos = list(layer_infos) if layer_infos is not None else resolve_layers(model, layers, size)
        self.calls = {l.name: l.calls for l in infos}
        self.names = [l.name for l in infos]
        self._outputs: dict[str, torch.Tensor] = {}
        self._seen: dict[str, int] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in dict.fromkeys(self.names):
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def fn(module, args, out):
            self._seen[name] = self._seen.get(name, 0) + 1
            self._outputs[name] = out
            if all(self._seen.get(n, 0) >= c for n, c in self.calls.items()):
                raise _Stop
        return fn

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._outputs, self._seen = {}, {}
        try:
            self.model(x)
        except _Stop:
            pass
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise FeatureshiftError(f"Layer(s) {', '.join(missing)} produced no output for this input.")
        return {n: self._outputs[n] for n in self.names}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "Truncated":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
