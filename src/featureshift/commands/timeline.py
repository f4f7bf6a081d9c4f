"""The same channels rendered on every snapshot of a run (or every file of a folder of ONNX
files), stacked so that each row is one moment of training and each column one neuron.

Tiles live in the run's content-addressed tile cache (`featureshift.jobs.cache`), so a
rerun renders only what is new: the snapshots written since, the settings changed, or
what an interrupted run did not reach. The whole timeline is planned as one job list;
each snapshot is rendered with one batched call for all its missing tiles, while the
next snapshot loads in the background.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..errors import FeatureshiftError
from ..grid import NO_RESPONSE_LABEL, channel_label, make_grid, no_response_tile
from ..io import SIGNATURE_KEY, is_write_error, png_text, safe_name, save_image, save_merged, write_error
from ..jobs.cache import TileCache, read_tile, read_tile_about
from ..jobs.executors import JobReport, check_ray, render_tiles
from ..jobs.plan import TileRequest, plan_jobs
from ..optvis.maco import for_run
from ..optvis.objectives import LOGITS
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..run import TIMELINE_DIR, tile_cache_dir
from ..selection import DEFAULT_COLUMNS, select_channels
from ..states import ONNX, Preprocessing, State, list_states, read_snapshot_state

GIF_FRAME_MS = 600


@dataclasses.dataclass
class TimelineResult:
    run_dir: Path
    layers: list[str]
    channels: dict[str, list[int]]  # layer -> channels, the columns
    epochs: list[int]  # the rows, in training order (for a folder of ONNX files: positions, 0 first)
    merged: dict[str, Path]  # layer -> merged.png
    rows: dict[str, dict[int, Path]]  # layer -> epoch -> row image
    gifs: dict[str, dict[int, Path]]  # layer -> channel -> animated GIF across snapshots
    tiles: dict[tuple[str, int, int], Path]  # (layer, epoch, channel) -> cached tile
    rendered: int = 0  # tiles rendered by this call
    cached: int = 0  # tiles found in the cache
    missing: dict[int, str] = dataclasses.field(default_factory=dict)  # epoch -> why its snapshot was unusable
    # renders whose objective became NaN/Inf: their last good image is shown and cached
    failed: dict[tuple[str, int, int], str] = dataclasses.field(default_factory=dict)
    # (layer, epoch, channel) of tiles whose channel is zero for every input: drawn as "no response"
    no_response: set[tuple[str, int, int]] = dataclasses.field(default_factory=set)
    files: dict[int, str] = dataclasses.field(default_factory=dict)  # row -> file name, for a folder of ONNX files

    def summary(self) -> str:
        lines = [f"{len(self.epochs)} {'file' if self.files else 'snapshot'}(s) x "
                 f"{sum(len(c) for c in self.channels.values())} channel(s): "
                 f"{self.rendered} tile(s) rendered, {self.cached} from the cache"]
        for (layer, epoch, channel), why in self.failed.items():
            lines.append(f"{layer} channel {channel} at epoch {epoch} failed: {why}")
        silent: dict[tuple[str, int], list[int]] = {}
        for layer, epoch, channel in sorted(self.no_response):
            silent.setdefault((layer, channel), []).append(epoch)
        for (layer, channel), epochs in silent.items():
            lines.append(f"{layer} channel {channel}: {NO_RESPONSE_LABEL} (the channel is zero for every input) "
                         f"at epoch{'s' * (len(epochs) != 1)} {', '.join(map(str, epochs))}")
        for layer in self.layers:
            lines.append(f"{layer}: {self.merged[layer]}")
        return "\n".join(lines)

    def unreadable(self) -> str | None:
        """One paragraph on the snapshots (or ONNX files) that could not be used, naming each file and
        saying how to render its row or leave it out; None when every row was rendered."""
        if not self.missing:
            return None
        n, them = len(self.missing), "them" if len(self.missing) != 1 else "it"
        kept = [e for e in self.epochs if e not in self.missing]
        # A snapshot's error names its file; an ONNX importer's may not.
        whys = " ".join(f"{self.files[e]}: {why}" if e in self.files else why for e, why in sorted(self.missing.items()))
        fix = (f"replace the file{'s' * (n != 1)} or remove {them} from the folder" if self.files
               else f"restore the file{'s' * (n != 1)} from a copy or train the run again")
        leave = f"; to leave {them} out, give --snapshots {epochs_spec(kept)}" if kept else ""
        others = "; the other rows were rendered and written" if kept else ""
        return (f"{n} {'file' if self.files else 'snapshot'}{'s' * (n != 1)} could not be read, so the timeline "
                f"marks {'their rows' if n != 1 else 'its row'} missing{others}. {whys} To render {them}, "
                f"{fix}{leave}.")


def epochs_spec(epochs: Sequence[int]) -> str:
    """EPOCHS as --snapshots takes them, runs of consecutive epochs as ranges: "0,2-4,7"."""
    runs: list[list[int]] = []
    for e in sorted(set(epochs)):
        if runs and runs[-1][-1] == e - 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


# ---------------------------------------------------------------- planning

def read_rows(entries: list[tuple[int, Path]]) -> list[State]:
    """A row per (epoch, snapshot path), with the snapshot's metadata or the error reading it."""
    return [read_snapshot_state(epoch, path) for epoch, path in entries]


def _skeleton(row: State, real: bool = False):
    """The architecture of ROW without weights (meta device), names and shapes for free; REAL: the
    network itself, for an operator without a meta kernel. An ONNX file's is its converted graph,
    unchecked, either way."""
    from ..network import open_network

    device = "cpu" if real else "meta"
    return open_network(row.path, device=device, check=False, **(row.preprocessing or Preprocessing()).kwargs()).module


def _layer_channels(rows: list[State], layers: Sequence[str]) -> dict[str, int]:
    """Check that every snapshot has every layer and one architecture; channels per layer."""
    from ..models.layers import not_a_layer, trace_layers

    good = [r for r in rows if r.meta is not None]
    what = "files in this folder" if good[0].kind == ONNX else "snapshots in this run"
    groups: dict[tuple, list[State]] = {}
    for r in good:
        i = r.meta.info
        groups.setdefault((i.arch, i.num_classes, i.in_chans, i.img_size), []).append(r)
    skeletons = {g: _skeleton(rs[0]) for g, rs in groups.items()}
    # A layer present in some snapshots only is named first: it is the more specific problem.
    for layer in layers:
        if layer == LOGITS:
            continue
        lacking = [r for g, rs in groups.items() if layer not in dict(skeletons[g].named_modules()) for r in rs]
        if lacking and len(lacking) < len(good):
            names = ", ".join(f"{r.path.name} ({r.meta.info.arch})" for r in lacking[:5])
            raise FeatureshiftError(
                f"Layer '{layer}' is missing from {len(lacking)} of the {len(good)} snapshots: {names}. A timeline "
                "needs the same layer in every snapshot; choose the snapshots of one network with --snapshots.")
    if len({g[0] for g in groups}) > 1:
        desc = "; ".join(f"{arch}: {', '.join(r.path.name for r in rs[:4])}{' ...' if len(rs) > 4 else ''}"
                         for (arch, *_), rs in groups.items())
        raise FeatureshiftError(
            f"The {what} are of different architectures ({desc}). A timeline follows one network "
            "through training; choose the snapshots of one architecture with --snapshots.")
    key, first = next(iter(groups.items()))
    model = skeletons[key]
    size = first[0].meta.info.input_size
    try:
        infos = {l.name: l.channels for l in trace_layers(model, size)}
    except Exception:  # an op without a meta kernel: trace a real (random) copy instead
        model = _skeleton(first[0], real=True)
        infos = {l.name: l.channels for l in trace_layers(model, size)}
    out = {}
    for layer in layers:
        if layer == LOGITS:
            out[layer] = min(r.meta.info.num_classes for r in good)
        elif layer in infos:
            out[layer] = infos[layer]
        else:
            raise not_a_layer(model, layer, infos)
    return out


# ---------------------------------------------------------------- labels

def row_label(row: State) -> str:
    """The label left of a row: its epoch and validation accuracy; for an ONNX file its name, under
    the epoch its metadata records."""
    if row.kind == ONNX:
        epoch = row.meta.epoch if row.meta is not None else None
        text = row.path.stem if epoch is None else f"epoch {epoch}\n{row.path.stem}"
        return text + ("\nunreadable" if row.meta is None else "")
    text = f"epoch {row.epoch}"
    metrics = row.meta.metrics if row.meta is not None else {}
    acc = metrics.get("val_acc")
    if isinstance(acc, (int, float)):
        text += f"\nval {100 * acc:.1f}%" if acc <= 1 else f"\nval {acc:.1f}%"
    elif row.meta is None:
        text += "\nunreadable"
    return text


def _col_label(layer: str, channel: int, class_names: list[str] | None) -> str:
    return channel_label(layer, channel, class_names, prefix="ch ")


def _gif(path: Path, frames: list[Image.Image], signature: str) -> None:
    w = max(f.width for f in frames)
    h = max(f.height for f in frames)
    padded = []
    for f in frames:
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        canvas.paste(f, ((w - f.width) // 2, (h - f.height) // 2))
        # Fast octree: a median-cut palette costs more than all the rest of a cached rerun.
        padded.append(canvas.quantize(colors=256, method=Image.Quantize.FASTOCTREE))
    save_image(path, padded[0], save_all=True, append_images=padded[1:], duration=GIF_FRAME_MS, loop=0,
               comment=signature)


# ---------------------------------------------------------------- the timeline

def timeline(run_dir: str | Path, layers: str | Sequence[str], channels: int | str | Sequence[int] = DEFAULT_COLUMNS,
             *, snapshots: str | Sequence[int] | None = None, every: int | None = None,
             settings: RenderSettings | None = None, device: str = "auto", batch_size: int | None = None,
             force: bool = False, labels: bool = True, quiet: bool = False,
             on_tile: Callable[[str, int, int, Path], None] | None = None, ray: str | None = None,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None, input_size: int | None = None,
             **changes) -> TimelineResult:
    """Render `channels` of each of `layers` on every snapshot of the run in `run_dir`, or on every
    ONNX file in the folder `run_dir` (rows in natural order of the names: epoch2 before epoch10).

    `channels` is a count N (the first N channels, the `--columns` of the CLI), a spec
    like "0-4,17", or a list. `snapshots` ("0,1,5-10" or a list of epochs) or `every`
    (epochs that are multiples of N) choose the rows; for ONNX files the numbers are their
    positions (0 first). `mean`, `std` and `input_size`: the preprocessing of ONNX files that
    do not carry their own. `settings` (a RenderSettings, default
    the engine's) with keyword `changes` to its fields (steps=64, seed=1, ...) decide the
    pictures; `device` and `batch_size` only how they are computed.

    Writes RUN/timeline/<layer>/ with one row image per snapshot (`{epoch:03d}.png`, the
    position for an ONNX file),
    `merged.png` and one GIF per channel (`channel_{c:04d}.gif`). Tiles come from the
    cache unless `force`; `on_tile(layer, epoch, channel, path)` is called after each new
    tile is saved. A corrupt snapshot is reported in `result.missing` (`result.unreadable()`
    says it in a paragraph) and its row marked missing; the others are rendered. An interrupted
    call keeps every tile it finished.
    """
    settings = for_run((settings or DEFAULT_SETTINGS).replace(**changes), run_dir)
    check_ray(ray)
    run_dir = Path(run_dir)
    layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not layers:
        raise FeatureshiftError("Name at least one layer (--layer); `featureshift layers MODEL` lists them.")
    rows = _usable_rows(run_dir, snapshots, every, Preprocessing.of(mean, std, input_size))
    counts = _layer_channels(rows, layers)
    columns = {layer: _choose_channels(layer, counts[layer], channels) for layer in layers}
    cache = TileCache(tile_cache_dir(run_dir))
    result = TimelineResult(run_dir, layers, columns, [r.epoch for r in rows], {}, {}, {}, {},
                            files={r.epoch: r.path.name for r in rows if r.kind == ONNX})
    for r in rows:
        if r.error:
            result.missing[r.epoch] = r.error
    good = [r for r in rows if r.meta is not None]
    # One job list for the whole timeline: the tiles not in the cache, grouped by snapshot.
    requests = {(layer, r.epoch, c): TileRequest(r.path, r.checksum, layer, c, r.epoch, r.preprocessing)
                for r in good for layer in layers for c in columns[layer]}
    plan = plan_jobs(requests.values(), cache, settings=settings, force=force)
    keys = {where: plan.keys[req] for where, req in requests.items()}
    if not force:
        result.cached = sum(1 for key in keys.values() if key in cache)
    first: dict[str, tuple[str, int, int]] = {}  # key -> the (layer, epoch, channel) that asked for it first
    for where, key in keys.items():
        first.setdefault(key, where)
    tell = None if on_tile is None else lambda key, path: on_tile(*first[key], path)
    try:
        report = render_tiles(plan, cache, ray=ray, device=device, batch_size=batch_size, quiet=quiet,
                              on_tile=tell, desc="timeline")
    except OSError as e:
        if not is_write_error(e):
            raise
        done = len({key for key in keys.values() if key in cache})
        raise write_error(e, f"{done} of {len(set(keys.values()))} tiles are saved in the tile cache {cache.root}; "
                             "the rows, merged.png and GIFs were not updated",
                          "run the same command again: it renders only the missing tiles") from e
    _take_report(result, report, good, keys, cache)
    try:
        _write_outputs(rows, result, labels, settings)
    except OSError as e:
        if not is_write_error(e):
            raise
        raise write_error(e, f"All {len(result.tiles)} tiles are saved in the tile cache {cache.root}; some rows, "
                             f"merged images or GIFs in {run_dir / TIMELINE_DIR} were not updated",
                          "run the same command again: it renders nothing and writes the rest") from e
    return result


def _usable_rows(run_dir: Path, snapshots: str | Sequence[int] | None, every: int | None,
                 preprocessing: Preprocessing | None) -> list[State]:
    """The chosen rows of RUN_DIR; a FeatureshiftError when none of them can be read."""
    rows = list_states(run_dir, snapshots, every, preprocessing=preprocessing)
    if any(r.meta is not None for r in rows):
        return rows
    if rows[0].kind == ONNX:
        raise FeatureshiftError(f"None of the {len(rows)} ONNX file(s) in {run_dir} can be used ({rows[0].error})")
    raise FeatureshiftError(
        f"None of the {len(rows)} snapshot(s) in {run_dir / 'snapshots'} can be read ({rows[0].error}). "
        "Train the run again or restore its snapshots.")


def _take_report(result: TimelineResult, report: JobReport, good: list[State],
                 keys: dict[tuple[str, int, int], str], cache: TileCache) -> None:
    """What the render found into RESULT: tiles, rows whose snapshot proved unusable, silent channels."""
    result.rendered = report.rendered
    epoch_of = {r.path: r for r in good}
    for path, why in report.unusable.items():
        row = epoch_of[Path(path)]
        result.missing[row.epoch] = row.error = why
    for (layer, epoch, c), key in keys.items():
        if key in cache:
            result.tiles[(layer, epoch, c)] = cache.path(key)
        if key in report.no_response:
            result.no_response.add((layer, epoch, c))


def _choose_channels(layer: str, count: int, channels: int | str | Sequence[int]) -> list[int]:
    """A count is the CLI's --columns, anything else its --channels."""
    unit = "classes" if layer == LOGITS else "channels"
    if isinstance(channels, int):
        return select_channels(count, columns=channels, layer=layer, unit=unit)
    return select_channels(count, channels=channels, layer=layer, unit=unit)


def _signature(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _stored_signature(path: Path) -> str | None:
    """The signature an earlier run wrote into `path` (PNG text or GIF comment), read without decoding."""
    try:
        with Image.open(path) as im:
            sig = im.info.get(SIGNATURE_KEY) or im.info.get("comment")
    except (OSError, ValueError):
        return None
    return sig.decode(errors="replace") if isinstance(sig, bytes) else sig


def timeline_title(run_name: str, layer: str, objective, snapshots: int) -> str:
    """The title above a merged timeline, a whole phrase: what is shown, of which layer, over what."""
    what = "classes" if layer == LOGITS else "channels"
    objective = objective if isinstance(objective, str) else repr(objective)
    return (f"{run_name}: {what} of {layer} over {snapshots} snapshot{'s' * (snapshots != 1)} "
            f"({objective} objective)")


def _write_outputs(rows: list[State], result: TimelineResult, labels: bool, settings: RenderSettings) -> None:
    """Rows, merged.png and GIFs of every layer. Each file carries a signature of its tiles and
    labels and is rewritten only when that changes, so a rerun after one new snapshot does not
    rewrite every row."""
    first = next(r for r in rows if r.meta is not None)
    class_names = first.meta.info.class_names
    row_labels = [row_label(r) if labels else None for r in rows]
    opened: dict[Path, Image.Image] = {}
    abouts: dict[Path, dict] = {}  # the metadata of the tiles decoded here: not read a second time below

    def tile(layer: str, epoch: int, c: int) -> Image.Image | None:
        path = result.tiles.get((layer, epoch, c))
        if path is None:
            return None
        if path not in opened:
            image, about = read_tile(path)
            abouts[path] = about
            if about.get("no_response") or (layer, epoch, c) in result.no_response:
                result.no_response.add((layer, epoch, c))
                # The starting noise is no picture of the channel: the tile says so instead.
                image = no_response_tile(image.width, image.height)
            opened[path] = image
        return opened[path]

    for layer in result.layers:
        out_dir = result.run_dir / TIMELINE_DIR / safe_name(layer)
        cols = result.channels[layer]
        col_labels = [_col_label(layer, c, class_names) for c in cols] if labels else None
        # Per row: the tile keys (None: missing), or None when the whole row is missing.
        keys: list[list[str | None] | None] = []
        for r in rows:
            found = [result.tiles.get((layer, r.epoch, c)) for c in cols]
            keys.append(None if r.error and not any(found) else [p.stem if p else None for p in found])
        result.rows[layer] = {}
        for i, r in enumerate(rows):
            if keys[i] is None:
                continue
            path = result.rows[layer][r.epoch] = out_dir / f"{r.epoch:03d}.png"
            sig = _signature(keys[i], row_labels[i], col_labels)
            if _stored_signature(path) != sig:
                image = make_grid([[tile(layer, r.epoch, c) for c in cols]],
                                  row_labels=[row_labels[i]] if labels else None, col_labels=col_labels)
                save_image(path, image, pnginfo=png_text(SIGNATURE_KEY, sig))

        result.merged[layer] = out_dir / "merged.png"
        title = timeline_title(result.run_dir.name, layer, settings.objective, len(rows)) if labels else None
        sig = _signature(keys, row_labels, col_labels, title)
        if _stored_signature(result.merged[layer]) != sig:
            grid = [[] if k is None else [tile(layer, r.epoch, c) for c in cols] for r, k in zip(rows, keys)]
            merged = make_grid(grid, row_labels=row_labels if labels else None, col_labels=col_labels, title=title)
            # A report rebuilt later reuses these settings (commands/report.existing_timelines), so
            # that it reads the cached tiles instead of rendering them again with other settings.
            save_merged(result.merged[layer], merged, signature=sig, kind="timeline", layer=layer,
                        epochs=result.epochs, channels=cols, settings=settings.to_record())

        result.gifs[layer] = {}
        present = [(r, k) for r, k in zip(rows, keys) if k is not None]
        for j, c in enumerate(cols):
            path = result.gifs[layer][c] = out_dir / f"channel_{c:04d}.gif"
            titles = [row_labels[rows.index(r)].replace("\n", "  ") if labels else None for r, _ in present]
            sig = _signature([k[j] for _, k in present], titles)
            if present and _stored_signature(path) != sig:
                frames = [make_grid([[tile(layer, r.epoch, c)]], title=t) for (r, _), t in zip(present, titles)]
                _gif(path, frames, sig)
    for key, path in result.tiles.items():
        about = abouts[path] if path in abouts else read_tile_about(path)
        if about.get("failed"):
            result.failed[key] = about["failed"]
        if about.get("no_response"):
            result.no_response.add(key)


# ---------------------------------------------------------------- `train --visualize`

class SnapshotVisualizer:
    """A train hook, `train(..., on_snapshot=SnapshotVisualizer(layers, channels, ...))`:
    renders each snapshot into the run's timeline as soon as it is written and keeps
    merged.png current. The run folder is the one the snapshots are written to.

    `channels`, `settings` (with keyword `changes` to its fields), `device` and
    `batch_size` mean what they mean for `timeline`. On a CPU the render runs in between
    epochs (the hook returns when it is done); on a GPU it runs in a worker thread while
    training goes on (`background` decides instead when given). The first snapshot is
    always rendered at once, so a wrong layer name stops training at epoch 0, not at the
    end. Requests that arrive while a render is running are folded into the next one,
    which renders whatever is missing: the cache makes that (and resuming a run)
    automatic. At the end of training call `finish(run_dir)` (or `close()` to only wait).
    """

    def __init__(self, layers: str | Sequence[str], channels: int | str | Sequence[int] = DEFAULT_COLUMNS, *,
                 settings: RenderSettings | None = None, device: str = "auto", batch_size: int | None = None,
                 quiet: bool = False, background: bool | None = None, run_dir: str | Path | None = None,
                 **changes):
        from ..device import resolve_device

        self.layers, self.channels = layers, channels
        self.settings = (settings or DEFAULT_SETTINGS).replace(**changes)
        self.device, self.batch_size, self.quiet = device, batch_size, quiet
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.background = resolve_device(device).type == "cuda" if background is None else background
        self.result: TimelineResult | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False

    def __call__(self, epoch: int, path: str | Path) -> None:
        """Render the snapshot of EPOCH, just written at PATH (and anything else still missing)."""
        if self.run_dir is None:
            self.run_dir = Path(path).parent.parent  # RUN/snapshots/NNN.safetensors
        if self.error is not None:
            self._raise()
        if not self.background or self.result is None:
            self._run()
            return
        self._wanted.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="featureshift-visualize", daemon=True)
            self._thread.start()

    def _timeline(self, run_dir: Path) -> TimelineResult:
        return timeline(run_dir, self.layers, self.channels, settings=self.settings, device=self.device,
                        batch_size=self.batch_size, quiet=self.quiet)

    def _run(self) -> None:
        with self._lock:
            self.result = self._timeline(self.run_dir)

    def _worker(self) -> None:
        while True:
            self._wanted.wait(timeout=0.5)
            if self._wanted.is_set():
                self._wanted.clear()
                try:
                    self._run()
                except BaseException as e:  # raised in the training thread, at its next call or close()
                    self.error = e
                    return
            elif self._closing:
                return

    def _raise(self) -> None:
        error, self.error = self.error, None
        raise error

    def close(self) -> TimelineResult | None:
        """Wait for the renders still running; re-raise an error they met. Returns the last result."""
        self._closing = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            self._raise()
        return self.result

    def finish(self, run_dir: str | Path) -> TimelineResult:
        """Wait for the last render, then render whatever is still missing in RUN_DIR with the same
        layers, channels and settings: a resumed run whose earlier snapshots were never
        visualized, or one that trained no new epoch. Returns the final timeline; its
        `missing` rows and `merged` paths are for the caller to report."""
        self.close()
        self.result = self._timeline(Path(run_dir))
        return self.result
