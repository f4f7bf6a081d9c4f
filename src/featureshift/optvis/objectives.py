"""What a render maximizes: small objectives that add and scale, as in Lucid.

Every objective returns one value per image of the batch. Without arguments an
objective reads each image's own target, so one objective serves a whole batch
in which every image renders a different (layer, channel): the values are gathered
per layer with tensor indexing, not a Python loop over images.

    channel()                        spatial mean of the image's own channel (default)
    neuron()                         its center position
    -channel()                       negative: minimize it
    logit()                          the class logit (layer "logits", the network output)
    channel() - 100 * diversity()    several different images of one channel
    channel() + 0.5 * channel("inception4b", 7)   also excite a fixed second unit
    gained(), lost()                 a channel's change between two networks in one (optvis.pair):
                                     channel(network="after") - channel(network="before") and its negative
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..errors import FeatureshiftError, did_you_mean
from .settings import DIVERSITY_WEIGHT

LOGITS = "logits"  # the layer name meaning the network's output
# The two networks of a pair (optvis.pair.NetworkPair): their layers are "before.L" and "after.L".
BEFORE, AFTER = "before", "after"


@dataclasses.dataclass
class Batch:
    """What objectives see at one step."""
    # layer -> (B, C, H, W), or (B, classes) for "logits"; a token layer (vision transformer) comes
    # as (B, width, grid, grid) of its patch tokens, so "the spatial mean of a channel" is the mean
    # over patch tokens of one hidden unit (over every token, (B, width, tokens, 1), with include_cls)
    feats: dict[str, torch.Tensor]
    channels: torch.Tensor  # (B,) each image's own channel
    rows: dict[str, torch.Tensor]  # layer -> indices of the images whose own target is in that layer
    groups: torch.Tensor  # (B,) images with the same group id render the same target (diversity copies)

    @property
    def size(self) -> int:
        return self.channels.shape[0]


class Objective:
    """Maps a Batch to a (B,) tensor to maximize. Add, subtract, negate and scale them."""

    def __call__(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def layers(self, own: set[str]) -> set[str]:
        """The layers this objective reads, given the layers of the batch's own targets."""
        raise NotImplementedError

    def __add__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum([self, other])

    def __sub__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum([self, Scaled(other, -1.0)])

    def __mul__(self, k: float) -> "Objective":
        if not isinstance(k, (int, float)):
            return NotImplemented
        return Scaled(self, float(k))

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> "Objective":
        return self * (1.0 / k)

    def __neg__(self) -> "Objective":
        return Scaled(self, -1.0)


def fixed_units(objective: Objective) -> list[tuple[str, int]]:
    """The (layer, channel) units an objective reads for every image (given explicitly)."""
    if isinstance(objective, Sum):
        return [u for p in objective.parts for u in fixed_units(p)]
    if isinstance(objective, Scaled):
        return fixed_units(objective.inner)
    if isinstance(objective, _Unit) and objective.layer is not None:
        return [(objective.layer, objective.channel)]
    return []


class Sum(Objective):
    def __init__(self, parts: list[Objective]):
        self.parts = [q for p in parts for q in (p.parts if isinstance(p, Sum) else [p])]

    def __call__(self, batch):
        return sum(p(batch) for p in self.parts)

    def layers(self, own):
        return set().union(*(p.layers(own) for p in self.parts))

    def __repr__(self):
        return " + ".join(map(repr, self.parts)).replace("+ -", "- ")


class Scaled(Objective):
    def __init__(self, inner: Objective, k: float):
        if isinstance(inner, Scaled):
            inner, k = inner.inner, inner.k * k
        self.inner, self.k = inner, k

    def __call__(self, batch):
        return self.k * self.inner(batch)

    def layers(self, own):
        return self.inner.layers(own)

    def __repr__(self):
        return f"-{self.inner!r}" if self.k == -1 else f"{self.k:g}*{self.inner!r}"


def in_network(network: str | None, layer: str) -> str:
    """The name of LAYER in NETWORK of a pair ("after.features.9"); LAYER itself without a network."""
    return layer if network is None else f"{network}.{layer}"


def target_layers(objective: Objective, layer: str) -> list[str]:
    """The layers an image whose own target is in LAYER reads for that target: LAYER itself for
    the ordinary objectives and for those that read fixed units only, "after.L" and "before.L"
    for gained() and lost(). The engine sizes and checks a target by them."""
    # what a fixed unit reads is read for every image, whatever its target
    own = sorted(objective.layers({layer}) - objective.layers(set()))
    return own or [layer]


class _Unit(Objective):
    """Reads one unit per image: each image's own target, or a fixed (layer, channel) for all;
    with NETWORK, in that network of a pair (optvis.pair)."""
    name = "unit"

    def __init__(self, layer: str | None = None, channel: int | None = None, network: str | None = None):
        if (layer is None) != (channel is None):
            raise ValueError(f"{self.name}(): give both layer and channel, or neither (each image's own target)")
        self.network = network
        self.layer = None if layer is None else in_network(network, layer)
        self.channel = channel

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """(n, H, W) or (n,) values of the unit's channel -> (n,)."""
        raise NotImplementedError

    def layers(self, own):
        return {self.layer} if self.layer is not None else {in_network(self.network, layer) for layer in own}

    def __call__(self, batch):
        # fp32 before reducing: under autocast the features are bf16/fp16
        if self.layer is not None:
            return self.reduce(batch.feats[self.layer][:, self.channel].float())
        out = torch.zeros(batch.size, device=batch.channels.device)
        for layer, rows in batch.rows.items():
            feats = batch.feats[in_network(self.network, layer)]
            out = out.index_put((rows,), self.reduce(feats[rows, batch.channels[rows]].float()))
        return out

    def __repr__(self):
        args = "" if self.layer is None else f"{self.layer!r}, {self.channel}"
        if self.layer is None and self.network is not None:
            args = f"network={self.network!r}"
        return f"{self.name}({args})"


class Channel(_Unit):
    """Spatial mean of a channel (for "logits", the logit itself)."""
    name = "channel"

    def reduce(self, values):
        return values.flatten(1).mean(1) if values.dim() > 1 else values


class Neuron(_Unit):
    """One position of a channel: the center by default (for even sizes, the lower right of
    the central four, as Lucid)."""
    name = "neuron"

    def __init__(self, layer: str | None = None, channel: int | None = None, x: int | None = None,
                 y: int | None = None, network: str | None = None):
        super().__init__(layer, channel, network)
        self.x, self.y = x, y

    def reduce(self, values):
        if values.dim() == 1:
            return values
        h, w = values.shape[-2:]
        y = h // 2 if self.y is None else self.y
        x = w // 2 if self.x is None else self.x
        return values[:, y, x]


class Logit(Channel):
    """A class logit: the network's output, before any softmax."""
    name = "logit"

    def __init__(self, cls: int | None = None):
        super().__init__(None if cls is None else LOGITS, cls)

    def layers(self, own):
        if self.layer is None and own - {LOGITS}:
            raise FeatureshiftError(
                f"The logit objective reads the network output, but targets name the layer(s) "
                f"{', '.join(sorted(own - {LOGITS}))}. Use the layer name '{LOGITS}' with class indices as channels, "
                "or the channel objective for inner layers."
            )
        return {LOGITS}

    def __repr__(self):
        return f"logit({'' if self.channel is None else self.channel})"


class Diversity(Objective):
    """Cosine similarity of Gram matrices between the images of one group (Lucid's diversity).

    Subtract it (`channel() - 100 * diversity()`) to push several renders of one channel
    apart. Groups are copies of one target (render(..., diversity=N)); an image alone in its
    group scores 0. With NETWORK, the features of that network of a pair (optvis.pair).
    """

    def __init__(self, layer: str | None = None, network: str | None = None):
        self.network = network
        self.layer = None if layer is None else in_network(network, layer)

    def layers(self, own):
        return {self.layer} if self.layer is not None else {in_network(self.network, layer) for layer in own}

    def _similarity(self, f: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        # (n, C, HW); the logits (n, classes) have no positions: their Gram is the outer product
        f = f.float().flatten(2) if f.dim() > 2 else f.float()[:, :, None]
        grams = torch.nn.functional.normalize((f @ f.transpose(1, 2)).flatten(1), dim=1, eps=1e-10)
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(len(groups), dtype=torch.bool, device=f.device)
        group_size = (groups[:, None] == groups[None, :]).sum(1)
        return ((grams @ grams.T) * same).sum(1) / group_size

    def __call__(self, batch):
        if self.layer is not None:
            return self._similarity(batch.feats[self.layer], batch.groups)
        out = torch.zeros(batch.size, device=batch.channels.device)
        for layer, rows in batch.rows.items():
            feats = batch.feats[in_network(self.network, layer)]
            out = out.index_put((rows,), self._similarity(feats[rows], batch.groups[rows]))
        return out

    def __repr__(self):
        if self.layer is None and self.network is not None:
            return f"diversity(network={self.network!r})"
        return f"diversity({'' if self.layer is None else repr(self.layer)})"


def channel(layer: str | None = None, channel: int | None = None, network: str | None = None) -> Objective:
    return Channel(layer, channel, network)


def neuron(layer: str | None = None, channel: int | None = None, x: int | None = None,
           y: int | None = None, network: str | None = None) -> Objective:
    return Neuron(layer, channel, x, y, network)


def negative(layer: str | None = None, channel: int | None = None) -> Objective:
    return -Channel(layer, channel)


def logit(cls: int | None = None) -> Objective:
    return Logit(cls)


def diversity(layer: str | None = None, network: str | None = None) -> Objective:
    return Diversity(layer, network)


def gained(layer: str | None = None, channel: int | None = None) -> Objective:
    """What the channel responds to after and not before: act_after(x) - act_before(x), read in the
    two networks of a pair (optvis.pair.NetworkPair)."""
    return Channel(layer, channel, AFTER) - Channel(layer, channel, BEFORE)


def lost(layer: str | None = None, channel: int | None = None) -> Objective:
    """What the channel responded to before and no longer: act_before(x) - act_after(x)."""
    return Channel(layer, channel, BEFORE) - Channel(layer, channel, AFTER)


NAMED: dict[str, Callable[[float], Objective]] = {
    "channel": lambda w: channel(),
    "neuron": lambda w: neuron(),
    "negative": lambda w: negative(),
    "logit": lambda w: logit(),
    "diversity": lambda w: channel() - w * diversity(),
    "gained": lambda w: gained(),
    "lost": lambda w: lost(),
}
# Copies of a named objective's image (diversity > 1) are pushed apart in the features of the
# network the picture is about: what was gained is seen by the network after, what was lost by
# the one before.
DIVERSE: dict[str, Callable[[], Objective]] = {
    "gained": lambda: diversity(network=AFTER),
    "lost": lambda: diversity(network=BEFORE),
}


def as_objective(objective: str | Objective, diversity_weight: float = DIVERSITY_WEIGHT, copies: int = 1
                 ) -> Objective:
    """The Objective an objective setting names (an Objective is taken as it is); with COPIES > 1,
    a named objective other than "diversity" gets its diversity term as well."""
    if isinstance(objective, Objective):
        return objective
    if objective not in NAMED:
        raise FeatureshiftError(f"Unknown objective '{objective}'.{did_you_mean(objective, NAMED)} "
                                f"Choose one of {', '.join(NAMED)}.")
    obj = NAMED[objective](diversity_weight)
    if copies > 1 and objective != "diversity":
        obj = obj - diversity_weight * DIVERSE.get(objective, diversity)()
    return obj
