"""The paper's questions, answered per layer from a run's measures and renders: how fast
each channel and the layer changed (speed of adaptation), what became of each channel's
feature (kept, repurposed, died) and whether its features got coarser or finer; and which
layers changed most (`rank_layers`). The report (commands/report) and compare-runs read
these same answers."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

from .adaptation import Reuse, Speed, channel_speeds, layer_fates, layer_speed, reuse
from .floors import NoiseFloor
from .spatial import coarsening, dominant_frequency, layer_coarsening


@dataclasses.dataclass
class ChannelFacts:
    speed: Speed
    fate: str | None  # kept, repurposed, died; None: no fate (see metrics.adaptation.channel_fate)
    dead: bool  # dead at the last snapshot
    dead_before: bool  # dead at the reference
    freq_before: float = math.nan  # dominant spatial frequency of the render, cycles per pixel
    freq_after: float = math.nan
    coarsening: float = math.nan  # freq_before / freq_after


@dataclasses.dataclass
class LayerFacts:
    layer: str
    speed: Speed
    channels: dict[int, ChannelFacts]
    reuse: Reuse
    coarsening: float  # geometric mean over the responsive channels rendered at both ends
    scale_pairs: int  # responsive channels (alive before and after) with renders at both ends
    floor: NoiseFloor | None = None  # the layer's render-noise floor; None: not measured (report --no-floor)
    drifted: int = 0  # channels with a fate whose renders drifted beyond the floor (0 without a floor)


def analyse_layer(metrics, layer: str, tiles: dict[tuple[str, int, int], Path]) -> LayerFacts:
    """Every answer for one layer with channel measures, from the RunMetrics and the renders."""
    ref, last = metrics.reference, metrics.epochs[-1]
    speeds = channel_speeds(metrics, layer)
    fates = layer_fates(metrics, layer) if last != ref else {}
    dead_last = {r["channel"]: bool(r.get("dead")) for r in metrics.channel_table(layer, last)}
    dead_ref = {r["channel"]: bool(r.get("dead")) for r in metrics.channel_table(layer, ref)}
    # The channels whose renders were compared (their drift was measured): the set a layer's fates
    # are of, so that the channels dead before training are counted among those, not the whole layer.
    compared = {r["channel"] for r in metrics.channel_table(layer, last)
                if r.get("drift") is not None and math.isfinite(float(r["drift"]))} if last != ref else set()
    facts: dict[int, ChannelFacts] = {}
    for c, speed in speeds.items():
        f = ChannelFacts(speed, fates.get(c), dead_last.get(c, False), dead_ref.get(c, False))
        a, b = tiles.get((layer, ref, c)), tiles.get((layer, last, c))
        if a is not None and b is not None and last != ref:
            f.freq_before, f.freq_after = dominant_frequency(a), dominant_frequency(b)
            f.coarsening = coarsening(f.freq_before, f.freq_after)
        facts[c] = f
    # A channel that responds to nothing renders as noise, whose frequency says nothing about its feature.
    ratios = [f.coarsening for f in facts.values() if math.isfinite(f.coarsening) and not (f.dead or f.dead_before)]
    shown = [c for c in sorted(compared) if c in facts]
    floor = metrics.floors.get(layer)
    drifts = {r["channel"]: r.get("drift") for r in metrics.channel_table(layer, last)}
    drifted = sum(1 for c in shown if facts[c].fate is not None and floor is not None and floor.drift_beyond(drifts[c]))
    return LayerFacts(layer, layer_speed(metrics, layer), facts,
                      reuse([facts[c].fate for c in shown], [facts[c].dead_before for c in shown]),
                      layer_coarsening(ratios), len(ratios), floor, drifted)


# ---------------------------------------------------------------- which layers changed most

@dataclasses.dataclass(frozen=True)
class LayerChange:
    layer: str
    value: float


@dataclasses.dataclass
class ChangeRanking:
    """The layers of a run by how much they changed at one epoch, and those that cannot be compared."""

    epoch: int
    column: str  # the measure ranked by (a layer_rows column)
    ranked: list[LayerChange]  # layers with trained weights of their own, most changed first
    head: list[LayerChange]  # the classifier head: it maps onto this run's classes, so it is reported apart
    frozen: list[str]  # layers whose own weights were all frozen in training
    weightless: list[str]  # layers without weights of their own (ReLU, pooling, dropout)


def rank_layers(metrics, epoch: int | None = None, column: str = "function_change",
                frozen: Sequence[str] = ()) -> ChangeRanking:
    """Rank the measured layers of a RunMetrics by COLUMN at EPOCH (default the last).

    Only layers with weights of their own take part: a ReLU or a pooling layer would repeat
    the number of the layer before it. The classifier head (`metrics.head`) and layers whose
    weights were all in FROZEN (module names, e.g. run.json's cutoff.frozen) are set apart;
    a container that holds exactly the weights of another ranked layer counts once, under
    the name of the module that holds them.
    """
    epoch = metrics.epochs[-1] if epoch is None else epoch
    values = {r["layer"]: r.get(column) for r in metrics.layer_rows if r["epoch"] == epoch}
    head, frozen = set(metrics.head), set(frozen)
    ranked, heads, frozen_layers, weightless = [], [], [], []
    seen: dict[frozenset, int] = {}
    for layer in metrics.layers:
        own = metrics.parameters.get(layer, [])
        v = values.get(layer)
        if not own:
            weightless.append(layer)
            continue
        if v is None or not math.isfinite(float(v)):
            continue
        item = LayerChange(layer, float(v))
        if all(_inside(m, head) for m in own):
            heads.append(item)
        elif all(_inside(m, frozen) for m in own):
            frozen_layers.append(layer)
        else:
            key = frozenset(own)
            if key in seen:
                if layer in own:  # the module that holds the weights names them better than its container
                    ranked[seen[key]] = item
                continue
            seen[key] = len(ranked)
            ranked.append(item)
    ranked.sort(key=lambda x: -x.value)
    return ChangeRanking(epoch, column, ranked, heads, frozen_layers, weightless)


def _inside(module: str, roots: set[str]) -> bool:
    """Whether MODULE is one of ROOTS or inside one of them."""
    return any(module == r or module.startswith(r + ".") for r in roots)
