"""Every measure of a training run, each snapshot against the first: `run_metrics`
computes them and writes RUN/metrics/ (layers.csv, channels.csv, examples.json,
summary.json)."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from ..errors import FeatureshiftError
from ..io import write_json, write_text
from ..models.layers import LayerInfo, layer_info, layer_structure
from ..models.zoo import head_modules
from ..network import Network, open_network
from ..run import trained_image_size
from ..snapshot import network_checksum
from ..states import State, read_snapshot_state
from .adaptation import dead_channels
from .checks import COLUMNS as CHECK_COLUMNS, TileCheck, check_tiles, summarize
from .drift import channel_activation, cross_activation, read_image, texture_descriptors, visual_drift_from
from .examples import ExampleShifts, find_examples, receptive_field, shifted_examples
from .floors import FLOOR_PERCENTILE, SEED_OFFSET, NoiseFloor, noise_floor
from .function import cached_function_change
from .probe import DEFAULT_PROBE_LIMIT, METRICS_VERSION, PROBE_BATCH, probe_loader, probe_stats, \
    resolve_probe
from .similarity import DEFAULT_LEVEL, DEFAULT_RESAMPLES, DEFAULT_SEED, Bootstrap, channel_correlation, cka, \
    cka_interval, correlation_interval, probe_bootstrap
from .retention import TOP_SHARE, example_retention, retention_interval
from .sources import channel_sources
from .weights import weight_change

# Larger = more changed, for ranking channels (`--most-changed N --by METRIC`).
CHANGE_METRICS = ("weight", "correlation", "drift", "cross")
CHANNEL_COLUMNS = ("weight_change", "correlation", "drift", "cross_b_on_a", "cross_a_on_b")
LAYER_COLUMNS = ("weight_change", "function_change", "cka")
# Written after the columns above, which the report and compare-runs read by name.
LAYER_INTERVALS = ("cka_low", "cka_high")
CHANNEL_INTERVALS = ("correlation_low", "correlation_high")
CHANNEL_FLOORS = ("drift_floor", "kept_floor")  # the layer's render-noise floors (metrics.floors), on each row
# What the dataset examples say per channel (metrics/retention.py), after the columns above.
EXAMPLE_COLUMNS = ("example_retention", "example_retention_low", "example_retention_high")


@dataclasses.dataclass
class IntervalSettings:
    """How a run's bootstrap intervals were computed, and what they cost."""
    resamples: int
    level: float
    seed: int
    seconds: float


@dataclasses.dataclass
class RunMetrics:
    """Every measure of a run, each later snapshot against the reference (the first)."""
    run_dir: Path
    epochs: list[int]  # the snapshots measured, in training order
    reference: int
    layers: list[str]  # layers with layer-level measures
    channels: dict[str, list[int]]  # layers with channel-level measures -> the rendered channels
    layer_rows: list[dict]  # epoch, layer, weight_change, function_change, cka, cka_low, cka_high
    # epoch, layer, channel, weight_change, correlation, drift, cross_b_on_a, cross_a_on_b, dead,
    # correlation_low, correlation_high, example_retention, example_retention_low, example_retention_high
    channel_rows: list[dict]
    probe: list[Path]
    image_size: int
    examples: dict[tuple[str, int, int], list]  # (layer, channel, epoch) -> [examples.Example]
    receptive_field: dict[str, int]
    layer_info: dict[str, LayerInfo]  # type and channel count of every measured layer
    sources: dict[str, list[str]]  # layer -> the modules whose weights make its channels
    # layer -> the parameter-holding modules inside it (itself included); empty: no weights of its own
    parameters: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    head: list[str] = dataclasses.field(default_factory=list)  # the classifier's final layer(s) (zoo.head_modules)
    missing: dict[int, str] = dataclasses.field(default_factory=dict)
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    intervals: IntervalSettings | None = None  # how the bootstrap intervals were computed; None: not computed
    floors: dict[str, NoiseFloor] = dataclasses.field(default_factory=dict)  # layer -> its render-noise floor
    # (layer, channel, epoch) -> the probe images whose activation rose and fell most since the reference
    shifts: dict[tuple[str, int, int], ExampleShifts] = dataclasses.field(default_factory=dict)
    checks: list[TileCheck] | None = None  # the rendered tiles' self-checks (checks.py); None: not computed
    check_seconds: float = 0.0

    def layer_series(self, layer: str, column: str) -> list[tuple[int, float]]:
        return [(r["epoch"], r[column]) for r in self.layer_rows if r["layer"] == layer]

    def channel_series(self, layer: str, channel: int, column: str) -> list[tuple[int, float]]:
        return [(r["epoch"], r[column]) for r in self.channel_rows if r["layer"] == layer and r["channel"] == channel]

    def channel_table(self, layer: str, epoch: int) -> list[dict]:
        return [r for r in self.channel_rows if r["layer"] == layer and r["epoch"] == epoch]


def overview_layers(model: nn.Module) -> list[str]:
    """A layer per stage of the network, for the per-layer summary: the shallowest module depth
    with at least six 4-D layers (squeezenet's features.N, googlenet's inception blocks, ...)."""
    layers = [l for l in layer_structure(model).layers.values() if l.type not in ("Dropout", "Dropout2d", "Identity")]
    for depth in range(1, 1 + max((l.name.count(".") + 1 for l in layers), default=0)):
        chosen = [l.name for l in layers if l.name.count(".") + 1 == depth]
        if len(chosen) >= 6:
            return chosen
    return [l.name for l in layers]


def run_metrics(run_dir: str | Path, layers: Sequence[str] = (), channels: dict[str, Sequence[int]] | None = None,
                *, renders: dict[tuple[str, int, int], Path] | None = None,
                floor_renders: dict[tuple[str, int], Path] | None = None, probe: str | Path | None = None,
                probe_limit: int | None = DEFAULT_PROBE_LIMIT, image_size: int | None = None,
                overview: Sequence[str] | None = None, examples: int = 6, device: str = "auto",
                quiet: bool = False, resamples: int = DEFAULT_RESAMPLES, interval_level: float = DEFAULT_LEVEL,
                bootstrap_seed: int = DEFAULT_SEED, self_checks: bool = True) -> RunMetrics:
    """Measure every snapshot of the run against the first one and write RUN/metrics/.

    layers: layers with per-channel measures (all their channels); `channels` names the
    rendered ones, whose renders (`renders`, (layer, epoch, channel) -> image file, e.g.
    a TimelineResult's tiles) give visual drift and cross-activation, and which get
    dataset examples (top `examples` probe images). overview: layers with layer-level
    measures (default: one per stage, see `overview_layers`). Probe statistics are
    cached in RUN/metrics/cache under each snapshot's checksum and the settings. CKA and the
    correlation get percentile bootstrap intervals at `interval_level` over `resamples`
    resamples of the probe images (seeded by `bootstrap_seed`; 0 resamples: no intervals).
    floor_renders: (layer, channel) -> a second render of the reference snapshot's channel, with
    the settings of its render in `renders` but another seed (`floors.floor_seed`): they give
    each layer's render-noise floor (`floors.noise_floor`), written beside drift and B on A.
    self_checks: check every render against the probe images (metrics/checks.py; checks.csv).

    Writes layers.csv, channels.csv, examples.json, checks.csv and summary.json.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    readable, missing = readable_snapshots(run_dir)
    first = readable[0]
    setup = measuring(run_dir, open_network(first.path), first.epoch, layers, channels, renders=renders, probe=probe,
                    probe_limit=probe_limit, image_size=image_size, overview=overview, examples=examples,
                    device=device, quiet=quiet)
    boot = probe_bootstrap(len(setup.paths), PROBE_BATCH, resamples=resamples, level=interval_level,
                           seed=bootstrap_seed)
    rows = MeasuredRows()
    refs: dict[tuple[str, int], ReferenceRender] = {}  # decoded and measured once, compared with every snapshot
    ref_stats = None
    bar = tqdm(readable, desc="metrics", unit="snapshot", disable=quiet, dynamic_ncols=True)
    for entry in bar:
        bar.set_postfix_str(f"epoch {entry.epoch}")
        try:
            net = setup.ref if entry.epoch == setup.ref_epoch else open_network(entry.path)
        except FeatureshiftError as e:
            missing[entry.epoch] = str(e)
            continue
        stats = probe_stats(net.module, setup.all_layers, setup.paths, image_size=setup.image_size, meta=net.meta,
                            cache_dir=setup.cache, device=device, quiet=quiet, desc=f"probe, epoch {entry.epoch}")
        if ref_stats is None:
            ref_stats = stats
        measure_snapshot(setup, entry.epoch, net, ref_stats, stats, refs, rows)
        add_intervals(setup, entry.epoch, ref_stats, stats, boot, rows)
        add_example_retention(setup, entry.epoch, ref_stats, stats, boot, rows)
        if self_checks:
            start = time.perf_counter()
            rows.checks += check_tiles(net.module, entry.epoch, net is setup.ref, setup.renders, setup.layers, stats,
                                       rows.channels)
            rows.check_seconds += time.perf_counter() - start
        if net is not setup.ref:
            del net  # before the next snapshot loads: one network in memory beside the reference
    bar.close()
    result = metrics_of(setup, rows, missing)
    result.floors = measure_floors(setup, floor_renders or {}, refs)
    add_floors(result.floors, rows.channels)
    result.intervals = IntervalSettings(boot.resamples, boot.level, boot.seed, rows.interval_seconds)
    if self_checks:
        result.checks, result.check_seconds = rows.checks, rows.check_seconds
    write_run_metrics(run_dir / "metrics", result)
    return result


def readable_snapshots(run_dir: Path) -> tuple[list[State], dict[int, str]]:
    """The run's snapshots whose metadata can be read, and epoch -> why for the others; a
    FeatureshiftError when none can be read."""
    from ..run import list_snapshots

    rows = [read_snapshot_state(epoch, path) for epoch, path in list_snapshots(run_dir)]
    readable = [r for r in rows if r.meta is not None]
    if not readable:
        raise FeatureshiftError(f"None of the snapshots in {run_dir / 'snapshots'} can be read; "
                                "train the run again or restore its snapshots.")
    return readable, {r.epoch: r.error for r in rows if r.meta is None}


@dataclasses.dataclass
class Measuring:
    """What every snapshot of a run is measured with: the reference network and the choices made once."""
    run_dir: Path
    ref: Network  # the reference snapshot (the first readable one)
    ref_epoch: int
    layers: list[str]  # with channel-level measures
    all_layers: list[str]  # with layer-level measures, in network order
    channels: dict[str, list[int]]  # layer -> the rendered channels
    renders: dict[tuple[str, int, int], Path]
    paths: list[Path]  # the probe images
    image_size: int
    cache: Path
    receptive_field: dict[str, int]
    examples: int
    device: str


@dataclasses.dataclass
class MeasuredRows:
    """What the snapshots measured so far gave: the rows of layers.csv and channels.csv, the examples."""
    layers: list[dict] = dataclasses.field(default_factory=list)
    channels: list[dict] = dataclasses.field(default_factory=list)
    examples: dict[tuple[str, int, int], list] = dataclasses.field(default_factory=dict)
    shifts: dict[tuple[str, int, int], ExampleShifts] = dataclasses.field(default_factory=dict)
    interval_seconds: float = 0.0  # spent on the bootstrap intervals
    checks: list[TileCheck] = dataclasses.field(default_factory=list)
    check_seconds: float = 0.0  # spent on the self-checks


def measuring(run_dir: Path, ref: Network, ref_epoch: int, layers: Sequence[str],
              channels: dict[str, Sequence[int]] | None, *, renders, probe, probe_limit: int | None,
              image_size: int | None, overview: Sequence[str] | None, examples: int, device: str,
              quiet: bool) -> Measuring:
    """Check the layers against the reference network REF and decide once what every snapshot is measured on."""
    model = ref.module
    layers = [l for l in dict.fromkeys(layers) if l != "logits"]
    for l in layers:
        layer_info(model, l)  # an unknown layer fails here, naming the closest ones
    overview = list(overview) if overview is not None else overview_layers(model)
    all_layers = sorted(dict.fromkeys([*overview, *layers]), key=lambda l: layer_info(model, l).first)
    image_size = image_size or trained_image_size(run_dir) or ref.meta.info.input_size
    return Measuring(
        run_dir=run_dir, ref=ref, ref_epoch=ref_epoch, layers=layers, all_layers=all_layers,
        channels={l: list((channels or {}).get(l, [])) for l in layers}, renders=renders or {},
        paths=resolve_probe(run_dir, probe, probe_limit), image_size=image_size, cache=run_dir / "metrics" / "cache",
        receptive_field={l: receptive_field(model, l, image_size) for l in layers}, examples=examples, device=device)


def measure_snapshot(setup: Measuring, epoch: int, net: Network, ref_stats, stats,
                     refs: dict[tuple[str, int], ReferenceRender], rows: MeasuredRows) -> None:
    """Add to ROWS the measures of the snapshot NET (of EPOCH, probe statistics STATS) against the reference."""
    ref, model = setup.ref.module, net.module
    wc = weight_change(ref, model, setup.all_layers)
    batches = _batches(setup.paths, setup.ref.meta.info, setup.image_size, setup.device, ref, model)
    fc = cached_function_change(
        ref, model, setup.all_layers, batches,
        checksums=(network_checksum(ref, setup.ref.meta.checksum),
                   network_checksum(model, net.meta.checksum if net.meta is not None else None)),
        probe=(setup.paths, setup.image_size), cache_dir=setup.cache)
    for l in setup.all_layers:
        rows.layers.append({"epoch": epoch, "layer": l, "weight_change": wc[l].value,
                            "function_change": fc[l], "cka": cka(ref_stats, stats, l)})
    for l in setup.layers:
        corr = channel_correlation(ref_stats, stats, l)
        dead = dead_channels(stats.layers[l].peak)
        per = {c: {"drift": np.nan, "cross_b_on_a": np.nan, "cross_a_on_b": np.nan} for c in range(len(corr))}
        per.update(render_measures(setup, l, epoch, model, refs))
        for c in range(len(corr)):
            rows.channels.append({"epoch": epoch, "layer": l, "channel": c,
                                  "weight_change": wc[l].channels[c], "correlation": corr[c], **per[c],
                                  "dead": int(dead[c])})
        for c in setup.channels[l]:
            rows.examples[(l, c, epoch)] = find_examples(stats.layers[l], c, setup.examples, setup.paths,
                                                         setup.image_size, setup.receptive_field[l])
            if epoch != setup.ref_epoch:
                rows.shifts[(l, c, epoch)] = shifted_examples(ref_stats.layers[l], stats.layers[l], c, setup.examples,
                                                              setup.paths, setup.image_size, setup.receptive_field[l])


def add_intervals(setup: Measuring, epoch: int, ref_stats, stats, boot: Bootstrap, rows: MeasuredRows) -> None:
    """Add the bootstrap intervals of CKA and of each channel's correlation to the rows of EPOCH
    that `measure_snapshot` wrote, from the probe statistics alone (no second probe pass)."""
    start = time.perf_counter()
    for r in rows.layers:
        if r["epoch"] == epoch:
            iv = cka_interval(ref_stats.layers[r["layer"]].grams, stats.layers[r["layer"]].grams, boot)
            r["cka_low"], r["cka_high"] = iv.low, iv.high
    for l in setup.layers:
        iv = correlation_interval(ref_stats.layers[l].pooled, stats.layers[l].pooled, boot)
        for r in rows.channels:
            if r["epoch"] == epoch and r["layer"] == l:
                r["correlation_low"], r["correlation_high"] = float(iv.low[r["channel"]]), float(iv.high[r["channel"]])
    rows.interval_seconds += time.perf_counter() - start


def add_example_retention(setup: Measuring, epoch: int, ref_stats, stats, boot: Bootstrap,
                          rows: MeasuredRows) -> None:
    """Add each channel's example retention and its bootstrap interval to the rows of EPOCH that
    `measure_snapshot` wrote (from the probe statistics' peaks; the time counts as the intervals')."""
    start = time.perf_counter()
    for l in setup.layers:
        a, b = ref_stats.layers[l].peak, stats.layers[l].peak
        value, iv = example_retention(a, b), retention_interval(a, b, boot)
        for r in rows.channels:
            if r["epoch"] == epoch and r["layer"] == l:
                c = r["channel"]
                r.update(example_retention=float(value[c]), example_retention_low=float(iv.low[c]),
                         example_retention_high=float(iv.high[c]))
    rows.interval_seconds += time.perf_counter() - start


def render_measures(setup: Measuring, layer: str, epoch: int, model: nn.Module,
                    refs: dict[tuple[str, int], ReferenceRender]) -> dict[int, dict[str, float]]:
    """Visual drift and cross-activation of the channels of LAYER rendered at both the reference
    and EPOCH: channel -> {"drift", "cross_b_on_a", "cross_a_on_b"}. REFS keeps the reference's
    renders decoded and measured across calls."""
    renders, ref_epoch = setup.renders, setup.ref_epoch
    have = [c for c in setup.channels[layer] if (layer, ref_epoch, c) in renders and (layer, epoch, c) in renders]
    if not have:
        return {}
    fresh = [c for c in have if (layer, c) not in refs]
    refs.update(reference_renders(setup.ref.module, layer, fresh, [renders[(layer, ref_epoch, c)] for c in fresh]))
    ra = [refs[(layer, c)].image for c in have]
    rb = [read_image(renders[(layer, epoch, c)]) for c in have]
    # The very same tile (same weights, same settings) has drift 0 by definition; the judge
    # network would take as long on it as on a changed one, and an atlas has hundreds.
    same = [renders[(layer, ref_epoch, c)] == renders[(layer, epoch, c)] for c in have]
    drift = [0.0] * len(have)
    todo = [i for i, s in enumerate(same) if not s]
    if todo:
        da = [np.stack(rows) for rows in zip(*(refs[(layer, have[i])].descriptors for i in todo))]
        for i, d in zip(todo, visual_drift_from(da, [ra[i] for i in todo], [rb[i] for i in todo])):
            drift[i] = d
    b_on_a, a_on_b = cross_activation(setup.ref.module, model, [(layer, c) for c in have], ra, rb,
                                      own_a=[refs[(layer, c)].own for c in have])
    return {c: {"drift": drift[i], "cross_b_on_a": b_on_a[i], "cross_a_on_b": a_on_b[i]} for i, c in enumerate(have)}


def measure_floors(setup: Measuring, floor_renders: dict[tuple[str, int], Path],
                   refs: dict[tuple[str, int], ReferenceRender]) -> dict[str, NoiseFloor]:
    """Each channel layer's render-noise floor, from the reference renders and FLOOR_RENDERS."""
    floors = {}
    for layer in setup.layers:
        channels = [c for c in setup.channels[layer]
                    if (layer, c) in floor_renders and (layer, setup.ref_epoch, c) in setup.renders]
        if not channels:
            continue
        first = {c: refs[(layer, c)].image if (layer, c) in refs else
                 read_image(setup.renders[(layer, setup.ref_epoch, c)]) for c in channels}
        floors[layer] = noise_floor(setup.ref.module, layer, first,
                                    {c: read_image(floor_renders[(layer, c)]) for c in channels})
    return floors


def add_floors(floors: dict[str, NoiseFloor], rows: list[dict]) -> None:
    """Write each layer's floors on its channel rows, so that a reader of channels.csv sees them
    beside the measures (and metrics.adaptation.layer_fates finds the kept floor there)."""
    for r in rows:
        floor = floors.get(r["layer"])
        if floor is not None:
            r["drift_floor"], r["kept_floor"] = floor.drift, floor.kept


def metrics_of(setup: Measuring, rows: MeasuredRows, missing: dict[int, str]) -> RunMetrics:
    """The RunMetrics of the measured ROWS, with what the reference network says of each layer."""
    ref = setup.ref.module
    return RunMetrics(
        run_dir=setup.run_dir, epochs=sorted({r["epoch"] for r in rows.layers}), reference=setup.ref_epoch,
        layers=setup.all_layers, channels=setup.channels, layer_rows=rows.layers, channel_rows=rows.channels,
        probe=setup.paths, image_size=setup.image_size, examples=rows.examples, receptive_field=setup.receptive_field,
        layer_info={l: layer_info(ref, l) for l in setup.all_layers},
        sources={l: [s.module for s in channel_sources(ref, l)] for l in setup.all_layers},
        parameters={l: parameter_modules(ref, l) for l in setup.all_layers},
        head=classifier_head(ref), missing=missing, shifts=rows.shifts)


def parameter_modules(model: nn.Module, layer: str) -> list[str]:
    """The modules inside LAYER (itself included) that hold parameters: empty for a ReLU, a pooling
    or a dropout layer, whose change measures only pass on those of the layers before it."""
    root = model.get_submodule(layer)
    prefix = f"{layer}." if layer else ""
    return [prefix + n if n else layer for n, m in root.named_modules()
            if any(True for _ in m.parameters(recurse=False))]


def classifier_head(model: nn.Module) -> list[str]:
    """The modules of MODEL's final classifier (and auxiliary classifiers); empty where it has none."""
    try:
        return [n for n, _ in head_modules(model)]
    except FeatureshiftError:
        return []


def _batches(paths, info, image_size: int, device: str, *models: nn.Module):
    """The probe images in batches, on the device the models are moved to."""
    import torch

    from ..device import resolve_device

    dev = resolve_device(str(device))
    for m in models:
        m.to(dev)
    with torch.no_grad():
        for x in probe_loader(paths, info, image_size):
            yield x.to(dev)


@dataclasses.dataclass
class ReferenceRender:
    """A channel's render at the reference snapshot, with what every comparison needs of it."""
    image: np.ndarray
    descriptors: list[np.ndarray]  # one row per judge layer (texture_descriptors)
    own: float  # the reference network's channel activation on it


def reference_renders(model, layer: str, channels: Sequence[int], paths) -> dict[tuple[str, int], ReferenceRender]:
    """Decode and measure the reference snapshot's renders of CHANNELS of LAYER once."""
    if not channels:
        return {}
    images = [read_image(p) for p in paths]
    desc = texture_descriptors(images)
    own = channel_activation(model, [(layer, c) for c in channels], images)
    return {(layer, c): ReferenceRender(images[i], [d[i] for d in desc], float(own[i]))
            for i, c in enumerate(channels)}


def write_run_metrics(out_dir: Path, m: RunMetrics) -> None:
    """Write `m` as layers.csv, channels.csv, examples.json and summary.json in `out_dir`; sets m.files."""
    files = {"layers": out_dir / "layers.csv", "channels": out_dir / "channels.csv",
             "examples": out_dir / "examples.json", "summary": out_dir / "summary.json"}
    _write_csv(files["layers"], m.layer_rows, ("epoch", "layer", *LAYER_COLUMNS, *LAYER_INTERVALS))
    _write_csv(files["channels"], m.channel_rows,
               ("epoch", "layer", "channel", *CHANNEL_COLUMNS, "dead", *CHANNEL_INTERVALS, *CHANNEL_FLOORS,
                *EXAMPLE_COLUMNS))
    write_json(files["examples"], {
        "probe": [str(p) for p in m.probe], "image_size": m.image_size,
        "about": "per layer, channel and epoch: the probe images that activate the channel most (spatial "
                 "maximum), as [probe index, activation, crop box x0, y0, x1, y1 in the resized image]",
        "layers": {l: {"receptive_field": m.receptive_field[l], "channels": {
            str(c): {str(e): [[x.index, round(x.value, 6), *x.box] for x in m.examples[(l, c, e)]]
                     for e in m.epochs if (l, c, e) in m.examples} for c in m.channels[l]}} for l in m.channels},
        **shift_record(m),
    })
    write_json(files["summary"], {
        "metrics_version": METRICS_VERSION, "reference_epoch": m.reference, "epochs": m.epochs,
        "layers": m.layers, "channel_layers": {l: m.channels[l] for l in m.channels},
        "probe_images": len(m.probe), "image_size": m.image_size, "probe_batch": PROBE_BATCH,
        "unreadable_snapshots": {str(k): v for k, v in m.missing.items()},
        "weight_sources": m.sources, "layer_parameters": m.parameters, "head": m.head,
        "intervals": interval_summary(m),
        "floors": floor_summary(m),
        "example_retention": retention_summary(m),
        "self_checks": {} if m.checks is None else summarize(m.checks, m.check_seconds),
        "definitions": "docs/metrics.md",
    })
    if m.checks is not None:
        files["checks"] = out_dir / "checks.csv"
        _write_csv(files["checks"], [t.row() for t in m.checks], ("layer", "epoch", "channel", *CHECK_COLUMNS))
    else:  # an earlier run's checks would read as this one's
        (out_dir / "checks.csv").unlink(missing_ok=True)
    m.files = files


def interval_summary(m: RunMetrics) -> dict:
    """summary.json's account of the bootstrap intervals: settings, cost, and CKA's per layer and epoch."""
    iv = m.intervals
    if iv is None:
        return {}
    return {"method": "percentile bootstrap over the probe images, each CKA minibatch resampled on its own",
            "resamples": iv.resamples, "level": iv.level, "seed": iv.seed, "seconds": round(iv.seconds, 3),
            "cka": {l: {str(r["epoch"]): [_nan_to_none(r.get("cka_low")), _nan_to_none(r.get("cka_high"))]
                        for r in m.layer_rows if r["layer"] == l} for l in m.layers}}


def floor_summary(m: RunMetrics) -> dict:
    """summary.json's account of the render-noise floors: how they were made, what measuring them
    cost, and per layer the floors and each sampled channel's seed-to-seed drift and kept scores."""
    if not m.floors:
        return {}
    return {"method": f"second render of the reference snapshot, seed + {SEED_OFFSET}; drift floor: the "
                      f"{FLOOR_PERCENTILE:g}th percentile of the seed-to-seed drifts, kept floor: the "
                      f"{100 - FLOOR_PERCENTILE:g}th percentile of the seed-to-seed kept scores (both ways)",
            "seconds": round(sum(f.seconds for f in m.floors.values()), 3),
            "layers": {l: f.to_record() for l, f in m.floors.items()}}


def shift_record(m: RunMetrics) -> dict:
    """examples.json's account of the images whose activation rose and fell most (a key of its own,
    beside "layers", which earlier readers go by)."""
    def row(x):
        return [x.index, round(x.before, 6), round(x.after, 6), *x.box]

    return {"shifts_about": "per layer, channel and later epoch: the probe images on which the channel's largest "
                            "activation rose most (rose) and fell most (fell) since the reference epoch, as [probe "
                            "index, activation at the reference, activation at the epoch, crop box x0, y0, x1, y1]",
            "shifts": {l: {str(c): {str(e): {"rose": [row(x) for x in m.shifts[(l, c, e)].rose],
                                              "fell": [row(x) for x in m.shifts[(l, c, e)].fell]}
                                     for e in m.epochs if (l, c, e) in m.shifts} for c in m.channels[l]}
                       for l in m.channels}}


def retention_summary(m: RunMetrics) -> dict:
    """summary.json's account of the example retention: its top share and, per layer, rendered
    channel and epoch, [value, interval low, interval high] (every channel's: channels.csv)."""
    rendered = {(l, c) for l in m.channels for c in m.channels[l]}
    out: dict = {"top_share": TOP_SHARE, "level": m.intervals.level if m.intervals else None, "layers": {}}
    for r in m.channel_rows:
        if (r["layer"], r["channel"]) in rendered and "example_retention" in r:
            out["layers"].setdefault(r["layer"], {}).setdefault(str(r["channel"]), {})[str(r["epoch"])] = [
                _nan_to_none(r[k]) for k in EXAMPLE_COLUMNS]
    return out


def _nan_to_none(v):
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    return v


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if _nan_to_none(r.get(k)) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in columns})
    write_text(path, buf.getvalue())
