"""`featureshift compare A B`: how the channels of one layer changed between two networks.

A before/after sheet (each channel's render at A above its render at B, with its
measures) and a ranking of the channels of the layer, most and least changed first.
A and B are snapshot files, or model names (with `weights`), e.g. the ImageNet
original against a fine-tuned snapshot.

The renders are tiles like a timeline's, planned, rendered (here or on Ray) and cached by
`featureshift.jobs`: a snapshot of a run in the run's tile cache (`run.tile_cache_dir`,
shared with its timelines, atlas and report), any other network (a model name, a module, a
loose snapshot) in OUTPUT_cache/ beside the sheet, so a second compare renders only what
is new. Without a sheet to write and without a run, the tiles live in a temporary folder
for the call. A snapshot file is rendered from its file, as a timeline's (a Ray worker gets
the file's bytes); a network by name or a module, from the module in memory. Drift and cross-activation are measured on the 8-bit tiles, as the report
measures them.

With `diff`, each channel also gets what it gained and what it lost from A to B (the
objectives "gained" and "lost" of `optvis.pair`: A and B rendered as one network), two more
rows of the sheet; those tiles are planned, rendered and cached the same way, the pair
named in the cache by both networks' checksums.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch import nn

from ..errors import FeatureshiftError, did_you_mean
from ..jobs.cache import TileCache, read_tile_about
from ..jobs.executors import check_ray, render_tiles
from ..jobs.plan import HeldNetwork, PairSource, TileRequest, hold_network, pair_source, plan_jobs
from ..models.info import model_info
from ..optvis.pair import check_difference_layers, check_pair
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..run import trained_image_size
from ..selection import COMPARE_COLUMNS, check_exclusive, select_channels
from ..metrics.adaptation import KEPT_THRESHOLD, both_measured, called_repurposed
from ..metrics.drift import cross_activation, visual_drift
from ..metrics.floors import SEED_OFFSET, NoiseFloor, floor_channels, floor_seed, noise_floor
from ..metrics.driver import CHANGE_METRICS
from ..metrics.probe import DEFAULT_PROBE_LIMIT, PROBE_BATCH, probe_stats, resolve_probe
from ..metrics.similarity import Interval, channel_correlation, cka, cka_interval, correlation_interval, probe_bootstrap
from ..metrics.weights import weight_change
from ..models.layers import layer_info
from ..network import Network, open_network

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
    # With diff: per sheet channel, what it gained and lost from A to B (None: failed; grid.NO_RESPONSE:
    # the difference never had a gradient, nothing found); empty without diff
    renders_gained: list[Any] = dataclasses.field(default_factory=list)
    renders_lost: list[Any] = dataclasses.field(default_factory=list)
    floor: NoiseFloor | None = None  # the layer's render-noise floor (A rendered again, seed + 1); None: --no-floor
    cka_interval: Interval | None = None  # the bootstrap interval of `cka` over the probe images
    interval_level: float = 0.95

    @property
    def changed(self) -> list[int]:
        """The rendered channels whose feature B replaced beyond render noise: B on A below both the
        fate rule's threshold and the noise floor (`metrics.adaptation.called_repurposed`)."""
        if self.floor is None:
            return []
        return [r["channel"] for r in self.rows if both_measured(r["cross_b_on_a"], r["cross_a_on_b"])
                and called_repurposed(r["cross_b_on_a"], self.floor.kept)]

    def ranked(self) -> list[dict[str, Any]]:
        """The channels with a `by` measure, most changed first."""
        rows = [r for r in self.rows if math.isfinite(change_score(r, self.by))]
        return sorted(rows, key=lambda r: -change_score(r, self.by))

    def table(self, n: int = 5) -> str:
        ranked = self.ranked()
        lines = [f"{self.layer}: {len(self.rows)} channels, A = {self.a}, B = {self.b}",
                 f"layer weight change {_fmt(self.weight_change)}"
                 + (f", CKA {_fmt(self.cka)}{self.cka_interval_text()} on {self.probe_images} probe images"
                    if self.cka is not None else " (no probe images: no CKA or correlation; give --probe DIR)")]
        head = (f"  {'channel':>7}  {'weight':>7}  {'corr':>7}  {'interval':>11}  {'drift':>7}  {'B on A':>7}  "
                f"{'A on B':>7}")
        for title, part in ((f"most changed by {self.by}", ranked[:n]),
                            (f"least changed by {self.by}", ranked[::-1][:n])):
            lines += [title + ":", head]
            lines += [f"  {r['channel']:>7}  {_fmt(r['weight_change']):>7}  {_fmt(r['correlation']):>7}  "
                      f"{_span(r.get('correlation_low'), r.get('correlation_high')):>11}  {_fmt(r['drift']):>7}  "
                      f"{_fmt(r['cross_b_on_a']):>7}  {_fmt(r['cross_a_on_b']):>7}"
                      for r in part]
        if not ranked:
            lines.append(f"no channel has a '{self.by}' measure")
        lines += self.floor_lines()
        return "\n".join(lines)

    def cka_interval_text(self) -> str:
        iv = self.cka_interval
        if iv is None or not (math.isfinite(iv.low) and math.isfinite(iv.high)):
            return ""
        return f" ({100 * self.interval_level:g}% interval {_fmt(iv.low)}-{_fmt(iv.high)})"

    def floor_lines(self) -> list[str]:
        """The table's account of the noise floor and of the channels changed beyond it."""
        f = self.floor
        if f is None or not f.channels:
            return []
        n = len(f.channels)
        rendered = sum(1 for r in self.rows if both_measured(r["cross_b_on_a"], r["cross_a_on_b"]))
        changed = self.changed
        return [f"noise floor ({n} channel{'s' * (n != 1)} of A rendered again with seed + {SEED_OFFSET}): drift "
                f"{_fmt(f.drift)}, B on A {_fmt(f.kept)}; drift past it: "
                f"{sum(1 for r in self.rows if f.drift_beyond(r['drift']))} of {rendered} channels",
                f"changed beyond noise (B on A below {_fmt(min(KEPT_THRESHOLD, f.kept))}): "
                + (", ".join(map(str, changed)) if changed else f"none of the {rendered} rendered channels")]


def _span(low, high) -> str:
    """A correlation's interval, 'low-high', or '-' where it was not computed."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"{low:.2f}-{high:.2f}"


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
            diff: bool = False, floor: bool = True, **changes) -> CompareResult:
    """Compare `layer` of networks A and B (snapshot files, model names, or modules).

    Channels on the sheet: the first `columns` (default COMPARE_COLUMNS, 8), the `channels` given ("0-4,17"),
    or the `most_changed` N by the measure `by` (weight, correlation, drift, cross; see
    docs/metrics.md). Representation measures use the `probe` folder, or else the
    validation images of the run A or B belongs to; without either they are left out.
    Both networks render each channel with the same `settings` (a RenderSettings, with
    keyword `changes` to its fields, e.g. steps=64), here or on Ray (`ray`: "auto" or a cluster
    address, see `featureshift.jobs.executors`), into the tile cache of A's or B's run, else
    OUTPUT_cache/ beside the sheet (see the module's docstring). The sheet is written to
    `output` if given; a sheet that cannot be written raises `featureshift.io.WriteError`.
    Channels of the output layer ('logits') are labelled with their class names. `diff`: two
    more rows, what each channel gained and lost from A to B (see the module's docstring).
    `floor`: render A's channels a second time (seed + 1) for the layer's render-noise floor
    (`metrics.floors`), which `CompareResult.changed` and the table judge change by.
    """
    settings = (settings or DEFAULT_SETTINGS).replace(**changes)
    check_ray(ray)
    _check_options(columns, channels, most_changed, by, output)
    if diff:
        check_difference_layers([layer])
    side_a, side_b = open_network(a, weights), open_network(b, weights)
    count = _check_pair(side_a.module, side_b.module, side_a.label, side_b.label, layer)
    if diff:  # before the probe pass, as every other refusal
        check_pair(side_a.module, side_b.module)

    def select(scores=None) -> list[int]:
        return select_channels(count, columns, channels, most_changed, scores, layer=layer, default=COMPARE_COLUMNS)

    if most_changed is None:
        select()  # a bad choice fails now, not after the probe pass
    wc = weight_change(side_a.module, side_b.module, [layer])[layer]
    rows = [{"channel": c, "weight_change": float(wc.channels[c]), "correlation": math.nan, "drift": math.nan,
             "cross_b_on_a": math.nan, "cross_a_on_b": math.nan} for c in range(count)]
    run = _run_of(side_a.path) or _run_of(side_b.path)
    if probe is None and run is None and by == "correlation":
        raise FeatureshiftError("Ranking by correlation needs probe images: give --probe DIR (a folder of images).")
    similarity = _probe_measures(side_a.module, side_b.module, layer, rows, run, probe, probe_limit, image_size,
                                 device, quiet)
    with tempfile.TemporaryDirectory(prefix="featureshift-compare-") as scratch:
        renders = _Renders(side_a, side_b, layer, settings, rows,
                           Path(output).with_name(Path(output).stem + "_cache") if output is not None else Path(scratch),
                           dict(ray=ray, device=device, batch_size=batch_size, quiet=quiet), diff)
        try:
            scores = None
            if most_changed is not None:
                if by in ("drift", "cross"):  # these need every channel rendered at both snapshots
                    renders.render(list(range(count)))
                scores = np.array([change_score(r, by) for r in rows])
            chosen = select(scores)
            renders.render(chosen)
            renders.render_changes(chosen)
            layer_floor = renders.measure_floor(chosen) if floor else None
        except OSError as e:
            raise renders.unwritten(e) from e
    renders_a = [renders.done[c][0] for c in chosen]
    renders_b = [renders.done[c][1] for c in chosen]
    info_b = getattr(side_b.module, "featureshift_info", None)
    changes = [renders.changes[c] for c in chosen] if diff else []
    shown = [renders_a, renders_b] + ([[c.gained for c in changes], [c.lost for c in changes]] if diff else [])
    sheet = _sheet(layer, chosen, rows, shown, side_a.label, side_b.label,
                   info_b.class_names if info_b is not None else None)
    result = CompareResult(layer, side_a.label, side_b.label, by, chosen, rows, wc.value, similarity.cka,
                           similarity.probe_images, sheet,
                           renders_a, renders_b, renders_gained=[c.gained for c in changes],
                           renders_lost=[c.lost for c in changes], floor=layer_floor,
                           cka_interval=similarity.interval, interval_level=similarity.level)
    if output is not None:
        result.output = _save_sheet(sheet, Path(output))
    return result


def _check_options(columns: int | None, channels: str | Sequence[int] | None, most_changed: int | None, by: str,
                   output: str | os.PathLike | None) -> None:
    check_exclusive(columns, channels, most_changed)
    if output is not None and Path(output).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise FeatureshiftError(f"The sheet {output} needs an image file name ending in .png (or .jpg, .webp).")
    if by not in CHANGE_METRICS:
        raise FeatureshiftError(f"Unknown measure '{by}'.{did_you_mean(by, CHANGE_METRICS)} "
                                f"Rank by one of {', '.join(CHANGE_METRICS)}.")


def _probe_measures(model_a: nn.Module, model_b: nn.Module, layer: str, rows: list[dict[str, Any]],
                    run: Path | None, probe, probe_limit: int | None, image_size: int | None, device: str,
                    quiet: bool) -> LayerSimilarity:
    """CKA of the layer and each channel's correlation (into ROWS), each with its bootstrap interval,
    on the probe images, or the run's validation images; no CKA without either."""
    if probe is None and run is None:
        return LayerSimilarity(None, None, 0)
    paths = resolve_probe(run, probe, probe_limit)
    # One size for both networks, or their activations would not be comparable.
    image_size = image_size or trained_image_size(run) or model_info(model_a).input_size
    cache = run / "metrics" / "cache" if run is not None and probe is None else None
    sa = probe_stats(model_a, [layer], paths, image_size=image_size, cache_dir=cache, device=device,
                     quiet=quiet, desc="probe A")
    sb = probe_stats(model_b, [layer], paths, image_size=image_size, cache_dir=cache, device=device,
                     quiet=quiet, desc="probe B")
    boot = probe_bootstrap(len(paths), PROBE_BATCH)
    corr_iv = correlation_interval(sa.layers[layer].pooled, sb.layers[layer].pooled, boot)
    for c, r in enumerate(channel_correlation(sa, sb, layer)):
        rows[c].update(correlation=float(r), correlation_low=float(corr_iv.low[c]),
                       correlation_high=float(corr_iv.high[c]))
    return LayerSimilarity(cka(sa, sb, layer), cka_interval(sa.layers[layer].grams, sb.layers[layer].grams, boot),
                           len(paths), boot.level)


@dataclasses.dataclass
class LayerSimilarity:
    """The layer's CKA between A and B on the probe images, with its bootstrap interval."""

    cka: float | None  # None without probe images
    interval: Interval | None
    probe_images: int
    level: float = 0.95


@dataclasses.dataclass
class _Side:
    """One of the two networks as the renders need it: what its tiles are rendered from (the
    snapshot file, as a timeline plans it, so that a Ray worker reads the file's bytes; a
    network that is no file is held in memory), the checksum naming them, the module itself
    (for the cross-activations) and where its tiles are cached."""

    source: Path | HeldNetwork
    checksum: str
    module: nn.Module
    cache: TileCache


def _side(net: Network, loose_cache: Path) -> _Side:
    from ..run import tile_cache_dir

    run = _run_of(net.path)
    cache = TileCache(tile_cache_dir(run) if run is not None else loose_cache)
    if net.path is not None and net.meta is not None:  # a snapshot file, named by the checksum it records
        return _Side(net.path, net.meta.checksum, net.module, cache)
    held = hold_network(net.module, net.meta.checksum if net.meta is not None else None)
    return _Side(held, held.checksum, net.module, cache)


@dataclasses.dataclass
class _Change:
    """What one channel gained and lost from A to B: a picture each, None where the render failed,
    grid.NO_RESPONSE where the difference never had a gradient."""

    gained: Any
    lost: Any


class _Renders:
    """The channels' renders at A and B (and with `diff` what each gained and lost), through the
    tile cache, with the measures taken from them."""

    def __init__(self, side_a: Network, side_b: Network, layer: str, settings: RenderSettings,
                 rows: list[dict[str, Any]], loose_cache: Path, how: dict[str, Any], diff: bool = False):
        from ..run import tile_cache_dir

        self.a, self.b = _side(side_a, loose_cache), _side(side_b, loose_cache)
        self.layer, self.settings, self.rows, self.how = layer, settings, rows, how
        self.done: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}  # channel -> (A's, B's), None: failed
        self.changes: dict[int, _Change] = {}
        self.pair: PairSource | None = None
        self.pair_cache: TileCache | None = None
        if diff:  # cached with the run's tiles, as A's and B's: a pair of a run's snapshots belongs to it
            run = _run_of(side_a.path) or _run_of(side_b.path)
            self.pair = pair_source(self.a.source, self.b.source, self.a.checksum, self.b.checksum)
            self.pair_cache = TileCache(tile_cache_dir(run) if run is not None else loose_cache)

    def unwritten(self, e: OSError) -> Exception:
        """A failed tile write E (a full disk) as one paragraph; any other OSError as it is."""
        from ..io import is_write_error, write_error

        if not is_write_error(e):
            return e
        folders = " and ".join(dict.fromkeys(str(s.cache.root) for s in (self.a, self.b)))
        return write_error(e, f"The renders stopped: a tile could not be saved in {folders} (the tiles saved so far "
                              "are kept) and no sheet was written",
                           "run the same command again: it renders only the missing tiles")

    def _tiles(self, source: Path | HeldNetwork | PairSource, checksum: str, cache: TileCache,
               settings: RenderSettings, chans: list[int], mark_silent: bool = False) -> list[Any]:
        """The tiles of CHANS from SOURCE: each an image, None where it failed, and with
        MARK_SILENT grid.NO_RESPONSE where the objective never had a gradient."""
        from ..grid import NO_RESPONSE
        from ..metrics.drift import read_image

        requests = [TileRequest(source, checksum, self.layer, c) for c in chans]
        plan = plan_jobs(requests, cache, settings=settings)
        report = render_tiles(plan, cache, show_steps=True, **self.how)
        out: list[Any] = []
        for r in requests:
            path = cache.path(plan.keys[r])
            about = read_tile_about(path) if path.exists() else {}
            if plan.keys[r] in report.failed or not about or about.get("failed"):
                out.append(None)
            else:
                out.append(NO_RESPONSE if mark_silent and about.get("no_response") else read_image(path))
        return out

    def render_changes(self, chans: list[int]) -> None:
        """What each of CHANS (those not done yet) gained and lost from A to B; only with `diff`."""
        chans = [c for c in chans if c not in self.changes]
        if self.pair is None or self.pair_cache is None or not chans:
            return
        gained, lost = (self._tiles(self.pair, self.pair.checksum, self.pair_cache,
                                    self.settings.replace(objective=objective), chans,
                                    mark_silent=True) for objective in ("gained", "lost"))
        self.changes.update({c: _Change(gained[i], lost[i]) for i, c in enumerate(chans)})

    def measure_floor(self, chosen: list[int]) -> NoiseFloor:
        """The layer's render-noise floor: A's renders of CHOSEN (and others rendered, up to
        FLOOR_CHANNELS) against A's second renders with the next seed; written into the rows."""
        sample = [c for c in floor_channels(chosen, sorted(self.done)) if self.done.get(c, (None,))[0] is not None]
        second = self._tiles(self.a.source, self.a.checksum, self.a.cache,
                             self.settings.replace(seed=floor_seed(self.settings.seed)), sample)
        floor = noise_floor(self.a.module, self.layer, {c: self.done[c][0] for c in sample},
                            {c: image for c, image in zip(sample, second) if image is not None})
        for r in self.rows:
            r["drift_floor"], r["kept_floor"] = floor.drift, floor.kept
        return floor

    def render(self, chans: list[int]) -> None:
        """Render CHANS (those not done yet) at A and B, and measure drift and cross-activation."""
        chans = [c for c in chans if c not in self.done]
        if not chans:
            return
        ia, ib = (self._tiles(s.source, s.checksum, s.cache, self.settings, chans) for s in (self.a, self.b))
        self.done.update({c: (ia[i], ib[i]) for i, c in enumerate(chans)})
        ok = [i for i in range(len(chans)) if ia[i] is not None and ib[i] is not None]
        if not ok:
            return
        targets = [(self.layer, chans[i]) for i in ok]
        d = visual_drift([ia[i] for i in ok], [ib[i] for i in ok])
        x_ba, x_ab = cross_activation(self.a.module, self.b.module, targets, [ia[i] for i in ok],
                                      [ib[i] for i in ok])
        for j, i in enumerate(ok):
            self.rows[chans[i]].update(drift=float(d[j]), cross_b_on_a=float(x_ba[j]), cross_a_on_b=float(x_ab[j]))


def _sheet(layer: str, chosen: list[int], rows: list[dict[str, Any]], renders: list[list[Any]], name_a: str,
           name_b: str, class_names) -> Image.Image:
    """The sheet: a column per channel, rows RENDERS: A's and B's, then (when given) what each
    channel gained and what it lost from A to B."""
    from ..grid import NO_RESPONSE, channel_label, make_grid

    labels = [f"{channel_label(layer, c, class_names, prefix='ch ')}\nw {_fmt(rows[c]['weight_change'], 2)} "
              f"r {_fmt(rows[c]['correlation'], 2)}\n"
              f"d {_fmt(rows[c]['drift'], 2)} x {_fmt(rows[c]['cross_b_on_a'], 2)}" for c in chosen]
    shown = [[t if t is NO_RESPONSE else _enlarge(t) for t in row] for row in renders]
    names = [f"A\n{name_a}", f"B\n{name_b}", "gained\nmore in B than A", "lost\nmore in A than B"]
    order = "A above B" if len(shown) == 2 else "A, B, gained, lost"
    title = f"{layer}: {order} (w weight change, r correlation, d drift, x B on A's render)"
    return make_grid(shown, row_labels=names[:len(shown)], col_labels=labels, title=title, missing_label="failed")


def _save_sheet(sheet: Image.Image, output: Path) -> Path:
    from ..io import is_write_error, save_image, write_error

    try:
        save_image(output, sheet)
    except OSError as e:
        if not is_write_error(e):
            raise
        raise write_error(e, f"The measures were computed but the sheet {output} was not written (an "
                             "earlier file of that name is unchanged)") from e
    return output
