"""The report's plots: matplotlib figures written as SVG files (no pyplot, no global backend)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import write_bytes

COLORS = ["#2f5fb3", "#d1603d", "#3a9b5b", "#8e5bb5", "#b59a2f"]


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, color="#e4e7ec", linewidth=0.8)
        ax.set_axisbelow(True)
    return fig, axes


def _save(fig, path: Path) -> None:
    import matplotlib

    buf = io.BytesIO()
    # Text stays text (small files, quick to write; any sans-serif font will do) and a
    # fixed hash salt makes the files reproducible.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "featureshift"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    write_bytes(path, buf.getvalue())


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _error_bars(ax, xs: Sequence, ys: Sequence[float], low: Sequence, high: Sequence, color: str) -> None:
    """Vertical bars from low to high at each x where both ends are known (a bootstrap interval)."""
    pts = [(x, y, lo, hi) for x, y, lo, hi in zip(xs, ys, low, high)
           if y is not None and lo is not None and hi is not None
           and all(math.isfinite(float(v)) for v in (y, lo, hi))]
    if not pts:
        return
    x, y, lo, hi = (np.array(v, float) for v in zip(*pts))
    # A percentile interval need not hold the point estimate; a bar never reaches past it the wrong way.
    below, above = np.maximum(y - lo, 0.0), np.maximum(hi - y, 0.0)
    ax.errorbar(x, y, yerr=np.vstack([below, above]), fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5,
                alpha=0.8)


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    ax.set_xlabel("epoch")
    if epochs and len(epochs) <= 12:
        ax.set_xticks(list(epochs))


def training_curves(rows: list[dict], path: Path) -> bool:
    """Loss and accuracy per epoch, training and validation. False when there is nothing to draw."""
    if not rows:
        return False
    fig, (loss, acc) = _figure(9.5, 3.2, 2)
    epochs = [r.get("epoch") for r in rows]
    drawn = False
    for ax, key, title in ((loss, "loss", "loss"), (acc, "acc", "accuracy")):
        for j, part in enumerate(("train", "val")):
            xs, ys = _finite(epochs, [r.get(f"{part}_{key}") for r in rows])
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, color=COLORS[j],
                        label="training" if part == "train" else "validation")
                drawn = True
        ax.set_title(title, loc="left", fontsize=11)
        _epoch_axis(ax, epochs)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=9)
    acc.set_ylim(0, 1.02)
    if drawn:
        _save(fig, path)
    return drawn


def change_heatmaps(layers: Sequence[str], epochs: Sequence[int], weight: np.ndarray, cka: np.ndarray,
                    path: Path) -> None:
    """Layers x epochs: weight change (0 = untouched) and CKA (1 = same representation)."""
    height = 1.2 + 0.24 * len(layers)
    fig, axes = _figure(10, height, 2)
    w_hi = float(np.nanmax(weight)) if np.isfinite(weight).any() else 1.0
    # CKA of a fine-tuned layer often stays above 0.9: a 0-1 scale would hide every difference.
    c_lo = float(np.nanmin(cka)) if np.isfinite(cka).any() else 0.0
    c_lo = min(c_lo, 1.0 - 1e-3)
    panels = ((axes[0], weight, "weight change", "viridis", 0.0, max(w_hi, 1e-6)),
              (axes[1], cka, "CKA with epoch %d" % epochs[0], "magma", c_lo, 1.0))
    for ax, values, title, cmap, lo, hi in panels:
        ax.grid(False)
        im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
                       interpolation="nearest")
        ax.set_yticks(range(len(layers)), labels=list(layers), fontsize=8)
        step = max(1, math.ceil(len(epochs) / 12))
        ax.set_xticks(range(0, len(epochs), step), labels=[str(e) for e in epochs[::step]], fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(title, loc="left", fontsize=11)
        fig.colorbar(im, ax=ax, shrink=0.9)
    axes[1].set_yticklabels([])
    _save(fig, path)


def layer_history(epochs: Sequence[int], weight: Sequence[float], cka: Sequence[float], path: Path,
                  cka_low: Sequence[float] = (), cka_high: Sequence[float] = ()) -> None:
    """Weight change and CKA per epoch; CKA with its interval (cka_low, cka_high) as error bars where given."""
    fig, (a, b) = _figure(9.5, 2.8, 2)
    for ax, ys, title, color in ((a, weight, "weight change", COLORS[0]), (b, cka, "CKA", COLORS[1])):
        xs, vs = _finite(epochs, ys)
        ax.plot(xs, vs, marker="o", markersize=3, color=color)
        ax.set_title(title, loc="left", fontsize=11)
        _epoch_axis(ax, epochs)
    _error_bars(b, epochs, cka, cka_low, cka_high, COLORS[1])
    b.set_ylim(min(0.0, b.get_ylim()[0]), 1.02)
    _save(fig, path)


def channel_history(epochs: Sequence[int], series: dict[str, Sequence[float]], path: Path,
                    intervals: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> None:
    """Three panels, each on its own scale: measures that grow with change (0 = unchanged), the
    correlation (-1 to 1) and the cross-activations (1 = kept its feature; they can reach far above 1).
    intervals: series name -> (low, high) per epoch, drawn as error bars."""
    fig, (a, b, c) = _figure(11, 3.0, 3)
    groups = ((a, ("weight change", "drift"), "change (0 = unchanged)"),
              (b, ("correlation",), "correlation (1 = unchanged)"),
              (c, ("B on A", "A on B"), "cross-activation (1 = kept)"))
    for ax, names, title in groups:
        for j, name in enumerate(names):
            xs, vs = _finite(epochs, series.get(name, []))
            if xs:
                color = COLORS[j + (2 if ax is c else 0)]
                ax.plot(xs, vs, marker="o", markersize=3, color=color, label=name)
                if name in (intervals or {}):
                    _error_bars(ax, epochs, series[name], *intervals[name], color)
        ax.set_title(title, loc="left", fontsize=11)
        _epoch_axis(ax, epochs)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=9)
    b.set_ylim(min(-0.05, b.get_ylim()[0]), 1.05)
    c.axhline(1.0, color="#a0a8b8", linewidth=0.8, linestyle="--")
    _save(fig, path)
