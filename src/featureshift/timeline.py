"""The same channels rendered on every snapshot of a run, stacked so that each row is
one moment of training and each column one neuron.

Every tile is cached under a key of everything that decides its pixels (the snapshot's
weight checksum, layer, channel, objective and render settings, the engine version),
so a rerun renders only what is new: the snapshots written since, the settings
changed, or what an interrupted run did not reach. The whole timeline is planned as
one job list; each snapshot is rendered with one batched call for all its missing
tiles, while the next snapshot loads in the background.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, PngImagePlugin

from .errors import FeatureshiftError
from .grid import make_grid, to_pil
from .io import save_image
from .run import list_snapshots
from .snapshot import load_snapshot, read_meta

TIMELINE_DIR = "timeline"
CACHE_DIR = "cache"
TILE_TEXT_KEY = "featureshift-tile"
# PNG text chunk on every grid featureshift writes as a merge of other images, so that
# `merge` never stacks its own (or the timeline's) earlier output.
OUTPUT_TEXT_KEY = "featureshift-output"
SIGNATURE_KEY = "featureshift-signature"  # what a row/merged/GIF was drawn from: unchanged files are not rewritten
LOGITS = "logits"
GIF_FRAME_MS = 600


@dataclasses.dataclass
class TimelineResult:
    run_dir: Path
    layers: list[str]
    channels: dict[str, list[int]]  # layer -> channels, the columns
    epochs: list[int]  # the rows, in training order
    merged: dict[str, Path]  # layer -> merged.png
    rows: dict[str, dict[int, Path]]  # layer -> epoch -> row image
    gifs: dict[str, dict[int, Path]]  # layer -> channel -> animated GIF across snapshots
    tiles: dict[tuple[str, int, int], Path]  # (layer, epoch, channel) -> cached tile
    rendered: int = 0  # tiles rendered by this call
    cached: int = 0  # tiles found in the cache
    missing: dict[int, str] = dataclasses.field(default_factory=dict)  # epoch -> why its snapshot was unusable
    # renders whose objective became NaN/Inf: their last good image is shown and cached
    failed: dict[tuple[str, int, int], str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{len(self.epochs)} snapshot(s) x {sum(len(c) for c in self.channels.values())} channel(s): "
                 f"{self.rendered} tile(s) rendered, {self.cached} from the cache"]
        for epoch, why in self.missing.items():
            lines.append(f"epoch {epoch}: row marked missing: {why}")
        for (layer, epoch, channel), why in self.failed.items():
            lines.append(f"{layer} channel {channel} at epoch {epoch} failed: {why}")
        for layer in self.layers:
            lines.append(f"{layer}: {self.merged[layer]}")
        return "\n".join(lines)


# ---------------------------------------------------------------- argument parsing

def parse_indices(spec: str | int | Sequence[int], what: str = "index") -> list[int]:
    """'0,1,5-10' -> [0, 1, 5, 6, 7, 8, 9, 10]; order kept, duplicates dropped."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return list(dict.fromkeys(int(i) for i in spec))
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise FeatureshiftError(f"'{spec}' is not a valid {what} list: use numbers and ranges like 0,1,5-10.")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise FeatureshiftError(f"The range '{part}' in '{spec}' runs backwards; write it as {hi}-{lo}.")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


def select_snapshots(entries: list[tuple[int, Path]], snapshots=None, every: int | None = None
                     ) -> list[tuple[int, Path]]:
    """The run's snapshots narrowed to the epochs asked for (`snapshots`) or the multiples of `every`."""
    if snapshots is not None and every is not None:
        raise FeatureshiftError("Give either the snapshots to use or --every N, not both.")
    if snapshots is not None:
        by_epoch = dict(entries)
        # A single epoch must exist; a range takes the snapshots inside it (runs save every K epochs).
        parts = snapshots.split(",") if isinstance(snapshots, str) else [int(e) for e in snapshots]
        wanted, absent = set(), []
        for part in parts:
            epochs = parse_indices(part, "snapshot")
            found = [e for e in epochs if e in by_epoch]
            if not found:
                absent.append(str(part).strip())
            wanted.update(found)
        if absent:
            raise FeatureshiftError(
                f"The run has no snapshot for epoch(s) {', '.join(absent)}; its snapshots are at "
                f"epochs {_epoch_list([e for e, _ in entries])}.")
        return [(e, by_epoch[e]) for e in sorted(wanted)]
    if every is not None:
        if every < 1:
            raise FeatureshiftError(f"--every must be at least 1, not {every}.")
        chosen = [(e, p) for e, p in entries if e % every == 0]
        if not chosen:
            raise FeatureshiftError(
                f"No snapshot's epoch is a multiple of {every}; the run's snapshots are at epochs "
                f"{_epoch_list([e for e, _ in entries])}.")
        return chosen
    return list(entries)


def _epoch_list(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs[:20])) + (f", ... ({len(epochs)} in all)" if len(epochs) > 20 else "")


# ---------------------------------------------------------------- cache

def tile_key(checksum: str, layer: str, channel: int, settings: dict[str, Any]) -> str:
    """The cache key of one tile: everything that decides its pixels, and nothing else."""
    from .render import ENGINE_VERSION

    blob = json.dumps({"checksum": checksum, "layer": layer, "channel": int(channel), "engine": ENGINE_VERSION,
                       **settings}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_tile(path: str | Path) -> tuple[Image.Image, dict[str, Any]]:
    """A cached tile and what it was rendered with (settings, checksum, score)."""
    with Image.open(path) as im:
        return im.convert("RGB"), json.loads(im.info.get(TILE_TEXT_KEY, "{}"))


def _png_text(key: str, value: dict[str, Any] | str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value if isinstance(value, str) else json.dumps(value, default=str))
    return info


def save_merged(path: str | Path, image: Image.Image, signature: str | None = None, **about) -> None:
    """Write a stacked image tagged as featureshift output, which `merge` never takes as input."""
    info = _png_text(OUTPUT_TEXT_KEY, about)
    if signature:
        info.add_text(SIGNATURE_KEY, signature)
    save_image(path, image, pnginfo=info)


# ---------------------------------------------------------------- planning

@dataclasses.dataclass
class _Row:
    epoch: int
    path: Path
    meta: Any = None  # SnapshotMeta, or None when unreadable
    error: str | None = None


def _safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer)


def _read_rows(entries: list[tuple[int, Path]]) -> list[_Row]:
    rows = []
    for epoch, path in entries:
        try:
            rows.append(_Row(epoch, Path(path), read_meta(path)))
        except FeatureshiftError as e:
            rows.append(_Row(epoch, Path(path), error=str(e)))
    return rows


def _skeleton(arch: str, num_classes: int):
    """The architecture without weights (meta device): names and shapes for free."""
    import torch

    from .models.zoo import build

    try:
        with torch.device("meta"):
            return build(arch, num_classes=num_classes, pretrained=False)
    except Exception:  # some builders insist on real tensors
        return build(arch, num_classes=num_classes, pretrained=False)


def _layer_channels(rows: list[_Row], layers: Sequence[str]) -> dict[str, int]:
    """Check that every snapshot has every layer and one architecture; channels per layer."""
    from .models.layers import resolve_layers, trace_layers

    good = [r for r in rows if r.meta is not None]
    groups: dict[tuple[str, int], list[_Row]] = {}
    for r in good:
        groups.setdefault((r.meta.info.arch, r.meta.info.num_classes), []).append(r)
    skeletons = {g: _skeleton(*g) for g in groups}
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
                         for (arch, _), rs in groups.items())
        raise FeatureshiftError(
            f"The snapshots in this run are of different architectures ({desc}). A timeline follows one network "
            "through training; choose the snapshots of one architecture with --snapshots.")
    (arch, _), first = next(iter(groups.items()))
    model = skeletons[(arch, first[0].meta.info.num_classes)]
    size = first[0].meta.info.input_size
    try:
        infos = {l.name: l.channels for l in trace_layers(model, size)}
    except Exception:  # an op without a meta kernel: trace a real (random) copy instead
        from .models.zoo import build

        model = build(arch, num_classes=first[0].meta.info.num_classes, pretrained=False)
        infos = {l.name: l.channels for l in trace_layers(model, size)}
    out = {}
    for layer in layers:
        if layer == LOGITS:
            out[layer] = min(r.meta.info.num_classes for r in good)
        elif layer in infos:
            out[layer] = infos[layer]
        else:
            resolve_layers(model, [layer], size)  # raises, naming the closest layers
    return out


def _choose_channels(layer: str, count: int, channels) -> list[int]:
    if isinstance(channels, int):
        if channels < 1:
            raise FeatureshiftError(f"--columns must be at least 1, not {channels}.")
        return list(range(min(channels, count)))
    chosen = parse_indices(channels, "channel")
    if not chosen:
        raise FeatureshiftError("No channels were given; use --columns N or --channels 0-4,17.")
    beyond = [c for c in chosen if c >= count]
    if beyond:
        what = "classes" if layer == LOGITS else "channels"
        raise FeatureshiftError(
            f"Layer '{layer}' has {count} {what} (0-{count - 1}); {', '.join(map(str, beyond))} "
            "is out of range.")
    return chosen


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"  # as the render engine decides


# ---------------------------------------------------------------- labels

def _row_label(row: _Row) -> str:
    text = f"epoch {row.epoch}"
    metrics = row.meta.metrics if row.meta is not None else {}
    acc = metrics.get("val_acc")
    if isinstance(acc, (int, float)):
        text += f"\nval {100 * acc:.1f}%" if acc <= 1 else f"\nval {acc:.1f}%"
    elif row.meta is None:
        text += "\nunreadable"
    return text


def _col_label(layer: str, channel: int, class_names: list[str] | None) -> str:
    if layer == LOGITS and class_names and channel < len(class_names):
        return str(class_names[channel])[:18]
    return f"ch {channel}"


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

def timeline(run_dir: str | Path, layers: str | Sequence[str], channels: int | str | Sequence[int] = 5, *,
             snapshots: str | Sequence[int] | None = None, every: int | None = None,
             steps: int = 512, size: int = 128, seed: int = 0, objective: Any = "channel",
             lr: float = 0.05, param: str = "fft", device: str = "auto", batch_size: int | None = None,
             force: bool = False, labels: bool = True, quiet: bool = False,
             on_tile: Callable[[str, int, int, Path], None] | None = None,
             render_options: dict[str, Any] | None = None) -> TimelineResult:
    """Render `channels` of each of `layers` on every snapshot of the run in `run_dir`.

    `channels` is a count N (the first N channels, the `--columns` of the CLI), a spec
    like "0-4,17", or a list. `snapshots` ("0,1,5-10" or a list of epochs) or `every`
    (epochs that are multiples of N) choose the rows. Writes RUN/timeline/<layer>/ with one
    row image per snapshot (`{epoch:03d}.png`), `merged.png` and one GIF per channel
    (`channel_{c:04d}.gif`). Tiles come from the cache unless `force`; `on_tile(layer,
    epoch, channel, path)` is called after each new tile is saved. A corrupt snapshot is
    reported in `result.missing` and its row marked missing; the others are rendered.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not layers:
        raise FeatureshiftError("Name at least one layer (--layer); `featureshift layers MODEL` lists them.")
    entries = select_snapshots(list_snapshots(run_dir), snapshots, every)
    rows = _read_rows(entries)
    good = [r for r in rows if r.meta is not None]
    if not good:
        raise FeatureshiftError(
            f"None of the {len(rows)} snapshot(s) in {run_dir / 'snapshots'} can be read ({rows[0].error}). "
            "Train the run again or restore its snapshots.")
    counts = _layer_channels(rows, layers)
    columns = {layer: _choose_channels(layer, counts[layer], channels) for layer in layers}
    settings = {"objective": objective, "steps": int(steps), "size": int(size), "seed": int(seed),
                "lr": float(lr), "param": param, **(render_options or {})}
    cache = run_dir / TIMELINE_DIR / CACHE_DIR
    result = TimelineResult(run_dir, layers, columns, [r.epoch for r in rows], {}, {}, {}, {})
    for r in rows:
        if r.error:
            result.missing[r.epoch] = r.error

    # One job list for the whole timeline: the tiles not in the cache, grouped by snapshot.
    keys: dict[tuple[str, int, int], str] = {}
    todo: dict[int, list[tuple[str, int, str]]] = {}  # epoch -> [(layer, channel, key)]
    planned: set[str] = set()
    for r in good:
        for layer in layers:
            for c in columns[layer]:
                key = keys[(layer, r.epoch, c)] = tile_key(r.meta.checksum, layer, c, settings)
                if key in planned:  # identical weights in two snapshots: render once
                    continue
                if not force and (cache / f"{key}.png").exists():
                    result.cached += 1
                    continue
                planned.add(key)
                todo.setdefault(r.epoch, []).append((layer, c, key))

    if todo:
        _render_jobs(rows, todo, settings, cache, result, device, batch_size, quiet, on_tile, tqdm)

    for (layer, epoch, c), key in keys.items():
        if (cache / f"{key}.png").exists():
            result.tiles[(layer, epoch, c)] = cache / f"{key}.png"
    _write_outputs(rows, result, labels, settings)
    return result


def _render_jobs(rows, todo, settings, cache, result, device, batch_size, quiet, on_tile, tqdm) -> None:
    from .render import render

    by_epoch = {r.epoch: r for r in rows}
    order = [r.epoch for r in rows if r.epoch in todo]
    total = sum(len(v) for v in todo.values())
    bar = tqdm(total=total, unit="tile", desc="timeline", disable=quiet, dynamic_ncols=True)
    # Loading (disk, checksum) overlaps the previous snapshot's render; render moves it to the device.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="featureshift-load")
    load = lambda epoch: pool.submit(load_snapshot, by_epoch[epoch].path)  # noqa: E731
    try:
        pending = load(order[0])
        for i, epoch in enumerate(order):
            jobs = todo[epoch]
            try:
                model, _ = pending.result()
            except FeatureshiftError as e:
                result.missing[epoch] = str(e)
                by_epoch[epoch].error = str(e)
                model = None
            if i + 1 < len(order):
                pending = load(order[i + 1])
            if model is None:
                bar.update(len(jobs))
                continue
            bar.set_postfix_str(f"epoch {epoch}")
            out = render(model, [(layer, c) for layer, c, _ in jobs], batch_size=batch_size, device=device,
                         quiet=True, **settings)
            del model
            copies = len(out.images) // len(jobs)  # the diversity objective renders several per target
            saved = []
            for j, (layer, c, key) in enumerate(jobs):
                path, k = cache / f"{key}.png", j * copies
                # A diverged render is cached too (its last good image, marked): it would diverge again.
                about = {"layer": layer, "channel": c, "epoch": epoch, "checksum": by_epoch[epoch].meta.checksum,
                         "score": float(out.scores[k]), "failed": out.failed.get(k), **settings}
                save_image(path, to_pil(out.images[k]), pnginfo=_png_text(TILE_TEXT_KEY, about))
                saved.append((layer, c, path))
            # Every finished tile is on disk before anyone is told, so an interruption loses none.
            result.rendered += len(saved)
            bar.update(len(jobs))
            if on_tile is not None:
                for layer, c, path in saved:
                    on_tile(layer, epoch, c, path)
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)


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


def _write_outputs(rows: list[_Row], result: TimelineResult, labels: bool, settings: dict[str, Any]) -> None:
    """Rows, merged.png and GIFs of every layer. Each file carries a signature of its tiles and
    labels and is rewritten only when that changes, so a rerun after one new snapshot does not
    rewrite every row."""
    first = next(r for r in rows if r.meta is not None)
    class_names = first.meta.info.class_names
    row_labels = [_row_label(r) if labels else None for r in rows]
    opened: dict[Path, Image.Image] = {}

    def tile(layer: str, epoch: int, c: int) -> Image.Image | None:
        path = result.tiles.get((layer, epoch, c))
        if path is None:
            return None
        if path not in opened:
            opened[path] = read_tile(path)[0]
        return opened[path]

    for layer in result.layers:
        out_dir = result.run_dir / TIMELINE_DIR / _safe_name(layer)
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
                save_image(path, image, pnginfo=_png_text(SIGNATURE_KEY, sig))

        result.merged[layer] = out_dir / "merged.png"
        title = f"{result.run_dir.name}: {layer}, {settings['objective']}" if labels else None
        sig = _signature(keys, row_labels, col_labels, title)
        if _stored_signature(result.merged[layer]) != sig:
            grid = [[] if k is None else [tile(layer, r.epoch, c) for c in cols] for r, k in zip(rows, keys)]
            merged = make_grid(grid, row_labels=row_labels if labels else None, col_labels=col_labels, title=title)
            save_merged(result.merged[layer], merged, signature=sig, kind="timeline", layer=layer,
                        epochs=result.epochs, channels=cols)

        result.gifs[layer] = {}
        present = [(r, k) for r, k in zip(rows, keys) if k is not None]
        for j, c in enumerate(cols):
            path = result.gifs[layer][c] = out_dir / f"channel_{c:04d}.gif"
            titles = [row_labels[rows.index(r)].replace("\n", "  ") if labels else None for r, _ in present]
            sig = _signature([k[j] for _, k in present], titles)
            if present and _stored_signature(path) != sig:
                frames = [make_grid([[tile(layer, r.epoch, c)]], title=t) for (r, _), t in zip(present, titles)]
                _gif(path, frames, sig)
    for key, path in result.tiles.items():  # header only, no decoding
        with Image.open(path) as im:
            failed = json.loads(im.info.get(TILE_TEXT_KEY, "{}")).get("failed")
        if failed:
            result.failed[key] = failed


# ---------------------------------------------------------------- train --visualize

class SnapshotVisualizer:
    """A train hook, `train(..., on_snapshot=SnapshotVisualizer(layers, channels, ...))`:
    renders each snapshot into the run's timeline as soon as it is written and keeps
    merged.png current. The run folder is the one the snapshots are written to.

    On a CPU the render runs in between epochs (the hook returns when it is done); on a
    GPU it runs in a worker thread while training goes on. The first snapshot is always
    rendered at once, so a wrong layer name stops training at epoch 0, not at the end.
    Requests that arrive while a render is running are folded into the next one, which
    renders whatever is missing: the cache makes that (and resuming a run) automatic.
    Call `close()` at the end of training to wait for the last render.
    """

    def __init__(self, layers: str | Sequence[str], channels: int | str | Sequence[int] = 5, *,
                 run_dir: str | Path | None = None, background: bool | None = None, **options):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.layers, self.channels = layers, channels
        self.options = dict(options)
        device = _resolve_device(self.options.get("device", "auto"))
        self.background = device.startswith("cuda") if background is None else background
        self.result: TimelineResult | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False

    def __call__(self, epoch: int, path: str | Path) -> None:
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

    def _run(self) -> None:
        with self._lock:
            self.result = timeline(self.run_dir, self.layers, self.channels, **self.options)

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
