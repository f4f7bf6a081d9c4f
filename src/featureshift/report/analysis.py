"""The paper's questions answered for the report, in words: the findings as sentences with
their evidence (from metrics.answers: which layers changed most, speed of adaptation, fates,
spatial scale) and the most changed neurons of the network."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..metrics.answers import ChangeRanking, LayerFacts
from ..metrics.floors import FLOOR_PERCENTILE, count_beyond_noise

FLOOR_WORDS = f"{FLOOR_PERCENTILE:g}th percentile of the drifts"

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


def layer_findings(f: LayerFacts, page: str, epochs: list[int], made_by: Sequence[str] = ()) -> list[dict[str, str]]:
    """The sentences about one layer, each with the link to its evidence.

    made_by: for a layer without weights of its own (a ReLU, a pooling layer), the modules
    whose weights make it, so that "its weights" are not read as the layer's."""
    out = []
    s = f.speed
    weights = f"the weights that make it ({_names(made_by)})" if made_by else "its weights"
    # With one snapshot after the reference there is no "how fast" to tell: it would always read 100%.
    if s.half_epoch is not None and s.first_share is not None and s.first_epoch != epochs[-1]:
        # The speed compares distances from the reference, not amounts of movement: a share of 80% at
        # the first snapshot says where the weights were, not that 80% of the training happened by then.
        text = (f"{f.layer}: by epoch {s.first_epoch}, {weights} had moved {_pct(s.first_share)} of the distance from "
                f"epoch {epochs[0]} that they reached by epoch {epochs[-1]}")
        if s.half_epoch != s.first_epoch:
            text += f"; half of it by epoch {s.half_epoch}"
        out.append({"text": text + ".", "href": f"{page}#speed"})
    elif len(epochs) > 1 and s.half_epoch is None:
        out.append({"text": f"{f.layer}: {weights} did not change.", "href": f"{page}#speed"})
    r = f.reuse
    if r.measured:
        text = (f"{f.layer}: of the {r.measured} rendered channel{'s' * (r.measured != 1)} that responded to the probe "
                "images before training, ")
        if r.measured < 10:  # shares of a handful of channels read as more than they are: counted instead
            n = {k: r.counts[k] for k in ("kept", "repurposed", "died")}
            text += (f"{n['kept'] or 'none'} kept {'its' if n['kept'] == 1 else 'their'} feature, "
                     f"{n['repurposed'] or 'none'} {'was' if n['repurposed'] == 1 else 'were'} repurposed"
                     f"{repurposed_floor(f)}, {n['died'] or 'none'} died")
        else:
            text += (f"{_pct(r.share('kept'))} kept their feature, {_pct(r.share('repurposed'))} were repurposed"
                     f"{repurposed_floor(f)}, {_pct(r.share('died'))} died")
        aside = []
        if r.dead_before:
            aside.append(f"{r.dead_before} more responded to no probe image already before training")
        if r.unmeasured:
            aside.append(f"{r.unmeasured} more could not be compared: a failed render")
        if aside:
            text += f" ({'; '.join(aside)})"
        out.append({"text": text + ".", "href": f"{page}#sort=cross_b_on_a"})
        if f.floor is not None and math.isfinite(f.floor.drift):
            out.append({"text": drift_finding(f), "href": f"{page}#sort=drift"})
    elif r.dead_before or r.unmeasured:
        rendered = r.dead_before + r.unmeasured
        parts = []
        if r.dead_before:
            parts.append(f"{r.dead_before} responded to no probe image already before training")
        if r.unmeasured:
            parts.append(f"{r.unmeasured} could not be compared (a failed render)")
        out.append({"text": f"{f.layer}: of the {rendered} rendered channel{'s' * (rendered != 1)}, "
                            f"{' and '.join(parts)}: none has a fate (kept, repurposed or died) to tell.",
                    "href": f"{page}#sort=cross_b_on_a"})
    if f.scale_pairs:
        out.append({"text": f"{f.layer}: its features {scale_phrase(f.coarsening)}, by the dominant spatial "
                            f"frequency of {f.scale_pairs} responsive channel{'s' * (f.scale_pairs != 1)}' renders "
                            "before and after.",
                    "href": f"{page}#sort=coarsening"})
    return out


def repurposed_floor(f: LayerFacts) -> str:
    """The noise floor after a layer's repurposed share: what render noise alone would have the rule
    call repurposed, and "beyond noise" only where the share clears it."""
    floor, r = f.floor, f.reuse
    if floor is None or not math.isfinite(floor.repurposed_share):
        return ""
    n = r.counts["repurposed"]
    explained = n and not count_beyond_noise(n, r.measured, floor.repurposed_share)
    verdict = ": no more than noise gives" if explained else ""
    return f" (noise floor {_pct(floor.repurposed_share)}{verdict})"


def drift_finding(f: LayerFacts) -> str:
    """How many of a layer's channels' pictures changed beyond render noise (the drift floor)."""
    floor, n = f.floor, f.reuse.measured
    sample = len(floor.channels)
    why = (f"visual drift above {floor.drift:.3f}, the {FLOOR_WORDS} of {sample} channel{'s' * (sample != 1)} "
           "rendered twice before training with two seeds")
    if not f.drifted:
        return f"{f.layer}: no rendered channel's picture changed beyond render noise ({why})."
    chance = 1 - FLOOR_PERCENTILE / 100  # the share of unchanged channels above the floor, by its definition
    text = (f"{f.layer}: the pictures of {f.drifted} of the {n} rendered channel{'s' * (n != 1)} drifted past the "
            f"noise floor ({why})")
    if not count_beyond_noise(f.drifted, n, chance):
        text += f"; render noise alone puts about {_pct(chance)} of unchanged channels there: no change beyond noise"
    return text + "."


def check_findings(checks: Sequence[Any], layer: str, page: str) -> list[dict[str, str]]:
    """The sentence on a layer's self-checked pictures (metrics.checks.TileCheck): how many failed which check."""
    own = [t for t in checks if t.layer == layer]
    if not own:
        return []
    bad = [t for t in own if t.failed]
    n = len(own)
    if not bad:
        return [{"text": f"{layer}: all {n} rendered picture{'s' * (n != 1)} pass their self-checks (each excites its "
                         "unit at least as much as the best probe image and not implausibly more, keeps its activation "
                         "under small shifts, turns and scalings, and tells the same story as the dataset examples).",
                 "href": f"{page}#channels"}]
    names = {"vs_data": "against the best probe image", "views": "under small transformations",
             "agreement": "render and dataset examples disagree"}
    which = "; ".join(f"{names[k]}: {sum(1 for t in bad if k in t.failed)}" for k in names
                      if any(k in t.failed for t in bad))
    mark = "its badge marks it, and what it shows" if len(bad) == 1 else "their badges mark them, and what they show"
    return [{"text": f"{layer}: {len(bad)} of the {n} rendered pictures failed a self-check ({which}); {mark} "
                     "should be read against the dataset examples.",
             "href": f"{page}#channels"}]


def change_findings(ranking: ChangeRanking, classes: int, head_new: bool | None,
                    frozen_by: str | None = None, layer_rows: dict[str, dict] | None = None,
                    level: str = "95%") -> list[dict[str, str]]:
    """The sentences on which layers changed most (`metrics.answers.rank_layers`) and on the
    classifier head, which is reported apart: it maps onto this run's classes and, when it
    was made new for them, has no earlier function to keep.

    head_new: whether training replaced the head (None: not known). frozen_by: how the
    frozen layers were chosen (e.g. "--cutoff features.5"), named when some are left out.
    layer_rows: layer -> its layers.csv row at the ranking's epoch, whose CKA and bootstrap
    interval (at LEVEL) the sentence gives for the most and least changed layers."""
    out = []
    r = ranking
    if len(r.ranked) >= 2:
        hi, lo = r.ranked[0], r.ranked[-1]
        text = (f"By epoch {r.epoch}, of the {len(r.ranked)} layers with trained weights of their own, {hi.layer} "
                f"changed most and {lo.layer} least: on the same inputs, their outputs moved by {_size(hi.value)} and "
                f"{_size(lo.value)} of their size (function change)")
        cka = [cka_text(layer_rows.get(x.layer, {}), level) for x in (hi, lo)] if layer_rows else ["", ""]
        if all(cka):
            text += f"; their CKA with the first snapshot is {cka[0]} and {cka[1]}"
        if r.frozen:
            many = len(r.frozen) != 1
            text += (f"; the {len(r.frozen)} layer{'s' * many} frozen{' by ' + frozen_by if frozen_by else ''} "
                     f"({_names(r.frozen)}) did not take part")
        out.append({"text": text + ".", "href": "index.html#change"})
    for h in r.head:
        what = f"The new {classes}-class head {h.layer}" if head_new else f"The {classes}-class head {h.layer}"
        why = ("made for this dataset's classes when training began, it had no earlier function to keep"
               if head_new else "it maps the features onto this dataset's classes")
        out.append({"text": f"{what} is not ranked with the other layers ({why}); by epoch {r.epoch} its output on "
                            f"the same inputs moved by {_size(h.value)} of its size.", "href": "index.html#change"})
    return out


def cka_text(row: dict, level: str) -> str:
    """'0.912 (95% interval 0.894–0.930)', or '' where the row has no CKA."""
    v = row.get("cka")
    if v is None or not math.isfinite(float(v)):
        return ""
    low, high = row.get("cka_low"), row.get("cka_high")
    if low is None or high is None or not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return f"{float(v):.3f}"
    return f"{float(v):.3f} ({level} interval {float(low):.3f}–{float(high):.3f})"


def head_is_new(run: dict[str, Any]) -> bool | None:
    """Whether the run's training replaced the classifier head with a new one for its classes: its
    classes are not those of the network it started from. None where that network is unknown."""
    classes = list((run.get("dataset") or {}).get("classes") or (run.get("model") or {}).get("class_names") or [])
    source = (run.get("source") or {}).get("weights")
    if not classes or not source:
        return None
    if source == "random":
        return True  # every weight is new; the head is made for the run's classes all the same
    if source == "imagenet":
        from ..models.zoo import imagenet_classes

        return classes != imagenet_classes()
    from ..errors import FeatureshiftError
    from ..snapshot import read_meta

    try:
        return classes != list(read_meta(source).info.class_names)
    except (FeatureshiftError, OSError, ValueError):
        return None


def _size(v: float) -> str:
    """0.322, or 0.00012 where three decimals would read as no change at all."""
    return f"{v:.2g}" if 0 < abs(v) < 0.001 else f"{v:.3f}"


def _names(names: Sequence[str], limit: int = 3) -> str:
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def noise_verdict(row: dict[str, Any], column: str) -> str:
    """'beyond noise' or 'within noise' for a drift or B on A against the layer's floor on the row; '' for
    the measures without a render-noise floor, or without floors."""
    floor = {"drift": row.get("drift_floor"), "cross_b_on_a": row.get("kept_floor")}.get(column)
    v = row.get(column)
    if floor is None or v is None or not (math.isfinite(float(floor)) and math.isfinite(float(v))):
        return ""
    beyond = float(v) > float(floor) if column == "drift" else float(v) < float(floor)
    return "beyond noise" if beyond else "within noise"


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
                cands.append((float(v) if larger else -float(v), layer, c, float(v), noise_verdict(r, column)))
        cands.sort(key=lambda t: -t[0])
        out[name] = [{"layer": l, "channel": c, "value": v, "noise": n} for _, l, c, v, n in cands[:count]]
    return out
