"""The paper's questions, answered per layer from a run's measures and renders: how fast
each channel and the layer changed (speed of adaptation), what became of each channel's
feature (kept, repurposed, died) and whether its features got coarser or finer. The
report (commands/report) and compare-runs read these same answers."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .adaptation import Reuse, Speed, channel_speeds, layer_fates, layer_speed, reuse
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
    coarsening: float  # geometric mean over the channels rendered at both ends
    scale_pairs: int  # channels with renders at both ends


def analyse_layer(metrics, layer: str, tiles: dict[tuple[str, int, int], Path]) -> LayerFacts:
    """Every answer for one layer with channel measures, from the RunMetrics and the renders."""
    ref, last = metrics.reference, metrics.epochs[-1]
    speeds = channel_speeds(metrics, layer)
    fates = layer_fates(metrics, layer) if last != ref else {}
    dead_last = {r["channel"]: bool(r.get("dead")) for r in metrics.channel_table(layer, last)}
    dead_ref = {r["channel"]: bool(r.get("dead")) for r in metrics.channel_table(layer, ref)}
    facts: dict[int, ChannelFacts] = {}
    for c, speed in speeds.items():
        f = ChannelFacts(speed, fates.get(c), dead_last.get(c, False), dead_ref.get(c, False))
        a, b = tiles.get((layer, ref, c)), tiles.get((layer, last, c))
        if a is not None and b is not None and last != ref:
            f.freq_before, f.freq_after = dominant_frequency(a), dominant_frequency(b)
            f.coarsening = coarsening(f.freq_before, f.freq_after)
        facts[c] = f
    ratios = [f.coarsening for f in facts.values() if math.isfinite(f.coarsening)]
    return LayerFacts(layer, layer_speed(metrics, layer), facts,
                      reuse([f.fate for f in facts.values()], [f.dead_before for f in facts.values()]),
                      layer_coarsening(ratios), len(ratios))
