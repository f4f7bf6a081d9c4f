"""Pictures that check themselves: three checks of every rendered tile against what the
network does on real images, and a verdict.

A feature visualization can mislead: a network can be built whose renders show a pattern
that no natural image makes the unit respond to (Geirhos et al., "Don't trust your eyes",
ICML 2024). Each tile is checked with what the metrics have anyway (the probe statistics,
the cross-activation) and a few forward passes of the render itself:

- vs. data: the render's activation (the channel objective: the channel's spatial mean)
  over the largest spatially averaged activation of any probe image at that snapshot.
  Below DATA_LOW the picture excites the unit less than a real image does; above DATA_HIGH,
  or DATA_SPREAD times what the other renders of its layer reach, it excites the unit beyond
  anything real, by a path that natural images do not use.
- views: the mean activation over VIEW_COUNT fixed views (shift, scale, rotation;
  optvis.transforms.fixed_views) over the activation on the render itself. Below VIEWS_LOW
  the picture works only at one exact alignment.
- agreement (later snapshots only): whether the render and the dataset examples tell the
  same story. The render's kept score is B on A (cross-activation), the data's the example
  retention (retention.py: the later network's mean activation on the reference's top probe
  images over its mean on its own top ones), both in channels.csv. They agree when the two
  are within a factor AGREEMENT_FACTOR of each other: both say kept, or both say changed
  about as much.

docs/metrics.md ("Self-checks") defines the numbers and gives the measured figures behind
the thresholds.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .drift import channel_activation, read_image

DATA_LOW = 1.0  # a render should excite its unit at least as much as the best real image
# measured on 176 ordinary ImageNet SqueezeNet units (docs/metrics.md): vs. data at most 174, and at most
# 5.9 times the median of the other units of its layer
DATA_HIGH = 500.0
DATA_SPREAD = 50.0
VIEWS_LOW = 0.5  # measured: ordinary SqueezeNet units keep at least 0.62 (docs/metrics.md)
# measured: the two kept scores of the demo's 84 later tiles are within a factor of 2.4; a cut of
# both at 0.5 (the reuse measure's) split 4 of them whose render scores sat just under it
AGREEMENT_FACTOR = 4.0
TILES_PER_PASS = 32  # renders per forward pass (each with its views): bounds the memory
CHECKS = ("vs_data", "views", "agreement")
COLUMNS = ("key", "activation", "best_real", "vs_data", "views", "render_kept", "data_kept", "agreement", "verdict",
           "failed")


@dataclasses.dataclass
class TileCheck:
    """The self-checks of one tile: (layer, epoch, channel) rendered as the cached file `key`.png."""
    layer: str
    epoch: int
    channel: int
    key: str  # the tile's cache key (its file name without .png)
    activation: float  # the channel objective on the render, by that snapshot's network
    best_real: float  # the largest spatially averaged activation over the probe images
    vs_data: float  # activation / best_real (inf: no probe image activates the unit, the render does)
    views: float  # mean activation over the fixed views / activation
    render_kept: float  # B on A; NaN at the reference
    data_kept: float  # the example retention: the same question asked of the probe images; NaN at the reference
    agreement: bool | None  # None at the reference, or where either side was not measured
    failed: tuple[str, ...] = ()  # the checks this tile fails, from CHECKS

    @property
    def verdict(self) -> str:
        return "doubtful" if self.failed else "trustworthy"

    def row(self) -> dict:
        """The tile's row of checks.csv."""
        return {"layer": self.layer, "epoch": self.epoch, "channel": self.channel, "key": self.key,
                "activation": self.activation, "best_real": self.best_real, "vs_data": self.vs_data,
                "views": self.views, "render_kept": self.render_kept, "data_kept": self.data_kept,
                "agreement": "" if self.agreement is None else int(self.agreement), "verdict": self.verdict,
                "failed": " ".join(self.failed)}

    def describe(self) -> str:
        """One line for a badge's tooltip: the verdict and the three values."""
        head = self.verdict + (f" ({', '.join(self.failed)} failed)" if self.failed else "")
        agree = "–" if self.agreement is None else (
            f"{'yes' if self.agreement else 'no'} (render kept {self.render_kept:.2f}, data kept {self.data_kept:.2f})")
        return (f"{head}. vs. data {_fmt(self.vs_data)}x the best probe image (ok: {DATA_LOW:g}-{DATA_HIGH:g}, "
                f"under {DATA_SPREAD:g}x its layer's median); views {_fmt(self.views)} (ok from {VIEWS_LOW:g}); "
                f"agreement {agree}")


def _number(v) -> float:
    return math.nan if v is None else float(v)


def _fmt(v: float) -> str:
    if v == math.inf:
        return "inf"
    return f"{v:.2f}" if math.isfinite(v) else "–"


def agree(render_kept: float, data_kept: float) -> bool | None:
    """Whether the render's kept score and the data's tell the same story: within a factor
    AGREEMENT_FACTOR of each other. None where either was not measured; a score at or below 0
    (the channel now answers its old picture or examples not at all) agrees only with another."""
    if not (math.isfinite(render_kept) and math.isfinite(data_kept)):
        return None
    if render_kept <= 0 or data_kept <= 0:
        return render_kept <= 0 and data_kept <= 0
    return abs(math.log(render_kept / data_kept)) <= math.log(AGREEMENT_FACTOR)


def ratio(value: float, best: float) -> float:
    """VALUE over BEST, for a ratio to a real image's activation: inf where BEST is not positive and
    VALUE is (the unit answers the picture and no real image), NaN where neither is positive."""
    if best > 0:
        return value / best
    return math.inf if value > 0 else math.nan


def too_strong(vs_data: float, neighbours: float | None) -> bool:
    """Whether a render excites its unit far beyond its best real image: more than DATA_HIGH times, or
    more than DATA_SPREAD times as far as the other renders of its layer at that snapshot outdo theirs
    (NEIGHBOURS: the median of their vs_data; None: no other render). The second because how far an
    ordinary render outdoes the probe images depends on the layer and the probe set (measured with 85
    photographs: a median of 7 in the first Fire module, 31 in the last), so a planted path is seen
    against its neighbours long before it passes DATA_HIGH."""
    if vs_data > DATA_HIGH:
        return True
    return neighbours is not None and math.isfinite(neighbours) and neighbours > 0 and \
        vs_data > DATA_SPREAD * neighbours


def failed_checks(vs_data: float, views: float, agreement: bool | None,
                  neighbours: float | None = None) -> tuple[str, ...]:
    """The checks a tile fails (NEIGHBOURS: see `too_strong`). An unmeasured value (NaN) fails
    nothing: there is nothing to say."""
    out = []
    if vs_data < DATA_LOW or too_strong(vs_data, neighbours):  # NaN compares False
        out.append("vs_data")
    if views < VIEWS_LOW:
        out.append("views")
    if agreement is False:
        out.append("agreement")
    return tuple(out)


def render_activations(model, targets: Sequence[tuple[str, int]], images: Sequence[np.ndarray],
                       views_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(activation on each image, mean activation over its fixed views) of each target (layer,
    channel) on its image, by MODEL; renders of one size go through the network together,
    TILES_PER_PASS at a time, each with its views."""
    import torch

    from ..optvis.transforms import VIEW_COUNT, fixed_views

    plain, seen = np.full(len(targets), np.nan), np.full(len(targets), np.nan)
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(np.asarray(im).shape, []).append(i)
    for group in by_size.values():
        for start in range(0, len(group), TILES_PER_PASS):
            part = group[start:start + TILES_PER_PASS]
            x = torch.as_tensor(np.stack([np.asarray(images[i], np.float32) for i in part])).permute(0, 3, 1, 2)
            views = [v.permute(0, 2, 3, 1).numpy() for v in fixed_views(x, VIEW_COUNT, views_seed)]
            pictures = [np.asarray(images[i], np.float32) for i in part]
            pictures += [v[j] for v in views for j in range(len(part))]
            acts = channel_activation(model, [targets[i] for i in part] * (1 + VIEW_COUNT), pictures)
            acts = acts.reshape(1 + VIEW_COUNT, len(part))
            plain[part], seen[part] = acts[0], acts[1:].mean(0)
    return plain, seen


def check_tiles(model, epoch: int, reference: bool, renders: dict[tuple[str, int, int], Path],
                layers: Sequence[str], stats, channel_rows: Sequence[dict]) -> list[TileCheck]:
    """The self-checks of every tile of LAYERS at EPOCH in RENDERS ((layer, epoch, channel) -> file),
    whose snapshot's network is MODEL and probe statistics STATS; CHANNEL_ROWS: channels.csv's rows so far, for B on A and the example retention. REFERENCE: EPOCH
    is the reference (no agreement to check)."""
    items = sorted(((l, c), p) for (l, e, c), p in renders.items() if e == epoch and l in layers)
    if not items:
        return []
    plain, seen = render_activations(model, [lc for lc, _ in items], [read_image(p) for _, p in items])
    rows = {(r["layer"], r["channel"]): r for r in channel_rows if r["epoch"] == epoch}
    out = []
    for i, ((layer, c), path) in enumerate(items):
        pooled = stats.layers[layer].pooled
        act = float(plain[i])
        kept_render = kept_data = math.nan
        agreement = None
        if not reference:
            kept_render, kept_data = (_number(rows.get((layer, c), {}).get(k))
                                      for k in ("cross_b_on_a", "example_retention"))
            agreement = agree(kept_render, kept_data)
        best = float(pooled[:, c].max())
        out.append(TileCheck(layer, epoch, c, Path(path).stem, act, best, ratio(act, best),
                             float(seen[i]) / act if act > 0 else math.nan, kept_render, kept_data, agreement))
    for t in out:
        others = [o.vs_data for o in out if o.layer == t.layer and o is not t and math.isfinite(o.vs_data)]
        t.failed = failed_checks(t.vs_data, t.views, t.agreement, float(np.median(others)) if others else None)
    return out


def summarize(checks: Sequence[TileCheck], seconds: float) -> dict:
    """summary.json's line on the self-checks: counts, what failed, the thresholds and the cost."""
    doubtful = [t for t in checks if t.failed]
    return {"tiles": len(checks), "trustworthy": len(checks) - len(doubtful), "doubtful": len(doubtful),
            "failed": {name: sum(1 for t in doubtful if name in t.failed) for name in CHECKS},
            "thresholds": {"vs_data_low": DATA_LOW, "vs_data_high": DATA_HIGH, "vs_data_spread": DATA_SPREAD,
                           "views": VIEWS_LOW, "agreement_factor": AGREEMENT_FACTOR},
            "seconds": round(seconds, 3), "definitions": "docs/metrics.md, Self-checks"}
