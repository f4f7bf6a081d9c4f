"""Which layers a network has (every module whose output is a 4-D feature map, or the
(batch, tokens, width) output of a transformer's modules), and running a network only as
far as the layers you need.

Token layers (vision transformers) and channels-last feature maps (swin's (B, H, W, C))
are seen by every command as channel-first maps, (B, C, H, W): a token layer's patch tokens
on their grid, its prefix tokens (class token, registers) left out unless asked for. So a
channel objective on a token layer is the mean over patch tokens of one hidden unit, and
the metrics treat tokens like spatial positions.

Names are the model's own module paths (`inception4c.branch4.1`), so they are stable
across weights and snapshots and can be passed straight back to any command.

`Capture` is the one way featureshift looks inside a forward pass: the layer listing,
the renderer, the metrics and the channel-source tracing all hook modules through it.
"""
from __future__ import annotations

import hashlib

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import FeatureshiftError, did_you_mean
from .info import input_channels

# How a layer's output is laid out: a feature map (B, C, H, W), a channels-last one (B, H, W, C),
# or tokens (B, tokens, width).
LAYOUTS = ("NCHW", "NHWC", "tokens")
# A network made of branches (optvis.pair.NetworkPair) names them in this attribute: child modules
# that each take the network's input, run one after the other. Capture runs each only as far as
# its own layers need.
BRANCHES = "featureshift_branches"


@dataclasses.dataclass
class LayerInfo:
    name: str
    type: str
    channels: int  # for tokens: the width (hidden units per token)
    height: int  # for tokens: the patch grid (tokens - prefix, 1 when it is not square)
    width: int
    calls: int = 1  # a module reused in one forward pass (resnet's relu) is called more than once
    first: int = 0  # index among all hook events: forward-execution order
    last: int = 0
    layout: str = "NCHW"  # one of LAYOUTS
    tokens: int = 0  # for tokens: all of them, prefix tokens included
    prefix: int = 0  # for tokens: the class token and other prefix tokens at the start

    @property
    def shape(self) -> str:
        """The output's size for people: "28x28", or "65 tokens (1+8x8)" for a token layer."""
        if self.layout == "tokens":
            grid = f"{self.height}x{self.width}" if self.width > 1 else f"{self.height}"
            return f"{self.tokens} tokens ({self.prefix}+{grid})" if self.prefix else f"{self.tokens} tokens ({grid})"
        return f"{self.height}x{self.width}"

    def row(self) -> str:
        return f"{self.name}\t{self.type}\t{self.channels}\t{self.shape}"


def prefix_tokens(model: nn.Module) -> int:
    """How many tokens a vision transformer puts before its patch tokens (class token, registers):
    timm's num_prefix_tokens, torchvision's class token; 0 for other networks."""
    branches = getattr(model, BRANCHES, None)
    if branches:  # the branches of one network share its architecture (optvis.pair)
        return prefix_tokens(getattr(model, branches[0]))
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    return 1 if isinstance(getattr(model, "class_token", None), torch.Tensor) else 0


def _square(n: int) -> int:
    """The side of N when N is a square number, else 0."""
    side = math.isqrt(n) if n > 0 else 0
    return side if side * side == n else 0


def patch_start(tokens: int, prefix: int) -> int:
    """Where the patch tokens start in a sequence of TOKENS for a network with PREFIX prefix tokens:
    PREFIX when the rest form a square grid (square inputs), else 0 (a sequence of patches only,
    such as the patch embedding's output)."""
    return prefix if prefix and tokens > prefix and _square(tokens - prefix) else 0


def channels_first(out: torch.Tensor, layout: str, prefix: int = 0, include_prefix: bool = False) -> torch.Tensor:
    """A layer's output as a channel-first map (B, C, H, W).

    NHWC maps are permuted; tokens (B, T, D) become (B, D, g, g) over their patch tokens when those
    form a square grid g x g (else (B, D, T', 1)), the PREFIX tokens left out unless INCLUDE_PREFIX,
    in which case every token is a position, (B, D, T, 1)."""
    if layout == "NHWC" and out.dim() == 4:
        return out.permute(0, 3, 1, 2)
    if layout != "tokens" or out.dim() != 3:
        return out
    b, t, d = out.shape
    start = patch_start(t, prefix)
    if include_prefix and start:
        return out.transpose(1, 2).unsqueeze(-1)
    patches = out[:, start:]
    side = _square(t - start)
    if side:
        return patches.transpose(1, 2).reshape(b, d, side, side)
    return patches.transpose(1, 2).unsqueeze(-1)


def feature_views(model: nn.Module, infos: Iterable["LayerInfo"], include_prefix: bool = False
                  ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """For Capture(views=...): the conversion of each token or channels-last layer of INFOS to a
    channel-first map (see channels_first); feature maps need none."""
    prefix = prefix_tokens(model)
    return {i.name: functools.partial(channels_first, layout=i.layout, prefix=prefix, include_prefix=include_prefix)
            for i in infos if i.layout != "NCHW"}


def _channels_last_model(model: nn.Module) -> bool:
    """Networks whose feature maps are (B, H, W, C) between their convolutions (swin)."""
    branches = getattr(model, BRANCHES, None)
    if branches:
        return _channels_last_model(getattr(model, branches[0]))
    if getattr(model, "output_fmt", None) == "NHWC":
        return True
    return type(model).__name__ == "SwinTransformer"


_CHANNEL_FIRST_MODULES = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.MaxPool2d, nn.AvgPool2d,
                          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _layout(module: nn.Module, out: torch.Tensor, channels_last_model: bool) -> str:
    if out.dim() == 3:
        return "tokens"
    if str(getattr(module, "output_fmt", "")).upper().endswith("NHWC"):  # timm's PatchEmbed and others
        return "NHWC"
    if channels_last_model and not isinstance(module, _CHANNEL_FIRST_MODULES):
        return "NHWC"
    # Linear and LayerNorm act on the last dimension: on a 4-D input it holds the channels.
    if isinstance(module, nn.Linear) and out.shape[-1] == module.out_features:
        return "NHWC"
    if type(module) is nn.LayerNorm and tuple(out.shape[-1:]) == tuple(module.normalized_shape[-1:]):
        return "NHWC"
    return "NCHW"


def channel_axis(model: nn.Module, module: nn.Module, out: Any) -> int | None:
    """The axis of OUT (an output of MODULE inside MODEL) that holds its channels: 1 for a feature
    map, -1 for tokens and channels-last maps; None for an output that is neither."""
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() in (3, 4)):
        return None
    return 1 if _layout(module, out, _channels_last_model(model)) == "NCHW" else -1


def blank_input(model: nn.Module, size: int | tuple[int, int], device=None, dtype=None,
                batch: int = 1) -> torch.Tensor:
    """Zeros shaped like MODEL's input at SIZE px (or (height, width)): (batch, its input channels, H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.zeros(batch, input_channels(model), h, w, device=device, dtype=dtype)


def _input_size(model: nn.Module, size: int | tuple[int, int] | None) -> int | tuple[int, int]:
    if size:
        return size
    # a network converted from ONNX records the size its graph was converted at (maybe not square)
    hw = getattr(model, "featureshift_input_hw", None)
    if hw:
        return hw[0] if hw[0] == hw[1] else tuple(hw)
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
        module in it has been called that often, so the layers after the deepest never run. In a
        network of branches (BRANCHES) each branch ends so on its own modules, and a branch
        without any is not run; its output is then None.
    on_output(name, module, output): called at every output of a hooked module, in execution
        order, after the output is kept and not where the forward stops. A value it returns
        replaces the output for the rest of the network, not the kept one.
    on_input(name, module): called whenever a hooked module is entered, before it runs.
    keep: keep the outputs (False when the callbacks do all the work).
    model_output: also return the model's own output under this key (for a forward pass that
        runs to the end).
    views: name -> function applied to that module's kept output when it is returned (token and
        channels-last layers as channel-first maps: `feature_views`); the network sees the original.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, stop_after: Mapping[str, int] | None = None,
                 on_output: Callable[[str, nn.Module, Any], Any] | None = None,
                 on_input: Callable[[str, nn.Module], None] | None = None, keep: bool = True,
                 model_output: str | None = None,
                 views: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None):
        self.model = model
        self.views = dict(views or {})
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
        branches = getattr(self.model, BRANCHES, None)
        if branches:
            result = {b: self._run(getattr(self.model, b), x, b) for b in branches}
        else:
            result = self._run(self.model, x, None)
        if not self._keep:
            return {}
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise FeatureshiftError(f"Layer(s) {', '.join(missing)} produced no output for this input.")
        views = self.views
        feats = {n: views[n](self.outputs[n]) if n in views else self.outputs[n] for n in self.names}
        if self.model_output is not None:
            feats[self.model_output] = result
        return feats

    def _run(self, module: nn.Module, x: torch.Tensor, branch: str | None) -> Any:
        """MODULE's output on X, or None where it stopped early (or, a BRANCH without stops, never ran)."""
        stops = [n for n in self.stop_after if branch is None or n == branch or n.startswith(branch + ".")]
        if branch is not None and self.stop_after and not stops:
            return None
        self._pending = len(stops)
        try:
            return module(x)
        except _Stop:
            return None

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


def trace_layers(model: nn.Module, size: int | tuple[int, int] | None = None) -> list[LayerInfo]:
    """Every module with a 4-D output, or a (1, tokens, width) output of a transformer, in
    forward-execution order, at an input of `size` (pixels, or (height, width)). Shapes are
    channel-first (see channels_first): channels, then the map's (or the patch grid's) height
    and width. A network that names its layers and their layouts (`featureshift_layouts`: an
    ONNX graph's, whose modules are operators) lists only those."""
    size = _input_size(model, size)
    found: dict[str, LayerInfo] = {}
    events = [0]
    channels_last_model = _channels_last_model(model)
    prefix = prefix_tokens(model)
    declared = getattr(model, "featureshift_layouts", None)

    shapes: dict[str, torch.Size] = {}

    def record(name, module, out):
        events[0] += 1
        # batch 1: an output whose first dimension is not the batch (swin's attention windows) is no layer
        if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() in (3, 4)
                and out.shape[0] == 1):
            return
        layout = declared.get(name) if declared is not None else _layout(module, out, channels_last_model)
        if layout is None or out.dim() != (3 if layout == "tokens" else 4):
            return
        shapes[name] = out.shape
        if name in found:
            found[name].calls += 1
            found[name].last = events[0]
            found[name].layout = layout
        else:
            found[name] = LayerInfo(name, type(module).__name__, 0, 0, 0, first=events[0], last=events[0],
                                    layout=layout)

    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = blank_input(model, size, device=p.device if p is not None else "cpu")
        with torch.no_grad(), Capture(model, [n for n, _ in model.named_modules() if n], on_output=record,
                                      keep=False) as net:
            net(x)
    except (RuntimeError, AssertionError) as e:  # timm and torchvision check input sizes with assert
        raise FeatureshiftError(
            f"The network could not run on a {_size_text(size)} image ({str(e).splitlines()[0]}). "
            "Try a larger --size."
        ) from e
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    for name, layer in found.items():
        # A pass-through inside a channels-last module (the Identity norm of timm's PatchEmbed) is channels-last.
        parent = name.rpartition(".")[0]
        if (layer.layout == "NCHW" and parent in found and found[parent].layout == "NHWC"
                and shapes[parent] == shapes[name] and not isinstance(modules[name], _CHANNEL_FIRST_MODULES)):
            layer.layout = "NHWC"
        c, h, w = channels_first(torch.empty(shapes[name], device="meta"), layer.layout, prefix).shape[1:]
        layer.channels, layer.height, layer.width = int(c), int(h), int(w)
        if layer.layout == "tokens":
            layer.tokens = int(shapes[name][1])
            layer.prefix = patch_start(layer.tokens, prefix)
    return sorted(found.values(), key=lambda l: l.first)


def _size_text(size: int | tuple[int, int]) -> str:
    h, w = (size, size) if isinstance(size, int) else size
    return f"{h}x{w}"


def list_layers(model: nn.Module, size: int | tuple[int, int] | None = None) -> list[LayerInfo]:
    """The visualizable layers of `model` (see trace_layers)."""
    return trace_layers(model, size)


def resolve_layers(model: nn.Module, names: Iterable[str], size: int | None = None) -> list[LayerInfo]:
    """LayerInfo for each requested name, or an error naming the closest real layers."""
    layers = {l.name: l for l in trace_layers(model, size)}
    out = []
    for name in names:
        if name not in layers:
            raise not_a_layer(model, name, layers)
        out.append(layers[name])
    return out


def not_a_layer(model: nn.Module, name: str, layers: Iterable[str]) -> FeatureshiftError:
    """The error for a NAME that is not among LAYERS (the traced layer names), naming the closest."""
    kind = "a layer with a 4-D or token output" if name in dict(model.named_modules()) else "a layer"
    return FeatureshiftError(f"'{name}' is not {kind} of this network.{did_you_mean(name, layers)} "
                             "`featureshift layers MODEL` lists every layer name.")


# Tracing is only about structure, so it is done once per architecture (and class count) at
# the smallest input the network accepts, and shared by every snapshot of that network.

@dataclasses.dataclass(frozen=True)
class LayerStructure:
    """The layers of an architecture, traced once at a small input."""
    size: int | tuple[int, int]  # the input traced at: the smallest of 32, 80 and the model's own that works
    layers: dict[str, LayerInfo]


_STRUCTURES: dict[tuple, LayerStructure] = {}


def arch_key(model: nn.Module) -> tuple:
    """What identifies a network's structure: every module's name, class and settings (its
    extra_repr: strides, kernel sizes, ...) and the shapes of its own parameters and buffers,
    plus the input channels and build size featureshift recorded. Two networks with one key
    have the same layers with the same shapes, whatever they are called: an architecture name
    would not do (two hand-made networks may share one), nor id() (reused once one is freed).
    Snapshots of one run share a key, so what is cached per key is computed once per run."""
    info = getattr(model, "featureshift_info", None)
    h = hashlib.blake2b(digest_size=16)
    for name, m in model.named_modules():
        own = [(n, tuple(t.shape)) for n, t in [*m._parameters.items(), *m._buffers.items()] if t is not None]
        h.update(f"{name}\0{type(m).__module__}.{type(m).__qualname__}\0{m.extra_repr()}\0{own}\n".encode())
    return (h.hexdigest(), getattr(info, "in_chans", 3), getattr(info, "img_size", None))


def layer_structure(model: nn.Module) -> LayerStructure:
    """The network's layers, traced on the first call for its architecture and remembered."""
    key = arch_key(model)
    if key not in _STRUCTURES:
        full = _input_size(model, None)
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
    if layer not in structure.layers:
        raise not_a_layer(model, layer, structure.layers)
    return structure.layers[layer]


def truncated(model: nn.Module, layers: Sequence[str], include_prefix: bool = False) -> Capture:
    """A Capture of `layers` whose forward pass stops once all of them have produced their last output:

        with truncated(model, ["inception4a", "conv2"]) as net:
            feats = net(x)   # {"inception4a": tensor, "conv2": tensor}

    Every output is a channel-first map (B, C, H, W): token layers give their patch tokens on
    their grid (every token, as (B, C, T, 1), with include_prefix), channels-last maps are permuted.
    """
    infos = [layer_info(model, l) for l in layers]
    return Capture(model, [i.name for i in infos], stop_after={i.name: i.calls for i in infos},
                   views=feature_views(model, infos, include_prefix))
