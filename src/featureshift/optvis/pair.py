"""What a channel gained and what it lost between two networks: differential renders.

A picture of a channel shows what it responds to; two pictures, before and after
fine-tuning, show two things it responds to, and leave the reader to guess what changed.
A differential render asks the question directly: with the network A before and B after,

    gained   the image that maximizes act_B(x) - act_A(x): what the channel responds to now
             and did not (or less) before
    lost     the image that maximizes act_A(x) - act_B(x): what it responded to before and
             no longer (or less)

NetworkPair(before, after) is both networks as one module whose layers are "before.L" and
"after.L", one input for both: every step feeds the same transformed images to A and to B
(one forward of each, each only as deep as the layer needs), so a render of a pair is a
render like any other (same seeds, parameterization, transforms and settings) with the
objective objectives.gained() or lost(), named "gained" and "lost" in RenderSettings:

    render(NetworkPair(a, b), [("features.9", 3)], settings.replace(objective="gained"))

render_difference(a, b, targets, settings) renders both, plus how much each network responds
to each picture.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import FeatureshiftError
from ..models.info import attach_info
from ..models.layers import BRANCHES, arch_key, truncated
from .engine import RenderResult, render
from .objectives import AFTER, BEFORE, LOGITS
from .settings import RenderSettings

# The preprocessing both networks must share: the picture is one input for both.
SHARED_INFO = ("mean", "std", "in_chans", "img_size", "input_size")


class NetworkPair(nn.Module):
    """Two networks of one architecture and one preprocessing as one module: the layer L of the
    network before is "before.L", of the one after "after.L". Its output is {"before": A(x),
    "after": B(x)}. The same network may be given twice (a snapshot against itself): the second
    is then a copy, so that every layer of the pair is a module of its own."""

    def __init__(self, before: nn.Module, after: nn.Module):
        super().__init__()
        check_pair(before, after)
        if {id(m) for m in before.modules()} & {id(m) for m in after.modules()}:
            after = copy.deepcopy(after)
        self.before, self.after = before, after
        setattr(self, BRANCHES, (BEFORE, AFTER))
        info = getattr(after, "featureshift_info", None)
        if info is not None:
            attach_info(self, info)
        for name in ("featureshift_input_hw",):  # the size an ONNX graph was converted at
            if getattr(after, name, None) is not None:
                object.__setattr__(self, name, getattr(after, name))
        layouts = getattr(after, "featureshift_layouts", None)
        if layouts is not None:  # an ONNX network names its layers and their layouts
            object.__setattr__(self, "featureshift_layouts",
                               {f"{side}.{name}": v for side in (BEFORE, AFTER) for name, v in layouts.items()})

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {BEFORE: self.before(x), AFTER: self.after(x)}


def check_pair(before: nn.Module, after: nn.Module) -> None:
    """Raise a FeatureshiftError naming what differs, unless BEFORE and AFTER have one architecture
    (the same modules with the same settings and parameter shapes) and one preprocessing."""
    if arch_key(before) != arch_key(after):
        raise FeatureshiftError(f"The two networks differ in architecture: {architecture_difference(before, after)}. "
                                "A channel's gain and loss compare one unit in two versions of one network: give "
                                "two snapshots of one run, or a snapshot and the network it was fine-tuned from.")
    infos = [getattr(m, "featureshift_info", None) for m in (before, after)]
    if (infos[0] is None) != (infos[1] is None):
        which = "before" if infos[0] is None else "after"
        raise FeatureshiftError(f"Only one of the two networks carries its preprocessing: the one {which} has none. "
                                "Open both with featureshift (create_model, load_snapshot) or attach the same "
                                "ModelInfo to both with featureshift.attach_info.")
    if infos[0] is None:
        return
    differ = [f"{name} {getattr(infos[0], name)} before, {getattr(infos[1], name)} after" for name in SHARED_INFO
              if tuple(np.atleast_1d(getattr(infos[0], name))) != tuple(np.atleast_1d(getattr(infos[1], name)))]
    if differ:
        raise FeatureshiftError(f"The two networks take their input differently ({'; '.join(differ)}), so one "
                                "picture cannot be fed to both: render them with one preprocessing.")


def architecture_difference(before: nn.Module, after: nn.Module) -> str:
    """The first difference between two networks' modules, in words."""
    a, b = dict(before.named_modules()), dict(after.named_modules())
    if list(a) != list(b):
        only_a, only_b = [n for n in a if n not in b], [n for n in b if n not in a]
        if only_a or only_b:
            return (f"modules only before: {', '.join(only_a[:3]) or 'none'}; "
                    f"only after: {', '.join(only_b[:3]) or 'none'}")
        return "their modules are in another order"
    for name, m in a.items():
        n = b[name]
        label = f"'{name}'" if name else "the network itself"
        if type(m) is not type(n):
            return f"{label} is a {type(m).__name__} before, a {type(n).__name__} after"
        if m.extra_repr() != n.extra_repr():
            return f"{label} is {type(m).__name__}({m.extra_repr()}) before, ({n.extra_repr()}) after"
        shapes = [(k, tuple(t.shape)) for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None]
        other = [(k, tuple(t.shape)) for k, t in [*n._parameters.items(), *n._buffers.items()] if t is not None]
        if shapes != other:
            return f"the parameters of {label} are {shapes} before, {other} after"
    return "their input channels or build size differ"


@dataclasses.dataclass
class Responses:
    """A channel's activation (spatial mean) in each network on each picture, (N,) each."""
    before: np.ndarray
    after: np.ndarray


@dataclasses.dataclass
class DifferenceRenders:
    """What each channel gained and lost between two networks (see the module docstring).

    gained.images[i] maximizes act_after - act_before of targets[i]: the pattern the channel
    took up. lost.images[i] maximizes act_before - act_after: the pattern it gave up. Each
    result's scores are that difference on the final picture; a picture whose difference never
    had a gradient (result.no_response) is the starting noise: nothing gained (or lost) that the
    optimization could find, as for an unchanged channel, whose two networks cancel exactly.
    gained_responses and lost_responses say how strongly each network responds to each picture.
    """
    gained: RenderResult
    lost: RenderResult
    gained_responses: Responses
    lost_responses: Responses


def render_difference(before: nn.Module, after: nn.Module, targets: Sequence[tuple[str, int]],
                      settings: RenderSettings | None = None, **options: Any) -> DifferenceRenders:
    """The gained and lost pictures of each (layer, channel) target between the network BEFORE
    and the network AFTER (one architecture, one preprocessing), rendered with SETTINGS (its
    objective replaced by "gained" and "lost"; seeds, transforms and the rest as for any render).
    OPTIONS are render()'s: device, batch_size, quiet, mean, std, or a setting to change (steps=64).
    The target layer "logits" is refused: the pair's output holds both networks' logits."""
    s = settings or RenderSettings()
    check_difference_layers([layer for layer, _ in targets])
    pair = NetworkPair(before, after)
    gained = render(pair, targets, s.replace(objective="gained"), **options)
    lost = render(pair, targets, s.replace(objective="lost"), **options)
    return DifferenceRenders(gained, lost, responses(pair, gained, options), responses(pair, lost, options))


def check_difference_layers(layers: Sequence[str]) -> None:
    """Raise a FeatureshiftError unless every one of LAYERS can be rendered gained and lost: the
    network output is refused, as the pair's output holds both networks' logits."""
    if LOGITS in layers:
        raise FeatureshiftError(f"Gained and lost renders read inner layers; the network output '{LOGITS}' is not "
                                "one of them yet. Name a layer from `featureshift layers`.")


def responses(pair: NetworkPair, result: RenderResult, options: dict[str, Any]) -> Responses:
    """Each network's activation of each rendered target on its final picture (fp32, eval mode)."""
    info = getattr(pair, "featureshift_info", None)
    mean = options.get("mean") or (info.mean if info is not None else None)
    std = options.get("std") or (info.std if info is not None else None)
    if mean is None or std is None:
        raise FeatureshiftError("The networks carry no preprocessing: give mean= and std=.")
    param = next(pair.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.from_numpy(result.images).permute(0, 3, 1, 2).to(device)
    x = (x - torch.tensor(mean, device=device).view(1, -1, 1, 1)) / torch.tensor(std, device=device).view(1, -1, 1, 1)
    layers = sorted({f"{side}.{layer}" for layer, _ in result.targets for side in (BEFORE, AFTER)})
    was_training = pair.training
    try:
        with torch.no_grad(), truncated(pair.eval(), layers) as net:
            feats = net(x)
    finally:
        pair.train(was_training)
    values = {side: np.array([feats[f"{side}.{layer}"][i, c].float().mean().item()
                              for i, (layer, c) in enumerate(result.targets)], np.float32) for side in (BEFORE, AFTER)}
    return Responses(**values)
