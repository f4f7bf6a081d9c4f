"""Which layers a network has (every module whose output is a 4-D feature map), and
running a network only as far as the layers you need.

Names are the model's own module paths (`inception4c.branch4.1`), so they are stable
across weights and snapshots and can be passed straight back to any command.

`Capture` is the one way featureshift looks inside a forward pass: the layer listing,
the renderer, the metrics and the channel-source tracing all hook modules through it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

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


class _Stop(Exception):
    """Ends a forward pass early; raised by a hook, caught by the Capture that owns the hook."""


class Capture:
    """Forward hooks on named modules of a network: what they output, and where to stop.

    Use it as a context manager, so the hooks are removed afterwards:

        with Capture(model, ["features.3", "features.6"], stop_after={"features.6": 1}) as net:
            feats = net(x)   # {"features.3": tensor, "features.6": tensor}; nothing deeper ran

    names: the modules to hook, by their path in the model ("" is the model itself); a module
        called more than once in a forward pass keeps its last output.
    stop_after: module -> number of calls. The forward pass run by `net(x)` ends as soon as every
        module in it has been called that often, so the layers after the deepest never run.
    on_output(name, module, output): called at every output of a hooked module, in execution
        order, after the output is kept and not where the forward stops. A value it returns
        replaces the output for the rest of the network, not the kept one.
    on_input(name, module): called whenever a hooked module is entered, before it runs.
    keep: keep the outputs (False when the callbacks do all the work).
    model_output: also return the model's own output under this key (for a forward pass that
        runs to the end).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, stop_after: Mapping[str, int] | None = None,
                 on_output: Callable[[str, nn.Module, Any], Any] | None = None,
                 on_input: Callable[[str, nn.Module], None] | None = None, keep: bool = True,
                 model_output: str | None = None):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.stop_after = dict(stop_after or {})
        self.model_output = model_output
        self.outputs: dict[str, Any] = {}
        self._on_output, self._keep = on_output, keep
        self._calls: dict[str, int] = {}
        self._pending = 0
        modules = dict(model.named_modules())
        hooked = list(dict.fromkeys([*self.names, *self.stop_after]))
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in hooked]
        if on_input is not None:
            self._handles += [modules[name].register_forward_pre_hook(_entered(name, on_input)) for name in hooked]

    def _hook(self, name: str):
        limit = self.stop_after.get(name)
        keep, on_output, outputs = self._keep, self._on_output, self.outputs

        def fn(module, args, out):
            if keep:
                outputs[name] = out
            if limit is not None:
                calls = self._calls[name] = self._calls.get(name, 0) + 1
                if calls == limit:
                    self._pending -= 1
                    if self._pending == 0:
                        raise _Stop
            if on_output is not None:
                return on_output(name, module, out)
            return None
        return fn

    def __call__(self, x: torch.Tensor) -> dict[str, Any]:
        """Run the model on `x` (as far as needed) and return the kept outputs by module name."""
        self.outputs.clear()
        self._calls.clear()
        self._pending = len(self.stop_after)
        result = None
        try:
            result = self.model(x)
        except _Stop:
            pass
        if not self._keep:
            return {}
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise FeatureshiftError(f"Layer(s) {', '.join(missing)} produced no output for this input.")
        feats = {n: self.outputs[n] for n in self.names}
        if self.model_output is not None:
            feats[self.model_output] = result
        return feats

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _entered(name: str, on_input: Callable[[str, nn.Module], None]):
    def fn(module, args):
        on_input(name, module)
    return fn


def trace_layers(model: nn.Module, size: int | None = None) -> list[LayerInfo]:
    """Every module with a 4-D output, in forward-execution order, at a square input of `size`."""
    size = _input_size(model, size)
    found: dict[str, LayerInfo] = {}
    events = [0]

    def record(name, module, out):
        events[0] += 1
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            if name in found:
                found[name].calls += 1
                found[name].last = events[0]
                found[name].channels, found[name].height, found[name].width = out.shape[1:]
            else:
                found[name] = LayerInfo(name, type(module).__name__, *out.shape[1:], first=events[0], last=events[0])

    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, 3, size, size, device=p.device if p is not None else "cpu")
        with torch.no_grad(), Capture(model, [n for n, _ in model.named_modules() if n], on_output=record,
                                      keep=False) as net:
            net(x)
    except RuntimeError as e:
        raise FeatureshiftError(
            f"The network could not run on a {size}x{size} image ({str(e).splitlines()[0]}). "
            "Try a larger --size."
        ) from e
    finally:
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


# Tracing is only about structure, so it is done once per architecture (and class count) at
# the smallest input the network accepts, and shared by every snapshot of that network.

@dataclasses.dataclass(frozen=True)
class LayerStructure:
    """The layers of an architecture, traced once at a small input."""
    size: int  # the input size they were traced at: the smallest of 32, 80 and the model's own that works
    layers: dict[str, LayerInfo]


_STRUCTURES: dict[tuple, LayerStructure] = {}


def arch_key(model: nn.Module) -> tuple:
    """What identifies a network's structure: its architecture and class count (the object itself
    for a network featureshift did not make)."""
    info = getattr(model, "featureshift_info", None)
    return (info.arch, info.num_classes) if info is not None else (id(model),)


def layer_structure(model: nn.Module) -> LayerStructure:
    """The network's layers, traced on the first call for its architecture and remembered."""
    key = arch_key(model)
    if key not in _STRUCTURES:
        info = getattr(model, "featureshift_info", None)
        full = info.input_size if info is not None else 224
        for size in (32, 80, full):
            try:
                _STRUCTURES[key] = LayerStructure(size, {l.name: l for l in trace_layers(model, size)})
                break
            except FeatureshiftError:
                if size == full:
                    raise
    return _STRUCTURES[key]


def layer_info(model: nn.Module, layer: str) -> LayerInfo:
    """LayerInfo of one layer (shapes at the traced size), or an error naming the closest layers."""
    structure = layer_structure(model)
    if layer in structure.layers:
        return structure.layers[layer]
    return resolve_layers(model, [layer], structure.size)[0]


def truncated(model: nn.Module, layers: Sequence[str]) -> Capture:
    """A Capture of `layers` whose forward pass stops once all of them have produced their last output:

        with truncated(model, ["inception4a", "conv2"]) as net:
            feats = net(x)   # {"inception4a": tensor, "conv2": tensor}
    """
    infos = [layer_info(model, l) for l in layers]
    return Capture(model, [i.name for i in infos], stop_after={i.name: i.calls for i in infos})
