"""`featureshift atlas`: every channel of some layers, rendered at chosen snapshots of a run.

The tiles go into the run's tile cache, the same one timelines and the report use, so an
atlas after a timeline reuses its tiles and a rerun renders only what is missing. The
jobs run through an executor (this machine by default, a Ray cluster when asked). Before
rendering, the atlas says how many tiles it will render and about how long that takes,
from a short timed render on this machine. What was atlased is recorded in RUN/atlas.json,
which the report reads to show every channel.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import FeatureshiftError
from ..io import WriteError, is_write_error, write_error
from ..optvis.maco import for_run
from ..optvis.objectives import LOGITS
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..run import timestamp

if TYPE_CHECKING:
    from ..jobs.cache import TileCache
    from ..jobs.executors import JobReport
    from ..jobs.floors import FloorPlan
    from ..jobs.plan import JobPlan, TileJob

ATLAS_FILE = "atlas.json"
ATLAS_FORMAT = "featureshift.atlas/1"
DEFAULT_SNAPSHOTS = "first,last"
# The timed renders behind the estimate: a few steps of a small batch per layer.
PROBE_STEPS = 6
PROBE_BATCH = 64


@dataclasses.dataclass
class AtlasResult:
    """What `atlas` planned and did."""

    run_dir: Path
    layers: list[str]
    channels: dict[str, list[int]]  # layer -> its atlased channels
    epochs: list[int]  # the atlased snapshots, in training order
    settings: RenderSettings
    tiles: dict[tuple[str, int, int], Path]  # (layer, epoch, channel) -> cached tile (those that exist)
    planned: int  # tiles to render when the atlas started
    cached: int  # tiles found in the cache
    estimate_s: float | None  # the estimated rendering time (None when nothing is to render, or quiet)
    executor: str = "local"
    rendered: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    record: Path | None = None  # RUN/atlas.json (None after a dry run)
    missing: dict[int, str] = dataclasses.field(default_factory=dict)  # epoch -> why its snapshot is unusable
    failed: dict[tuple[str, int, int], str] = dataclasses.field(default_factory=dict)
    no_response: set[tuple[str, int, int]] = dataclasses.field(default_factory=set)
    floor_planned: int = 0  # second renders for the noise floors still to render (metrics.floors)
    floor_cached: int = 0
    floor_tiles: dict[tuple[str, int], Path] = dataclasses.field(default_factory=dict)  # (layer, channel) -> tile

    def plan_line(self) -> str:
        """The line printed before rendering: how many tiles and about how long."""
        total = sum(len(c) for c in self.channels.values()) * len(self.epochs)
        text = (f"atlas: {len(self.layers)} layer(s), {sum(len(c) for c in self.channels.values())} channel(s) x "
                f"{len(self.epochs)} snapshot(s) (epochs {_epochs(self.epochs)}) = {total} tiles: "
                f"{self.planned} to render, {self.cached} in the cache")
        if self.floor_planned or self.floor_cached:
            text += (f"; and {self.floor_planned + self.floor_cached} second renders of epoch {self.epochs[0]} for the "
                     f"noise floors, {self.floor_planned} to render (--no-floor leaves them out)")
        if self.planned or self.floor_planned:
            text += f"; about {format_duration(self.estimate_s)} on this machine ({self.executor})"
        return text

    def summary(self) -> str:
        if self.dry_run:
            return self.plan_line() + "\n(dry run: nothing rendered)"
        lines = [f"atlas: {self.rendered} tile(s) rendered, {self.cached} from the cache in "
                 f"{format_duration(self.seconds)}; recorded in {self.record}"]
        for (layer, epoch, c), why in sorted(self.failed.items()):
            lines.append(f"{layer} channel {c} at epoch {epoch} failed: {why}")
        if self.no_response:
            lines.append(f"{len(self.no_response)} tile(s) of channels that do not respond at all (no picture)")
        return "\n".join(lines)

    def unreadable(self) -> str | None:
        """One paragraph on the chosen snapshots that could not be read, naming each file and saying
        how to atlas it or leave it out; None when every chosen snapshot was used."""
        from .timeline import epochs_spec

        if not self.missing:
            return None
        n, them = len(self.missing), "them" if len(self.missing) != 1 else "it"
        kept = [e for e in self.epochs if e not in self.missing]
        whys = " ".join(why for _, why in sorted(self.missing.items()))  # each names its file
        leave = f"; to leave {them} out, give --snapshots {epochs_spec(kept)}" if kept else ""
        return (f"{n} snapshot{'s' * (n != 1)} could not be read, so the atlas leaves out epoch{'s' * (n != 1)} "
                f"{', '.join(map(str, sorted(self.missing)))}. {whys} To atlas {them}, restore the "
                f"file{'s' * (n != 1)} from a copy or train the run again{leave}.")


def _epochs(epochs: Sequence[int]) -> str:
    return ", ".join(map(str, epochs)) if len(epochs) <= 8 else f"{epochs[0]}, {epochs[1]}, …, {epochs[-1]}"


def format_duration(seconds: float | None) -> str:
    """A duration for people: "40 s", "3.5 min", "2.1 h"."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def atlas_snapshots(spec: str | Sequence[int], entries: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """The snapshots `spec` names: "first,last", "all", epochs and ranges ("0,5,10", "0-4"), or
    a list of epochs; "first" and "last" mix with epochs ("first,5,last")."""
    from ..run import select_snapshots

    if not entries:
        raise FeatureshiftError("The run has no snapshots.")
    if not isinstance(spec, str):
        return select_snapshots(entries, [int(e) for e in spec])
    parts = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if not parts:
        raise FeatureshiftError("--snapshots is empty; give first,last, all, or epochs such as 0,5,10.")
    if "all" in parts:
        return list(entries)
    named = {"first": entries[0][0], "last": entries[-1][0]}
    numbers = [p for p in parts if p not in named]
    wanted = {named[p] for p in parts if p in named}
    if numbers:
        wanted.update(e for e, _ in select_snapshots(entries, ",".join(numbers)))
    return [(e, p) for e, p in entries if e in wanted]


def read_atlas(run_dir: str | Path) -> dict[str, Any]:
    """RUN/atlas.json: {"layers": {layer: {"channels", "epochs", "settings", "describe", "tiles":
    {epoch: {channel: tile key}}}}}; an empty record when the run has no atlas (or an unreadable one)."""
    path = Path(run_dir) / ATLAS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"format": ATLAS_FORMAT, "layers": {}}
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        return {"format": ATLAS_FORMAT, "layers": {}}
    return data


def atlas_tiles(run_dir: str | Path, record: dict[str, Any] | None = None) -> dict[tuple[str, int, int], Path]:
    """(layer, epoch, channel) -> tile file of every atlased tile that is in the run's tile cache."""
    from ..jobs.cache import TileCache
    from ..run import tile_cache_dir

    record = read_atlas(run_dir) if record is None else record
    cache = TileCache(tile_cache_dir(run_dir))
    out = {}
    for layer, entry in record.get("layers", {}).items():
        for epoch, keys in (entry.get("tiles") or {}).items():
            for channel, key in keys.items():
                if key in cache:
                    out[(layer, int(epoch), int(channel))] = cache.path(key)
    return out


def _unwritten(e: OSError, cache: TileCache, keys: dict[tuple[str, int, int], str], then: str) -> WriteError:
    """A failed write E (a full disk) as one paragraph: how many tiles are saved, what THEN was not written."""
    done = len({key for key in keys.values() if key in cache})
    return write_error(e, f"{done} of {len(set(keys.values()))} tiles are saved in the tile cache {cache.root}; {then}",
                       "run the same command again: it renders only the missing tiles")


def _write_record(run_dir: Path, result: AtlasResult, keys: dict[tuple[str, int, int], str]) -> Path:
    from ..io import write_json

    record = read_atlas(run_dir)
    record["format"] = ATLAS_FORMAT
    fields = result.settings.to_record()
    same_pictures = result.settings.key_fields()
    for layer in result.layers:
        tiles: dict[str, dict[str, str]] = {}
        for (l, epoch, c), key in keys.items():
            if l == layer:
                tiles.setdefault(str(epoch), {})[str(c)] = key
        old = record["layers"].get(layer)
        epochs, channels = list(result.epochs), list(result.channels[layer])
        # The same pictures asked for again at more snapshots or channels: the atlas grows.
        # Other settings make other pictures, and the newer atlas replaces the older one.
        # (Compared by what decides the pictures: a record of an earlier version reads the same.)
        if isinstance(old, dict) and isinstance(old.get("settings"), dict) \
                and RenderSettings.from_record(old["settings"]).key_fields() == same_pictures:
            epochs = sorted(set(epochs) | {int(e) for e in old.get("epochs", [])})
            channels = sorted(set(channels) | {int(c) for c in old.get("channels", [])})
            merged = {e: dict(v) for e, v in (old.get("tiles") or {}).items()}
            for e, v in tiles.items():
                merged.setdefault(e, {}).update(v)
            tiles = merged
        record["layers"][layer] = {"channels": channels, "epochs": epochs, "settings": fields,
                                   "describe": result.settings.describe(), "tiles": tiles}
    record["updated"] = timestamp()
    path = run_dir / ATLAS_FILE
    write_json(path, record)
    return path


def estimate_seconds(model, counts: dict[str, int], settings: RenderSettings, *, device: str = "auto",
                     batch_size: int | None = None, calls: int = 1, loads: int = 0) -> float:
    """Seconds to render counts[layer] tiles of each layer with `settings` in `calls` batched
    render calls, from timed renders of a batch of each layer on this machine: 2 steps and
    PROBE_STEPS + 2 steps, whose difference is the cost of a step without the fixed cost of a
    call (setting up, the first forward pass). On a machine shared with other work the
    figure moves with the load."""
    from ..optvis.engine import render

    def timed(targets, steps):
        start = time.perf_counter()
        render(model, targets, settings=settings.replace(steps=steps), device=device, batch_size=batch_size,
               quiet=True)
        return time.perf_counter() - start

    total, fixed = 0.0, []
    b = max(1, min(PROBE_BATCH, batch_size or PROBE_BATCH))
    warmed = False
    for layer, n in counts.items():
        if n <= 0:
            continue
        targets = [(layer, c) for c in range(min(b, n))]
        if not warmed:  # kernels, allocator and caches start up once, in no figure
            timed(targets[:1], 1)
            warmed = True
        few = timed(targets, 2)
        more = timed(targets, PROBE_STEPS + 2)
        # A busy machine can make the longer render the quicker one: then the whole of it counts.
        per_step = (more - few) / PROBE_STEPS if more > few else more / (PROBE_STEPS + 2)
        fixed.append(max(few - 2 * per_step, 0.0))
        total += per_step / len(targets) * n * settings.steps
    # Reading and checking a snapshot: well under a second for the zoo's networks.
    return total + calls * (sum(fixed) / max(len(fixed), 1)) + 0.5 * loads


def _readable_rows(run_dir: Path, snapshots: str | Sequence[int]) -> tuple[list, list]:
    """The chosen snapshots as rows, and those of them that can be read (a FeatureshiftError if none)."""
    from ..run import list_snapshots
    from .timeline import read_rows

    rows = read_rows(atlas_snapshots(snapshots, list_snapshots(run_dir)))
    good = [r for r in rows if r.meta is not None]
    if not good:
        raise FeatureshiftError(f"None of the chosen snapshots in {run_dir / 'snapshots'} can be read "
                                f"({rows[0].error}). Train the run again or restore its snapshots.")
    return rows, good


def _atlased_channels(model, info, layer: str, channels: str | Sequence[int] | None) -> list[int]:
    """The channels of LAYER to atlas: those `channels` names, or all of them."""
    from ..models.layers import layer_info
    from ..selection import select_channels

    count = info.num_classes if layer == LOGITS else layer_info(model, layer).channels
    return select_channels(count, channels=channels, layer=layer) if channels is not None else list(range(count))


def _estimate(model, jobs: Sequence[TileJob], settings: RenderSettings, *, device: str,
              batch_size: int | None) -> float:
    """The time JOBS take on this machine (see estimate_seconds)."""
    todo: dict[str, int] = {}
    for job in jobs:
        for layer, _ in job.targets:
            todo[layer] = todo.get(layer, 0) + 1
    return estimate_seconds(model, todo, settings, device=device, batch_size=batch_size, calls=len(jobs),
                            loads=len({j.snapshot for j in jobs}))


def _plan_floors(reference, chosen: dict[str, list[int]], settings: RenderSettings, cache: TileCache,
                 wanted: bool) -> FloorPlan:
    """The second renders of the noise floors at the REFERENCE snapshot (none unless WANTED)."""
    from ..jobs.floors import FloorPlan, plan_floors
    from ..metrics.floors import floor_channels

    if not wanted:
        return FloorPlan([], {})
    wanted = {(layer, c): settings for layer, cs in chosen.items() for c in floor_channels([], cs)}
    return plan_floors(reference, wanted, cache)


def _render(plan: JobPlan, floors: FloorPlan, cache: TileCache, result: AtlasResult, *, ray: str | None,
            device: str, batch_size: int | None, quiet: bool) -> JobReport:
    """Render PLAN and then the floors' second renders on one executor (one Ray instance), none
    when everything is cached; the floors' tiles go into RESULT."""
    from ..jobs.executors import JobReport, make_executor, run_jobs
    from ..jobs.floors import render_floors

    report = JobReport(cached=plan.cached)
    if plan.jobs or floors.tiles:
        with make_executor(ray, device=device, batch_size=batch_size, quiet=quiet) as executor:
            report = run_jobs(plan.sized(executor.max_tiles), cache, executor, quiet=quiet, desc="atlas")
            report.executor = executor.describe()
            result.floor_tiles = render_floors(floors, cache, executor=executor, quiet=quiet)
    else:
        result.floor_tiles = floors.found(cache)
    return report


def _take_report(result: AtlasResult, report: JobReport, good: list, keys: dict[tuple[str, int, int], str]) -> None:
    """What the render found into RESULT: where it ran, failed and silent tiles, unusable snapshots."""
    if report.executor is not None:
        result.executor = report.executor
    result.rendered = report.rendered
    by_key: dict[str, list[tuple[str, int, int]]] = {}
    for where, key in keys.items():
        by_key.setdefault(key, []).append(where)
    for key, why in report.failed.items():
        for where in by_key.get(key, []):
            result.failed[where] = why
    for key in report.no_response:
        result.no_response.update(by_key.get(key, []))
    for path, why in report.unusable.items():
        for r in good:
            if r.path == Path(path):
                result.missing[r.epoch] = why


def atlas(run_dir: str | Path, layers: str | Sequence[str] = (), *, all_layers: bool = False,
          snapshots: str | Sequence[int] = DEFAULT_SNAPSHOTS, channels: str | Sequence[int] | None = None,
          settings: RenderSettings | None = None, device: str = "auto", batch_size: int | None = None,
          ray: str | None = None, dry_run: bool = False, force: bool = False, quiet: bool = False,
          floor: bool = True, **changes) -> AtlasResult:
    """Render every channel of `layers` (or, with `all_layers`, one layer per stage of the
    network) at the chosen `snapshots` of the run in `run_dir` into the run's tile cache.

    snapshots: "first,last" (default), "all", or epochs ("0,5,10", ranges "0-4", mixed with
    first/last). channels: a spec like "0-63" or a list, to atlas only those (default all).
    settings (a RenderSettings, default the engine's) with keyword `changes` to its fields
    (steps=64, size=64, ...) decide the pictures, as for `vis` and `timeline`; device,
    batch_size and ray (None: this machine; "auto": a Ray instance here; "HOST:PORT": a Ray
    cluster) only how they are computed. Tiles already in the cache are not rendered again
    (unless `force`). Before rendering, prints the number of tiles to render and an estimate of
    the time on stderr (unless `quiet`); `dry_run` returns that plan instead (`plan_line()`,
    `summary()`) and renders nothing. Records the atlas in RUN/atlas.json. Snapshots that
    cannot be read are left out and reported in `missing` (`unreadable()`: a paragraph).
    floor: also render up to `metrics.floors.FLOOR_CHANNELS` channels of each layer a second
    time at the first atlased snapshot, another seed, for the render-noise floors the report
    judges change by (`floor_tiles`; counted in the plan and the estimate).
    """
    from ..jobs.cache import TileCache
    from ..jobs.plan import TileRequest, plan_jobs
    from ..network import open_network
    from ..run import tile_cache_dir

    started = time.perf_counter()
    settings = for_run((settings or DEFAULT_SETTINGS).replace(**changes), run_dir)
    run_dir = Path(run_dir)
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if all_layers and names:
        raise FeatureshiftError("Give either layers (--layer) or --all-layers, not both.")
    if not all_layers and not names:
        raise FeatureshiftError("Name at least one layer (--layer), or use --all-layers; "
                                "`featureshift layers RUN/snapshots/epoch_000.safetensors` lists them.")
    rows, good = _readable_rows(run_dir, snapshots)
    net = open_network(good[0].path)
    model, meta = net.module, net.meta
    if all_layers:
        from ..metrics.driver import overview_layers

        names = overview_layers(model)
    chosen = {layer: _atlased_channels(model, meta.info, layer, channels) for layer in names}
    cache = TileCache(tile_cache_dir(run_dir))
    requests = [TileRequest(r.path, r.meta.checksum, layer, c, r.epoch)
                for r in good for layer in names for c in chosen[layer]]
    plan = plan_jobs(requests, cache, settings=settings, force=force)
    keys = {(q.layer, q.epoch, q.channel): k for q, k in plan.keys.items()}
    floors = _plan_floors(good[0], chosen, settings, cache, floor)
    result = AtlasResult(run_dir, names, chosen, [r.epoch for r in good], settings, {}, plan.tiles, plan.cached,
                         None, executor=f"Ray at {ray}" if ray else f"local, {device}", dry_run=dry_run)
    result.missing = {r.epoch: r.error for r in rows if r.error}
    result.floor_planned, result.floor_cached = floors.tiles, floors.cached
    if (plan.jobs or floors.tiles) and (dry_run or not quiet):  # the estimate is for people; it costs a few seconds
        result.estimate_s = _estimate(model, plan.jobs + [j for p in floors.plans for j in p.jobs], settings,
                                      device=device, batch_size=batch_size)
    del model
    if dry_run:  # the plan is the result: the caller prints it (`summary()`), once
        return result
    if not quiet:  # a progress line before a long render, beside the progress bar
        print(result.plan_line(), file=sys.stderr, flush=True)
    try:
        report = _render(plan, floors, cache, result, ray=ray, device=device, batch_size=batch_size, quiet=quiet)
    except OSError as e:
        if not is_write_error(e):
            raise
        raise _unwritten(e, cache, keys, f"{run_dir / ATLAS_FILE} was not updated") from e
    _take_report(result, report, good, keys)
    for where, key in keys.items():
        if key in cache:
            result.tiles[where] = cache.path(key)
    try:
        result.record = _write_record(run_dir, result, {w: k for w, k in keys.items() if w in result.tiles})
    except OSError as e:
        if not is_write_error(e):
            raise
        raise _unwritten(e, cache, keys, "the report does not show this atlas until atlas.json is written") from e
    result.seconds = time.perf_counter() - started
    return result
