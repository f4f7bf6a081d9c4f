"""How a layer adapted during fine-tuning: how fast (speed of adaptation), and what became
of each channel's feature (kept, repurposed or died). Both are read off the per-epoch
measures of `run_metrics`; definitions and thresholds are in docs/metrics.md."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

HALF = 0.5  # the speed of adaptation is the epoch by which this share of the final change happened
KEPT_THRESHOLD = 0.5  # B on A at least this: the epoch-0 feature still drives the channel
DEAD_THRESHOLD = 0.0  # largest activation on every probe image at most this: the channel does not respond
FATES = ("kept", "repurposed", "died")


# ---------------------------------------------------------------- dead channels

def dead_channels(peak: np.ndarray, threshold: float = DEAD_THRESHOLD) -> np.ndarray:
    """Per channel: True where no probe image activates it.

    peak: (images, channels), each channel's spatial maximum on each probe image (a
    LayerStats.peak). A channel is dead when its largest activation over every image
    and position is at most `threshold` (0: a ReLU that is zero everywhere).
    """
    peak = np.asarray(peak, dtype=np.float64)
    if peak.ndim != 2:
        raise ValueError(f"peak must be (images, channels), not shape {peak.shape}")
    if peak.shape[0] == 0:
        return np.zeros(peak.shape[1], bool)
    return ~(np.nan_to_num(peak, nan=-np.inf).max(0) > threshold)


# ---------------------------------------------------------------- speed of adaptation

@dataclasses.dataclass(frozen=True)
class Speed:
    """How fast a layer or channel changed.

    half_epoch: the first measured epoch by which at least HALF of the final change had
    happened (None when it did not change). first_share: the change at the first
    measured epoch after the reference divided by the final change, at most 1 (None
    when it did not change). final: the change at the last epoch.
    """

    half_epoch: int | None
    first_share: float | None
    final: float
    first_epoch: int | None = None  # the epoch `first_share` is about


def adaptation_speed(series: Iterable[tuple[int, float]], reference: int | None = None) -> Speed:
    """Speed of adaptation from (epoch, change from the reference) pairs, e.g. a weight change series.

    `reference` is the epoch everything is compared to (its change is 0 by definition;
    default the smallest epoch). Epochs with a non-finite value are skipped. A series
    whose final change is not positive has not changed: half_epoch and first_share are None.
    """
    points = sorted((int(e), float(v)) for e, v in series if v is not None and math.isfinite(float(v)))
    if reference is None:
        reference = points[0][0] if points else 0
    later = [(e, v) for e, v in points if e > reference]
    if not later:
        return Speed(None, None, 0.0)
    final = later[-1][1]
    if not final > 0:
        return Speed(None, None, final, later[0][0])
    half = next(e for e, v in later if v >= HALF * final)
    first_epoch, first = later[0]
    return Speed(half, float(min(1.0, max(0.0, first / final))), final, first_epoch)


def layer_speed(metrics, layer: str, column: str = "weight_change") -> Speed:
    """The speed of adaptation of a whole layer from a RunMetrics' layer rows (its weight change)."""
    return adaptation_speed(metrics.layer_series(layer, column), metrics.reference)


def channel_speeds(metrics, layer: str, column: str = "weight_change") -> dict[int, Speed]:
    """Per channel of `layer`: its speed of adaptation from a RunMetrics' channel rows."""
    series: dict[int, list[tuple[int, float]]] = {}
    for r in metrics.channel_rows:
        if r["layer"] == layer:
            series.setdefault(int(r["channel"]), []).append((r["epoch"], r.get(column)))
    return {c: adaptation_speed(s, metrics.reference) for c, s in sorted(series.items())}


# ---------------------------------------------------------------- reuse

def called_repurposed(b_on_a: float, floor: float | None = None, threshold: float = KEPT_THRESHOLD) -> bool:
    """Whether a kept score B on A says the feature was replaced: below `threshold` and, where the
    layer has a render-noise floor (`metrics.floors`), below that too, so that a score render noise
    alone gives an unchanged channel is never called a change."""
    limit = threshold if floor is None or not math.isfinite(float(floor)) else min(threshold, float(floor))
    return math.isfinite(float(b_on_a)) and float(b_on_a) < limit


def both_measured(b_on_a: float | None, a_on_b: float | None = None) -> bool:
    """Whether a cross-activation compares two good renders: B on A is measured and, where A on B is
    given, so is it (each is NaN where the network's own render does not excite its channel)."""
    def finite(v) -> bool:
        return v is not None and v != "" and math.isfinite(float(v))

    return finite(b_on_a) and (a_on_b is None or finite(a_on_b))


def channel_fate(b_on_a: float | None, dead_before: bool = False, dead_after: bool = False,
                 threshold: float = KEPT_THRESHOLD, floor: float | None = None,
                 a_on_b: float | None = None) -> str | None:
    """What became of one channel's feature: "kept", "repurposed", "died", or None.

    died: it responded to the probe images before fine-tuning and responds to none after.
    repurposed: the fine-tuned channel fires on its epoch-0 render less than `threshold` times
    as strongly as on its own render (B on A < threshold), and less than the layer's noise
    floor `floor` of B on A where there is one (`called_repurposed`). kept: otherwise.
    None: dead already before fine-tuning, or B on A was not measured (no renders, or a
    failed render: given A on B, a reference render that does not excite its own channel, whose
    B on A of 0 would read as a lost feature, makes it NaN).
    """
    if dead_before:
        return None
    if dead_after:
        return "died"
    if not both_measured(b_on_a, a_on_b):
        return None
    return "repurposed" if called_repurposed(b_on_a, floor, threshold) else "kept"


@dataclasses.dataclass(frozen=True)
class Reuse:
    """The fates of a layer's channels; shares are of the channels with a fate."""

    counts: dict[str, int]  # fate -> channels
    dead_before: int  # channels that responded to no probe image before fine-tuning (no fate)
    unmeasured: int  # channels without a cross-activation (not rendered at both snapshots)

    @property
    def measured(self) -> int:
        return sum(self.counts.values())

    def share(self, fate: str) -> float | None:
        return self.counts[fate] / self.measured if self.measured else None


def reuse(fates: Sequence[str | None], dead_before: Sequence[bool] | None = None) -> Reuse:
    """Count the fates of a layer's channels (from `channel_fate`)."""
    dead_before = list(dead_before) if dead_before is not None else [False] * len(fates)
    counts = {f: sum(1 for x in fates if x == f) for f in FATES}
    before = sum(1 for d in dead_before if d)
    unmeasured = sum(1 for x, d in zip(fates, dead_before) if x is None and not d)
    return Reuse(counts, before, unmeasured)


def layer_fates(metrics, layer: str, epoch: int | None = None,
                threshold: float = KEPT_THRESHOLD) -> dict[int, str | None]:
    """Per channel of `layer`: its fate at `epoch` (default the last) from a RunMetrics' channel rows
    (cross_b_on_a, and the dead column at the reference and at `epoch`).

    Where the rows carry the layer's render-noise floor of B on A (column kept_floor, see
    metrics.floors), a channel is repurposed only below it. Only channels rendered at both
    snapshots get a fate (their drift was measured), so that the shares of a layer are of one
    set of channels: a channel that died but was never rendered would otherwise count while
    its rendered neighbours alone could be kept.
    """
    epoch = metrics.epochs[-1] if epoch is None else epoch
    before = {r["channel"]: bool(r.get("dead")) for r in metrics.channel_table(layer, metrics.reference)}
    out = {}
    for r in metrics.channel_table(layer, epoch):
        drift = r.get("drift")
        rendered = drift is not None and math.isfinite(float(drift))
        floor = _number(r.get("kept_floor"))
        out[r["channel"]] = channel_fate(r.get("cross_b_on_a"), before.get(r["channel"], False),
                                         bool(r.get("dead")), threshold, floor,
                                         r.get("cross_a_on_b")) if rendered else None
    return out


def _number(v) -> float | None:
    """A row's value as a float: None for a missing or empty one (a CSV cell)."""
    if v is None or v == "":
        return None
    return float(v)
