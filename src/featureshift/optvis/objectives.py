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
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..errors import FeatureshiftError, did_you_mean
from .settings import DIVERSITY_WEIGHT

LOGITS = "logits"  # the layer name meaning the network's output


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


class _Unit(Objective):
    """Reads one unit per image: each image's own target, or a fixed (layer, channel) for all."""
    name = "unit"

    def __init__(self, layer: str | None = None, channel: int | None = None):
        if (layer is None) != (channel is None):
            raise ValueError(f"{self.name}(): give both layer and channel, or neither (each image's own target)")
        self.layer, self.channel = layer, channel

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """(n, H, W) or (n,) values of the unit's channel -> (n,)."""
        raise NotImplementedError

    def layers(self, own):
        return {self.layer} if self.layer is not None else set(own)

    def __call__(self, batch):
        # fp32 before reducing: under autocast the features are bf16/fp16
        if self.layer is not None:
            return self.reduce(batch.feats[self.layer][:, self.channel].float())
        out = torch.zeros(batch.size, device=batch.channels.device)
        for layer, rows in batch.rows.items():
            out = out.index_put((rows,), self.reduce(batch.feats[layer][rows, batch.channels[rows]].float()))
        return out

    def __repr__(self):
        args = "" if self.layer is None else f"{self.layer!r}, {self.channel}"
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
                 y: int | None = None):
        super().__init__(layer, channel)
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
    group scores 0.
    """

    def __init__(self, layer: str | None = None):
        self.layer = layer

    def layers(self, own):
        return {self.layer} if self.layer is not None else set(own)

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
            out = out.index_put((rows,), self._similarity(batch.feats[layer][rows], batch.groups[rows]))
        return out

    def __repr__(self):
        return f"diversity({'' if self.layer is None else repr(self.layer)})"


def channel(layer: str | None = None, channel: int | None = None) -> Objective:
    return Channel(layer, channel)


def neuron(layer: str | None = None, channel: int | None = None, x: int | None = None,
           y: int | None = None) -> Objective:
    return Neuron(layer, channel, x, y)


def negative(layer: str | None = None, channel: int | None = None) -> Objective:
    return -Channel(layer, channel)


def logit(cls: int | None = None) -> Objective:
    return Logit(cls)


def diversity(layer: str | None = None) -> Objective:
    return Diversity(layer)


NAMED: dict[str, Callable[[float], Objective]] = {
    "channel": lambda w: channel(),
    "neuron": lambda w: neuron(),
    "negative": lambda w: negative(),
    "logit": lambda w: logit(),
    "diversity": lambda w: channel() - w * diversity(),
}


def as_objective(objective: str | Objective, diversity_weight: float = DIVERSITY_WEIGHT) -> Objective:
    if isinstance(objective, Objective):
        return objective
    if objective not in NAMED:
        raise FeatureshiftError(f"Unknown objective '{objective}'.{did_you_mean(objective, NAMED)} "
                                f"Choose one of {', '.join(NAMED)}.")
    return NAMED[objective](diversity_weight)
