"""Render-noise floors: how much a channel's measures move when nothing changed but the seed.

A render is one draw of a random optimization: the same channel of the same network,
rendered from another seed, gives another picture, and the visual drift and the kept score
(cross-activation B on A) between the two are what an unchanged neuron gets. A layer's floor
is read off those seed-to-seed values over a sample of its rendered channels; a channel is
called changed only beyond it (docs/metrics.md, "Noise floors").
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np
from torch import nn

from .adaptation import KEPT_THRESHOLD, both_measured, called_repurposed
from .drift import cross_activation, visual_drift

# Channels per layer rendered a second time: enough for a 95th percentile, a sixth of a 192-channel atlas.
FLOOR_CHANNELS = 32
FLOOR_PERCENTILE = 95.0  # a measure is beyond noise past this share of the layer's seed-to-seed values
SEED_OFFSET = 1  # the second render's seed is the first's plus this


def floor_seed(seed: int) -> int:
    """The seed of the second render of a tile rendered with SEED."""
    return int(seed) + SEED_OFFSET


def floor_channels(shown: Sequence[int], others: Sequence[int] = (), limit: int = FLOOR_CHANNELS) -> list[int]:
    """The channels of a layer that get a second render: the SHOWN ones (a timeline's, whose pages
    give their own seed-to-seed values), then OTHERS evenly spread (an atlas), LIMIT in all."""
    chosen = list(dict.fromkeys(int(c) for c in shown))[:limit]
    taken = set(chosen)
    rest = [int(c) for c in dict.fromkeys(others) if int(c) not in taken]
    room = limit - len(chosen)
    if room > 0 and rest:
        step = max(1.0, len(rest) / room)
        chosen += [rest[int(i * step)] for i in range(min(room, len(rest)))]
    return sorted(chosen)


@dataclasses.dataclass
class NoiseFloor:
    """What render noise alone does to one layer's channel measures."""

    layer: str
    drift: float  # visual drift beyond this is beyond noise: the FLOOR_PERCENTILE of the seed-to-seed drifts
    kept: float  # a kept score (B on A) below this is beyond noise: the low percentile of the seed-to-seed scores
    repurposed_share: float  # share of the seed-to-seed pairs the fate rule calls repurposed: the share's floor
    null_drift: dict[int, float]  # channel -> drift between its two renders of the same snapshot
    null_kept: dict[int, tuple[float, float]]  # channel -> kept score each way (first on second, second on first)
    seconds: float = 0.0  # what measuring the floor cost (the second renders not included)

    @property
    def channels(self) -> list[int]:
        return sorted(self.null_drift)

    def drift_beyond(self, drift: float | None) -> bool:
        return drift is not None and math.isfinite(float(drift)) and float(drift) > self.drift

    def to_record(self) -> dict:
        return {"drift": _finite(self.drift), "kept": _finite(self.kept),
                "repurposed_share": _finite(self.repurposed_share), "channels": self.channels,
                "null": {str(c): [_finite(self.null_drift[c]), *(_finite(k) for k in self.null_kept.get(c, ()))]
                         for c in self.channels}}


def count_beyond_noise(count: int, total: int, null_share: float, level: float = 0.95) -> bool:
    """Whether COUNT of TOTAL channels called changed is more than render noise alone explains:
    under noise each channel is called with probability NULL_SHARE, so the count is binomial,
    and COUNT is beyond noise where a count this large has less than 1 - LEVEL chance."""
    if count <= 0 or total <= 0 or not math.isfinite(null_share):
        return False
    p = min(max(float(null_share), 0.0), 1.0)
    tail = sum(math.comb(total, k) * p ** k * (1 - p) ** (total - k) for k in range(count, total + 1))
    return tail < 1.0 - level


def floor_from_record(layer: str, record: dict) -> NoiseFloor:
    """A NoiseFloor as `NoiseFloor.to_record` wrote it (summary.json)."""
    def number(v) -> float:
        return math.nan if v is None else float(v)

    null = record.get("null") or {}
    return NoiseFloor(layer, number(record.get("drift")), number(record.get("kept")),
                      number(record.get("repurposed_share")),
                      {int(c): number(v[0]) for c, v in null.items() if v},
                      {int(c): (number(v[1]), number(v[2])) for c, v in null.items() if len(v) == 3})


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def floors_from(layer: str, null_drift: dict[int, float], null_kept: dict[int, tuple[float, float]],
                percentile: float = FLOOR_PERCENTILE, threshold: float = KEPT_THRESHOLD) -> NoiseFloor:
    """The floor of LAYER from its channels' seed-to-seed values.

    Both directions of each kept score are draws of the same null (which seed plays the
    network's own render is arbitrary), so both count; drift is symmetric already. NaN floors
    where no channel has a value (every render failed)."""
    drifts = [v for v in null_drift.values() if math.isfinite(v)]
    kept = [k for pair in null_kept.values() for k in pair if math.isfinite(k)]
    drift_floor = float(np.percentile(drifts, percentile)) if drifts else math.nan
    kept_floor = float(np.percentile(kept, 100.0 - percentile)) if kept else math.nan
    share = float(np.mean([called_repurposed(k, kept_floor, threshold) for k in kept])) if kept else math.nan
    return NoiseFloor(layer, drift_floor, kept_floor, share, dict(null_drift), dict(null_kept))


def noise_floor(model: nn.Module, layer: str, first: dict[int, np.ndarray], second: dict[int, np.ndarray],
                percentile: float = FLOOR_PERCENTILE) -> NoiseFloor:
    """The noise floor of LAYER of MODEL from two renders of each channel: FIRST and SECOND map
    channel -> image ((H, W, 3) float in [0, 1], `drift.read_image`), rendered with the same
    settings but seeds apart. Only channels with both renders take part."""
    start = time.perf_counter()
    channels = sorted(c for c in first if c in second)
    if not channels:
        return NoiseFloor(layer, math.nan, math.nan, math.nan, {}, {})
    a, b = [first[c] for c in channels], [second[c] for c in channels]
    drift = visual_drift(a, b)
    # The same network on both sides: "B on A" is act(first) / act(second), "A on B" the reverse.
    one_way, other_way = cross_activation(model, model, [(layer, c) for c in channels], a, b)
    # A render that does not excite its own channel (NaN one way, 0 the other) is a failed render,
    # not render noise of a working one: that channel stays out of both floors.
    good = [i for i in range(len(channels)) if both_measured(one_way[i], other_way[i])]
    floor = floors_from(layer, {channels[i]: float(drift[i]) for i in good},
                        {channels[i]: (float(one_way[i]), float(other_way[i])) for i in good}, percentile)
    floor.seconds = time.perf_counter() - start
    return floor
