"""The paper's questions answered for the report, in words: the findings as sentences with
their evidence (from metrics.answers: speed of adaptation, fates, spatial scale) and the
most changed neurons of the network."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ...metrics.answers import LayerFacts

# The measures "most changed" can rank by: name -> (row column, larger means more changed).
RANKINGS = {"weight change": ("weight_change", True), "visual drift": ("drift", True),
            "cross-activation (B on A)": ("cross_b_on_a", False), "correlation": ("correlation", False)}


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def scale_phrase(ratio: float) -> str:
    """'got 1.3x coarser', 'got 1.2x finer' or 'kept their scale'."""
    if not math.isfinite(ratio):
        return "–"
    if abs(math.log(ratio)) < math.log(1.05):
        return f"kept their scale ({ratio:.2f}x)"
    return f"got {ratio:.1f}x coarser" if ratio > 1 else f"got {1 / ratio:.1f}x finer"


def layer_findings(f: LayerFacts, page: str, epochs: list[int]) -> list[dict[str, str]]:
    """The sentences about one layer, each with the link to its evidence."""
    out = []
    s = f.speed
    if s.half_epoch is not None and s.first_share is not None:
        first = "epoch 1" if s.first_epoch == 1 else f"the first {s.first_epoch} epochs"
        out.append({"text": f"{f.layer}: {_pct(s.first_share)} of its weight change happened in {first}; half of it "
                            f"by epoch {s.half_epoch} (of {epochs[-1]}).", "href": f"{page}#speed"})
    elif len(epochs) > 1:
        out.append({"text": f"{f.layer}: its weights did not change.", "href": f"{page}#speed"})
    r = f.reuse
    if r.measured:
        text = (f"{f.layer}: of {r.measured} rendered channel{'s' * (r.measured != 1)}, {_pct(r.share('kept'))} "
                f"kept their feature, {_pct(r.share('repurposed'))} were repurposed, {_pct(r.share('died'))} died")
        if r.dead_before:
            text += f" ({r.dead_before} responded to nothing already before training)"
        out.append({"text": text + ".", "href": f"{page}#sort=cross_b_on_a"})
    if f.scale_pairs:
        out.append({"text": f"{f.layer}: its features {scale_phrase(f.coarsening)}, by the dominant spatial "
                            f"frequency of {f.scale_pairs} channel{'s' * (f.scale_pairs != 1)}' renders before and "
                            "after.",
                    "href": f"{page}#sort=coarsening"})
    return out


def most_changed(metrics, layers: list[str], tiles: dict[tuple[str, int, int], Path], facts: dict[str, LayerFacts],
                 count: int = 12) -> dict[str, list[dict[str, Any]]]:
    """Per ranking measure: the `count` most changed channels over `layers` that have renders
    at the reference and the last snapshot; dead channels never count."""
    ref, last = metrics.reference, metrics.epochs[-1]
    out: dict[str, list[dict[str, Any]]] = {}
    for name, (column, larger) in RANKINGS.items():
        cands = []
        for layer in layers:
            for r in metrics.channel_table(layer, last):
                c = r["channel"]
                v = r.get(column)
                if (layer, ref, c) not in tiles or (layer, last, c) not in tiles:
                    continue
                if v is None or not math.isfinite(float(v)):
                    continue
                fc = facts.get(layer).channels.get(c) if layer in facts else None
                if fc is not None and (fc.dead or fc.dead_before):
                    continue
                cands.append((float(v) if larger else -float(v), layer, c, float(v)))
        cands.sort(key=lambda t: -t[0])
        out[name] = [{"layer": l, "channel": c, "value": v} for _, l, c, v in cands[:count]]
    return out
