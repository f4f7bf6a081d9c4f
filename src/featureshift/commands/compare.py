"""`featureshift compare A B`: how the channels of one layer changed between two networks.

A before/after sheet (each channel's render at A above its render at B, with its
measures) and a ranking of the channels of the layer, most and least changed first.
A and B are snapshot files, or model names (with `weights`), e.g. the ImageNet
original against a fine-tuned snapshot.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch import nn

from ..errors import FeatureshiftError, did_you_mean
from ..models.info import model_info
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..run import trained_image_size
from ..selection import COMPARE_COLUMNS, check_exclusive, select_channels
from ..metrics.drift import cross_activation, visual_drift
from ..metrics.driver import CHANGE_METRICS
from ..metrics.probe import DEFAULT_PROBE_LIMIT, probe_stats, resolve_probe
from ..metrics.similarity import channel_correlation, cka
from ..metrics.weights import weight_change
from ..models.layers import layer_info
from ..network import open_network

@dataclasses.dataclass
class CompareResult:
    layer: str
    a: str  # how A and B are named on the sheet and in the table
    b: str
    by: str  # the measure channels are ranked by
    channels: list[int]  # the channels on the sheet
    rows: list[dict[str, Any]]  # every channel of the layer; NaN where a measure was not taken
    weight_change: float  # the whole layer
    cka: float | None  # None without a probe set
    probe_images: int
    sheet: Image.Image
    renders_a: list[np.ndarray | None]  # per sheet channel, None where the render failed
    renders_b: list[np.ndarray | None]
    output: Path | None = None

    def ranked(self) -> list[dict[str, Any]]:
        """The channels with a `by` measure, most changed first."""
        rows = [r for r in self.rows if math.isfinite(change_score(r, self.by))]
        return sorted(rows, key=lambda r: -change_score(r, self.by))

    def table(self, n: int = 5) -> str:
        ranked = self.ranked()
        lines = [f"{self.layer}: {len(self.rows)} channels, A = {self.a}, B = {self.b}",
                 f"layer weight change {_fmt(self.weight_change)}"
                 + (f", CKA {_fmt(self.cka)} on {self.probe_images} probe images" if self.cka is not None
                    else " (no probe images: no CKA or correlation; give --probe DIR)")]
        head = f"  {'channel':>7}  {'weight':>7}  {'corr':>7}  {'drift':>7}  {'B on A':>7}  {'A on B':>7}"
        for title, part in ((f"most changed by {self.by}", ranked[:n]),
                            (f"least changed by {self.by}", ranked[::-1][:n])):
            lines += [title + ":", head]
            lines += [f"  {r['channel']:>7}  {_fmt(r['weight_change']):>7}  {_fmt(r['correlation']):>7}  "
                      f"{_fmt(r['drift']):>7}  {_fmt(r['cross_b_on_a']):>7}  {_fmt(r['cross_a_on_b']):>7}"
                      for r in part]
        if not ranked:
            lines.append(f"no channel has a '{self.by}' measure")
        return "\n".join(lines)


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def _enlarge(tile, least: int = 112):
    """Small renders are shown enlarged (nearest neighbour), so that the labels above them fit."""
    from ..grid import to_pil

    if tile is None:
        return None
    im = to_pil(tile)
    if im.width >= least:
        return im
    k = math.ceil(least / im.width)
    return im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)


def change_score(row: dict[str, Any], by: str) -> float:
    """Larger = more changed: weight change, 1 - correlation, drift, 1 - cross-activation (B on A's render)."""
    v = {"weight": row["weight_change"], "correlation": 1 - row["correlation"], "drift": row["drift"],
         "cross": 1 - row["cross_b_on_a"]}[by]
    return float(v)


def _run_of(path: Path | None) -> Path | None:
    from ..run import is_run

    if path is None:
        return None
    run = path.resolve().parent.parent
    return run if is_run(run) else None


def _check_pair(model_a: nn.Module, model_b: nn.Module, name_a: str, name_b: str, layer: str) -> int:
    ia = getattr(model_a, "featureshift_info", None)
    ib = getattr(model_b, "featureshift_info", None)
    if ia is not None and ib is not None and ia.arch != ib.arch:
        raise FeatureshiftError(
            f"A ({name_a}) is a {ia.arch} and B ({name_b}) a {ib.arch}: different architectures have no "
            "channels in common. Compare two snapshots of the same network, e.g. two epochs of one run.")
    ca, cb = layer_info(model_a, layer).channels, layer_info(model_b, layer).channels
    if ca != cb:
        raise FeatureshiftError(f"Layer '{layer}' has {ca} channels in A and {cb} in B, so its channels do not "
                                "correspond; choose a layer below the classifier head.")
    return ca


def compare(a, b, layer: str, *, columns: int | None = None, channels: str | Sequence[int] | None = None,
            most_changed: int | None = None, by: str = "weight", output: str | os.PathLike | None = None,
            probe: str | os.PathLike | None = None, probe_limit: int | None = DEFAULT_PROBE_LIMIT,
            image_size: int | None = None, weights: str = "imagenet", settings: RenderSettings | None = None,
            device: str = "auto", batch_size: int | None = None, quiet: bool = False, ray: str | None = None,
            **changes) -> CompareResult:
    """Compare `layer` of networks A and B (snapshot files, model names, or modules).

    Channels on the sheet: the first `columns` (default COMPARE_COLUMNS, 8), the `channels` given ("0-4,17"),
    or the `most_changed` N by the measure `by` (weight, correlation, drift, cross; see
    docs/metrics.md). Representation measures use the `probe` folder, or else the
    validation images of the run A or B belongs to; without either they are left out.
    Both networks render each channel with the same `settings` (a RenderSettings, with
    keyword `changes` to its fields, e.g. steps=64), here or on Ray (`ray`: "auto" or a cluster
    address, see `featureshift.jobs.executors`). The sheet is written to `output` if given;
    a sheet that cannot be written raises `featureshift.io.WriteError`. Channels of the output
    layer ('logits') are labelled with their class names.
    """
    from ..grid import channel_label, make_grid
    from ..io import is_write_error, save_image, write_error
    from ..jobs.executors import check_ray, render_network

    settings = (settings or DEFAULT_SETTINGS).replace(**changes)
    check_ray(ray)
    check_exclusive(columns, channels, most_changed)
    if output is not None and Path(output).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise FeatureshiftError(f"The sheet {output} needs an image file name ending in .png (or .jpg, .webp).")
    if by not in CHANGE_METRICS:
        raise FeatureshiftError(f"Unknown measure '{by}'.{did_you_mean(by, CHANGE_METRICS)} "
                                f"Rank by one of {', '.join(CHANGE_METRICS)}.")
    side_a, side_b = open_network(a, weights), open_network(b, weights)
    model_a, model_b, name_a, name_b = side_a.module, side_b.module, side_a.label, side_b.label
    count = _check_pair(model_a, model_b, name_a, name_b, layer)

    def select(scores=None) -> list[int]:
        return select_channels(count, columns, channels, most_changed, scores, layer=layer, default=COMPARE_COLUMNS)

    if most_changed is None:
        select()  # a bad choice fails now, not after the probe pass

    wc = weight_change(model_a, model_b, [layer])[layer]
    rows = [{"channel": c, "weight_change": float(wc.channels[c]), "correlation": math.nan, "drift": math.nan,
             "cross_b_on_a": math.nan, "cross_a_on_b": math.nan} for c in range(count)]
    run = _run_of(side_a.path) or _run_of(side_b.path)
    layer_cka, n_probe = None, 0
    if probe is not None or run is not None:
        paths = resolve_probe(run, probe, probe_limit)
        # One size for both networks, or their activations would not be comparable.
        image_size = image_size or trained_image_size(run) or model_info(model_a).input_size
        cache = run / "metrics" / "cache" if run is not None and probe is None else None
        sa = probe_stats(model_a, [layer], paths, image_size=image_size, cache_dir=cache, device=device,
                         quiet=quiet, desc="probe A")
        sb = probe_stats(model_b, [layer], paths, image_size=image_size, cache_dir=cache, device=device,
                         quiet=quiet, desc="probe B")
        layer_cka, n_probe = cka(sa, sb, layer), len(paths)
        for c, r in enumerate(channel_correlation(sa, sb, layer)):
            rows[c]["correlation"] = float(r)
    elif by == "correlation":
        raise FeatureshiftError("Ranking by correlation needs probe images: give --probe DIR (a folder of images).")

    def render_both(chans: list[int]):
        targets = [(layer, c) for c in chans]
        ra = render_network(model_a, targets, settings, ray=ray, device=device, batch_size=batch_size, quiet=quiet)
        rb = render_network(model_b, targets, settings, ray=ray, device=device, batch_size=batch_size, quiet=quiet)
        ia = [None if i in ra.failed else ra.images[i] for i in range(len(chans))]
        ib = [None if i in rb.failed else rb.images[i] for i in range(len(chans))]
        ok = [i for i in range(len(chans)) if ia[i] is not None and ib[i] is not None]
        if ok:
            d = visual_drift([ia[i] for i in ok], [ib[i] for i in ok])
            x_ba, x_ab = cross_activation(model_a, model_b, [targets[i] for i in ok], [ia[i] for i in ok],
                                          [ib[i] for i in ok])
            for j, i in enumerate(ok):
                rows[chans[i]].update(drift=float(d[j]), cross_b_on_a=float(x_ba[j]), cross_a_on_b=float(x_ab[j]))
        return ia, ib

    scores = None
    rendered: dict[int, tuple] = {}
    if most_changed is not None:
        if by in ("drift", "cross"):  # these need every channel rendered at both snapshots
            ia, ib = render_both(list(range(count)))
            rendered = {c: (ia[c], ib[c]) for c in range(count)}
        scores = np.array([change_score(r, by) for r in rows])
    chosen = select(scores)
    todo = [c for c in chosen if c not in rendered]
    if todo:
        ia, ib = render_both(todo)
        rendered.update({c: (ia[i], ib[i]) for i, c in enumerate(todo)})
    renders_a = [rendered[c][0] for c in chosen]
    renders_b = [rendered[c][1] for c in chosen]

    info_b = getattr(model_b, "featureshift_info", None)
    class_names = info_b.class_names if info_b is not None else None
    labels = [f"{channel_label(layer, c, class_names, prefix='ch ')}\nw {_fmt(rows[c]['weight_change'], 2)} "
              f"r {_fmt(rows[c]['correlation'], 2)}\n"
              f"d {_fmt(rows[c]['drift'], 2)} x {_fmt(rows[c]['cross_b_on_a'], 2)}" for c in chosen]
    shown = [[_enlarge(t) for t in renders_a], [_enlarge(t) for t in renders_b]]
    sheet = make_grid(shown, row_labels=[f"A\n{name_a}", f"B\n{name_b}"], col_labels=labels,
                      title=f"{layer}: A above B (w weight change, r correlation, d drift, x B on A's render)",
                      missing_label="failed")
    result = CompareResult(layer, name_a, name_b, by, chosen, rows, wc.value, layer_cka, n_probe, sheet,
                           renders_a, renders_b)
    if output is not None:
        result.output = Path(output)
        try:
            save_image(result.output, sheet)
        except OSError as e:
            if not is_write_error(e):
                raise
            raise write_error(e, f"The measures were computed but the sheet {output} was not written (an "
                                 "earlier file of that name is unchanged)") from e
    return result
