"""`featureshift report RUN`: the static HTML report of a training run, RUN/report/index.html.

What to render and measure is decided here: the layers and channels (the run's timelines and
atlases first), their timelines (`featureshift timeline` renders only what is missing), the
measures (`featureshift.run_metrics`) and each channel's top dataset example accentuated. The
pages are written by report/site.py into a scratch folder that is swapped in at the end, so an
interrupted build leaves the previous report intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..errors import FeatureshiftError
from ..io import WriteError, current_umask, is_write_error, write_error
from ..jobs.cache import read_tile_about, tile_settings
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..report.changes import ChannelChange
from ..report.site import REPORT_DIR, Accentuation, ReportInputs, write_site
from ..run import TIMELINE_DIR, tile_cache_dir
from ..selection import DEFAULT_COLUMNS
from ..states import State
from .atlas import atlas_tiles, read_atlas


# What the report takes from a timeline's settings: its own renders are Lucid renders of the
# channel objective, which the timeline decides the size, length, seed, rate and precision of.
REUSED_SETTINGS = ("steps", "size", "seed", "lr", "lr_hold", "lr_final", "param", "precision")


def existing_timelines(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Layers the run already has timelines of: layer -> {"channels": [...], "settings": RenderSettings | None}.

    The settings are those of a Lucid timeline as it recorded them in its merged.png (a timeline
    written before it recorded them: those of a Lucid tile of the layer in the cache), reduced to
    REUSED_SETTINGS, so the report reuses those renders instead of rendering the same channels
    again with other settings. Records of every earlier version are read (`RenderSettings.from_record`).
    """
    from PIL import Image

    from ..io import OUTPUT_TEXT_KEY

    root = run_dir / TIMELINE_DIR
    found: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return found
    for merged in sorted(root.glob("*/merged.png")):
        try:
            with Image.open(merged) as im:
                # .info: the text chunks before the pixels (.text would decode the whole image)
                about = json.loads(im.info.get(OUTPUT_TEXT_KEY, "{}"))
        except (OSError, ValueError):
            continue
        if about.get("kind") == "timeline" and about.get("layer") and about.get("channels"):
            recorded = about.get("settings")
            found[about["layer"]] = {"channels": [int(c) for c in about["channels"]],
                                     "settings": _reused(RenderSettings.from_record(recorded)) if recorded else None}
    # An atlas of the same layer shares the cache, maybe with other settings: the timeline's own
    # tiles are read first, the atlas's only when it has the same ones.
    atlased = {k for entry in read_atlas(run_dir)["layers"].values() for keys in (entry.get("tiles") or {}).values()
               for k in keys.values()}
    tiles = sorted(tile_cache_dir(run_dir).glob("*.png"), key=lambda p: (p.stem in atlased, -p.stat().st_mtime))
    for tile in tiles[:5000]:
        if all(v["settings"] is not None for v in found.values()):
            break
        try:
            about = read_tile_about(tile)
        except (OSError, ValueError):
            continue
        entry = found.get(about.get("layer"))
        # (timelines written before they recorded their settings; Lucid tiles of the channel objective
        # only: an accentuation or MACO tile of the layer has another learning rate)
        if entry is not None and entry["settings"] is None:
            tile_settings = RenderSettings.from_record(about)
            if tile_settings.objective == "channel":
                entry["settings"] = _reused(tile_settings)
    return found


def _reused(settings: RenderSettings) -> RenderSettings | None:
    """The defaults with SETTINGS' REUSED_SETTINGS, or None for the settings of another method."""
    if settings.method != "lucid":
        return None
    return DEFAULT_SETTINGS.replace(**{name: getattr(settings, name) for name in REUSED_SETTINGS})


def _default_layer(model) -> str:
    from ..metrics.driver import overview_layers

    # Two thirds of the way up the network, below the head: a layer that fine-tuning
    # usually changes visibly while its features are still recognizable.
    from ..models.layers import layer_info

    layers = [l for l in overview_layers(model) if not l.startswith(("classifier", "fc", "head"))
              and "Pool" not in layer_info(model, l).type]
    return layers[min(len(layers) - 1, (2 * len(layers)) // 3)]


# ---------------------------------------------------------------- the build

def build_report(run_dir: str | os.PathLike, layers: str | Sequence[str] | None = None,
                 channels: int | str | Sequence[int] | None = None, *, probe: str | os.PathLike | None = None,
                 probe_limit: int | None = 256, image_size: int | None = None, examples: int = 6,
                 settings: RenderSettings | None = None, device: str = "auto", batch_size: int | None = None,
                 open_browser: bool = False, quiet: bool = False, ray: str | None = None, accent: bool = True,
                 floor: bool = True, diff: bool = True, checks: bool = True, **changes) -> Path:
    """Write RUN/report/ and return the path of its index.html.

    layers: the layers to render and rank channel by channel (default: those the run has
    timelines of, else one layer two thirds up the network). channels: a count N (the
    first N), a spec like "0-4,17" or a list (default: the timeline's, else 5).
    settings: the RenderSettings of the renders (default: those of the run's existing
    timeline of the layer, so its cached renders are reused, else the engine's); keyword
    `changes` to its fields (steps=64, ...) apply on top, None keeping the value. probe:
    a folder of images for the representation measures and dataset examples (default:
    the run's validation images, at most `probe_limit`). examples: probe images per channel.
    accent: show on each channel page the channel's top dataset example accentuated at every
    snapshot (`accentuate_examples`, cached like the timeline's renders). diff: show on the channel
    pages of the timelines' and the most changed channels what each gained and lost from the
    first to the last snapshot (`render_changes`, cached likewise); the probe images whose
    activation rose and fell most are shown there either way. ray: where the timelines
    render (None: here; "auto" or a cluster address: on Ray). floor: render a sample of each layer's channels a second time at the reference snapshot
    (another seed) for the render-noise floors (`metrics.floors`): a channel is called changed
    only beyond them (False: no floors, every change is reported as measured). checks:
    self-check every rendered tile against the probe images (`metrics.checks`; badges).
    """
    from ..metrics.driver import run_metrics
    from ..run import list_snapshots, read_metrics, read_run

    if examples < 0:
        raise FeatureshiftError(f"--examples must be 0 or more, not {examples}.")
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    entries = list_snapshots(run_dir)
    if probe is not None and not Path(probe).is_dir():
        from ..metrics.probe import resolve_probe

        resolve_probe(run_dir, probe, probe_limit)  # the clear error, before any rendering
    first = first_readable_snapshot(run_dir, entries)
    choice = choose_layers(run_dir, layers, first)
    DEFAULT_SETTINGS.replace(**changes)  # an unknown setting fails now, before any work
    renders = render_timelines(run_dir, choice, channels, settings, changes, device=device, batch_size=batch_size,
                               quiet=quiet, ray=ray)
    atlas_settings = join_atlases(run_dir, choice, renders)
    out = run_dir / REPORT_DIR
    measured = [l for l in choice.layers if l != "logits"]
    accents: dict[tuple[str, int], Accentuation] = {}
    shown: dict[tuple[str, int], ChannelChange] = {}
    try:
        floor_tiles = render_report_floors(run_dir, first, renders, measured, device=device, batch_size=batch_size,
                                           quiet=quiet, ray=ray) if floor else {}
        m = run_metrics(run_dir, measured, {l: renders.chosen[l] for l in measured}, renders=renders.tiles,
                        floor_renders=floor_tiles, probe=probe, probe_limit=probe_limit, image_size=image_size,
                        examples=examples, device=device, quiet=quiet, self_checks=checks)
        if accent:
            # Only the timelines' channels: an accentuation is a render per snapshot, and an atlas of
            # hundreds of channels would multiply the report's cost (the demo's: 75 s -> 8 min).
            pages = {l: renders.timeline_channels.get(l, []) for l in m.channels}
            fallback = (settings or DEFAULT_SETTINGS).replace(**changes)
            accents = accentuate_examples(run_dir, m, pages, {l: renders.settings.get(l, fallback) for l in pages},
                                          device=device, batch_size=batch_size, quiet=quiet, ray=ray)
        facts = layer_facts(m, renders.tiles)
        shown = render_changes(run_dir, m, change_channels(m, renders, choice, facts), renders.tiles, render=diff,
                               device=device, batch_size=batch_size, quiet=quiet, ray=ray)
    except OSError as e:
        if not is_write_error(e):
            raise
        raise _unwritten_report(e, out) from e
    inputs = ReportInputs(run_dir=run_dir, run=run, rows=read_metrics(run_dir), meta=first.meta, metrics=m,
                          chosen=renders.chosen, merged=renders.merged, tiles=renders.tiles,
                          settings=renders.settings, atlas={l: choice.atlased[l] for l in choice.layers
                                                            if l in choice.atlased},
                          atlas_settings=atlas_settings, timeline_channels=renders.timeline_channels,
                          accents=accents, changes=shown, facts=facts)
    index = write_report(run_dir, inputs, quiet)
    if open_browser:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())
    return index


def first_readable_snapshot(run_dir: Path, entries: list[tuple[int, Path]]) -> State:
    """The first of the run's snapshots ENTRIES ((epoch, path), run.list_snapshots) whose metadata
    can be read (weights not loaded)."""
    from ..states import read_snapshot_state

    for epoch, path in entries:
        row = read_snapshot_state(epoch, path)
        if row.meta is not None:
            return row
    raise FeatureshiftError(f"None of the snapshots in {run_dir / 'snapshots'} can be read.")


@dataclasses.dataclass
class LayerChoice:
    """The layers a report shows, and what the run already has of them."""
    layers: list[str]
    existing: dict[str, dict[str, Any]]  # existing_timelines
    atlased: dict[str, dict[str, Any]]  # layer -> its RUN/atlas.json entry
    atlas_only: set[str]  # layers shown from their atlas's tiles, with no timeline to render


def choose_layers(run_dir: Path, layers: str | Sequence[str] | None, first: State) -> LayerChoice:
    """LAYERS as given, else those the run has timelines or atlases of, else one two thirds up the
    network of the FIRST snapshot."""
    from ..network import open_network

    existing = existing_timelines(run_dir)
    atlased = read_atlas(run_dir)["layers"]
    atlas_only: set[str] = set()
    if layers is None:
        atlas_only = {l for l in atlased if l not in existing}
        layers = list(dict.fromkeys([*existing, *atlased])) or [_default_layer(open_network(first.path).module)]
    layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not layers:
        raise FeatureshiftError("Name at least one layer (--layer); `featureshift layers MODEL` lists them.")
    return LayerChoice(layers, existing, atlased, atlas_only)


@dataclasses.dataclass
class ReportRenders:
    """The renders a report shows, layer by layer."""
    tiles: dict[tuple[str, int, int], Path] = dataclasses.field(default_factory=dict)  # (layer, epoch, channel)
    chosen: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # layer -> channels shown
    merged: dict[str, Path] = dataclasses.field(default_factory=dict)  # layer -> the timeline's merged.png
    settings: dict[str, RenderSettings] = dataclasses.field(default_factory=dict)  # layer -> its timeline's
    timeline_channels: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # layer -> its timeline's


def render_timelines(run_dir: Path, choice: LayerChoice, channels, settings: RenderSettings | None,
                     changes: dict[str, Any], *, device: str, batch_size: int | None, quiet: bool,
                     ray: str | None) -> ReportRenders:
    """A timeline of each chosen layer (cached tiles are only read), with the settings of the run's
    existing timeline of it unless SETTINGS are given, CHANGES on top."""
    from .timeline import timeline

    renders = ReportRenders()
    for layer in choice.layers:
        if layer in choice.atlas_only:
            continue
        prior = choice.existing.get(layer, {})
        base = settings or prior.get("settings") or DEFAULT_SETTINGS
        layer_settings = base.replace(**changes)
        cols = channels if channels is not None else (prior.get("channels") or DEFAULT_COLUMNS)
        tl = timeline(run_dir, [layer], cols, settings=layer_settings, device=device, batch_size=batch_size,
                      quiet=quiet, ray=ray)
        renders.tiles.update(tl.tiles)
        renders.chosen[layer] = tl.channels[layer]
        renders.merged[layer] = tl.merged[layer]
        renders.settings[layer] = layer_settings
    renders.timeline_channels = {l: list(c) for l, c in renders.chosen.items()}
    return renders


def join_atlases(run_dir: Path, choice: LayerChoice, renders: ReportRenders) -> dict[str, str]:
    """Add every atlased tile of the chosen layers to RENDERS (where a timeline has the same tile
    position, its render stays, so that each channel's renders share one set of settings); returns
    layer -> its atlas's settings, described."""
    atlas_settings: dict[str, str] = {}
    if not choice.atlased:
        return atlas_settings
    for where, path in atlas_tiles(run_dir).items():
        if where[0] in choice.layers:
            renders.tiles.setdefault(where, path)
    for layer, entry in choice.atlased.items():
        if layer in choice.layers:
            atlas_channels = {int(c) for c in entry.get("channels", [])}
            renders.chosen[layer] = sorted(set(renders.chosen.get(layer, [])) | atlas_channels)
            atlas_settings[layer] = str(entry.get("describe", ""))
    return atlas_settings


def render_report_floors(run_dir: Path, reference: State, renders: ReportRenders, layers: Sequence[str], *,
                         device: str, batch_size: int | None, quiet: bool,
                         ray: str | None) -> dict[tuple[str, int], Path]:
    """The second renders of the noise floors of LAYERS (`jobs.floors`): the timeline's channels and
    others of the layer's rendered channels (`metrics.floors.floor_channels`), each with the
    settings its reference tile was rendered with (read from the tile's header), so that a
    layer shown from a timeline and an atlas gets each channel's own settings."""
    from ..jobs.cache import TileCache
    from ..jobs.floors import plan_floors, render_floors
    from ..metrics.floors import floor_channels

    wanted = {}
    for layer in layers:
        for c in floor_channels(renders.timeline_channels.get(layer, []), renders.chosen.get(layer, [])):
            settings = tile_settings(renders.tiles.get((layer, reference.epoch, c)))
            if settings is not None:
                wanted[(layer, c)] = settings
    cache = TileCache(tile_cache_dir(run_dir))
    return render_floors(plan_floors(reference, wanted, cache), cache, ray=ray, device=device, batch_size=batch_size,
                         quiet=quiet)


def write_report(run_dir: Path, inputs: ReportInputs, quiet: bool) -> Path:
    """Write the pages into a scratch folder swapped in for RUN/report at the end, so that an
    interrupted build leaves the previous report intact; returns the new index.html."""
    out = run_dir / REPORT_DIR
    scratch = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
    os.chmod(scratch, 0o777 & ~current_umask())  # mkdtemp makes 0700: the report is for sharing
    try:
        write_site(scratch, inputs, quiet)
        old = None
        if out.exists():
            old = run_dir / f".report-old-{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(scratch, out)
        except OSError:
            if old is not None:  # the earlier report goes back: a failed build must not take it away
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if not is_write_error(e):
            raise
        # The file is named where it would have been: the scratch folder is gone after this.
        name = e.filename and os.fspath(e.filename).replace(os.fspath(scratch), os.fspath(out), 1)
        raise _unwritten_report(OSError(e.errno, e.strerror, name), out) from e
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return out / "index.html"


def _unwritten_report(e: OSError, out: Path) -> WriteError:
    """A failed write E (a full disk) of the report as one paragraph."""
    return write_error(e, f"The report {out} was not updated (an earlier report there is unchanged); finished renders "
                          "and probe statistics are kept in the run's caches",
                       "run the same command again: it computes only what is missing")


report = build_report  # the API name of `featureshift report`


def top_example(m, layer: str, channel: int):
    """The probe image the channel fires on most at the reference snapshot (where training
    starts, so that every later snapshot shows how it reads the same picture), else at the
    latest snapshot that has one; None when it fires on none."""
    for epoch in (m.reference, *reversed(m.epochs)):
        found = m.examples.get((layer, channel, epoch))
        if found:
            return epoch, found[0]
    return None


def accentuate_examples(run_dir: str | os.PathLike, m, channels: dict[str, Sequence[int]],
                        settings: dict[str, RenderSettings], *, device: str = "auto", batch_size: int | None = None,
                        quiet: bool = False, ray: str | None = None) -> dict[tuple[str, int], Accentuation]:
    """Accentuate each channel's top dataset example (`top_example` of the RunMetrics `m`) on
    every snapshot of `m.epochs`: `channels` layer -> channels, rendered with their layer's
    `settings` and method "accent" with the example as image. The tiles go through the job
    list into the timeline's tile cache, so a rebuilt report renders none of them again."""
    from ..jobs.cache import TileCache
    from ..jobs.executors import render_groups
    from ..jobs.plan import TileRequest, batch_photos
    from ..states import list_states

    run_dir = Path(run_dir)
    wanted = {}
    for layer, cs in channels.items():
        for c in cs:
            top = top_example(m, layer, c)
            if top is not None:
                epoch, ex = top
                # the layer's render settings, with accentuation's own learning rate and schedule
                s = dataclasses.replace(settings[layer], method="accent", image=str(ex.path), lr=None, lr_hold=None,
                                        lr_final=None)
                wanted[(layer, c)] = Accentuation(ex.path, epoch, ex.value, s, {})
    if not wanted:
        return {}
    states = [r for r in list_states(run_dir) if r.meta is not None and r.epoch in m.epochs]
    cache = TileCache(tile_cache_dir(run_dir))
    # A plan holds one set of settings and each example is its own: one group per (layer, example),
    # whose jobs batch_photos then puts together, one batch per snapshot.
    groups: dict[tuple[str, str], list[tuple[int, TileRequest]]] = {}
    for (layer, c), a in wanted.items():
        groups.setdefault((layer, str(a.example)), []).extend(
            (c, TileRequest(r.path, r.checksum, layer, c, r.epoch, r.preprocessing)) for r in states)
    planned = render_groups([(wanted[(layer, items[0][0])].settings, [req for _, req in items])
                             for (layer, _), items in groups.items()], cache, ray=ray, device=device,
                            batch_size=batch_size, quiet=quiet, desc="accentuate", combine=batch_photos)
    keys = {(layer, req.epoch, c): found[req]
            for ((layer, _), items), found in zip(groups.items(), planned) for c, req in items}
    for (layer, epoch, c), key in keys.items():
        if key in cache:
            wanted[(layer, c)].tiles[epoch] = cache.path(key)
    return wanted




def layer_facts(m, tiles: dict[tuple[str, int, int], Path]) -> dict[str, Any]:
    """metrics.answers.analyse_layer of every layer of the RunMetrics M with channel measures."""
    from ..metrics.answers import analyse_layer

    return {layer: analyse_layer(m, layer, tiles) for layer in m.channels}


# Channels per ranking of the overview's most changed ones that get gained and lost renders: the
# overview lists 12 per ranking, and rendering all of them (34 channels in the demo) nearly doubled
# the demo's report.
DIFF_MOST_CHANGED = 4


def change_channels(m, renders: ReportRenders, choice: LayerChoice, facts: dict[str, Any]) -> dict[str, list[int]]:
    """The channels whose pages show what they gained and lost: the timelines' channels and the
    DIFF_MOST_CHANGED first of each ranking of the atlases' most changed ones
    (`report.analysis.most_changed`, the overview's list)."""
    from ..report.analysis import most_changed

    out = {layer: list(renders.timeline_channels.get(layer, [])) for layer in m.channels}
    atlased = [layer for layer in m.channels if layer in choice.atlased]
    if atlased and len(m.epochs) > 1:
        for items in most_changed(m, atlased, renders.tiles, facts, count=DIFF_MOST_CHANGED).values():
            for it in items:
                out[it["layer"]].append(it["channel"])
    return {layer: list(dict.fromkeys(cs)) for layer, cs in out.items() if cs}


def render_changes(run_dir: str | os.PathLike, m, channels: dict[str, Sequence[int]],
                   tiles: dict[tuple[str, int, int], Path], *, render: bool = True, device: str = "auto",
                   batch_size: int | None = None, quiet: bool = False,
                   ray: str | None = None) -> dict[tuple[str, int], ChannelChange]:
    """What each of CHANNELS (layer -> channels) gained and lost from the reference snapshot of the
    RunMetrics M to its last: the objectives "gained" and "lost" (optvis/pair.py) on the pair of
    the two snapshots, with the settings of the channel's own render at the reference (TILES,
    (layer, epoch, channel) -> its cached tile). The tiles go through the job list into the run's
    tile cache, named by both snapshots' checksums (`jobs.plan.pair_source`), so a rebuilt report
    renders none of them again. render=False: the channels' entries without renders."""
    from ..jobs.cache import TileCache
    from ..jobs.executors import render_groups
    from ..jobs.plan import TileRequest, pair_source
    from ..states import list_states

    last = m.epochs[-1]
    wanted = [(layer, c) for layer, cs in channels.items() for c in cs if (layer, m.reference, c) in tiles]
    if last == m.reference or not wanted:
        return {}
    if not render:
        return {w: ChannelChange(None, None, None) for w in wanted}
    states = {r.epoch: r for r in list_states(run_dir) if r.meta is not None}
    before, after = states[m.reference], states[last]
    pair = pair_source(before.path, after.path, before.checksum, after.checksum)
    # One group per (settings, objective): a plan holds one set of settings.
    by_settings: dict[RenderSettings, list[tuple[str, int]]] = {}
    for layer, c in wanted:
        own = tile_settings(tiles[(layer, m.reference, c)])
        if own is None:
            continue  # a damaged tile: its page shows what it can without its settings
        by_settings.setdefault(own.replace(objective="gained"), []).append((layer, c))
    groups = [(settings.replace(objective=objective), [TileRequest(pair, pair.checksum, layer, c, last)
                                                        for layer, c in items])
              for settings, items in by_settings.items() for objective in ("gained", "lost")]
    cache = TileCache(tile_cache_dir(run_dir))
    planned = render_groups(groups, cache, ray=ray, device=device, batch_size=batch_size, quiet=quiet,
                            desc="gained and lost")

    def tile(key: str) -> Path | None:
        path = cache.path(key)
        return path if key in cache and not read_tile_about(path).get("failed") else None

    found = {(req.layer, req.channel, settings.objective): tile(keys[req])
             for (settings, requests), keys in zip(groups, planned) for req in requests}
    return {(layer, c): ChannelChange(settings, found[(layer, c, "gained")], found[(layer, c, "lost")])
            for settings, items in by_settings.items() for layer, c in items}
