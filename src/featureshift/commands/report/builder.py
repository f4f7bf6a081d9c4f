"""Build the static HTML report of a run: RUN/report/index.html and the pages it links to.

Everything the pages show is in the folder (PNG and SVG files, inline CSS and JS), so
it opens from disk with no server and no network. Renders come from the run's tile
cache (`featureshift.timeline` renders only what is missing); the measures from
`featureshift.run_metrics`. The report is built in a scratch folder and swapped in at
the end, so an interrupted build leaves the previous report intact.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import FeatureshiftError
from ...io import current_umask, safe_name, save_image, write_bytes, write_text
from ...optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ...run import describe_status
from ...selection import DEFAULT_COLUMNS
from ...version import __version__
from . import plots

REPORT_DIR = "report"
# The settings taken over from a run's existing timeline of a layer, so that its renders are reused.
RENDER_KEYS = ("steps", "size", "seed", "lr", "param")
COLUMNS = ("weight_change", "correlation", "drift", "cross_b_on_a", "cross_a_on_b")


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape everywhere: class, layer and file names are text from the user's disk.
    return Environment(loader=PackageLoader("featureshift.commands.report", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    v = float(v)
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def _val(v) -> str:
    """A cell's sort key: the number, or empty where nothing was measured."""
    if v is None:
        return ""
    v = float(v)
    return "" if not math.isfinite(v) else repr(v)


def _cells(row: dict | None) -> dict[str, str]:
    row = row or {}
    out = {}
    for k in COLUMNS:
        out[k], out[k + "_v"] = _num(row.get(k)), _val(row.get(k))
    return out


def layer_page(layer: str) -> str:
    return f"layer-{safe_name(layer)}.html"


def channel_page(layer: str, channel: int) -> str:
    return f"channel-{safe_name(layer)}-{int(channel):04d}.html"


# ---------------------------------------------------------------- what to render

def existing_timelines(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Layers the run already has timelines of: layer -> {"channels": [...], "settings": {...}}.

    The settings are read from a tile of the layer in the timeline cache, so the report
    reuses those renders instead of rendering the same channels again with other settings.
    """
    from PIL import Image

    from ...io import OUTPUT_TEXT_KEY
    from ...jobs.cache import CACHE_DIR, TILE_TEXT_KEY
    from ..timeline.timeline import TIMELINE_DIR

    root = run_dir / TIMELINE_DIR
    found: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return found
    for merged in sorted(root.glob("*/merged.png")):
        try:
            with Image.open(merged) as im:
                about = json.loads(im.text.get(OUTPUT_TEXT_KEY, "{}"))
        except (OSError, ValueError):
            continue
        if about.get("kind") == "timeline" and about.get("layer") and about.get("channels"):
            found[about["layer"]] = {"channels": [int(c) for c in about["channels"]], "settings": None}
    tiles = sorted((root / CACHE_DIR).glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
    for tile in tiles[:5000]:
        if all(v["settings"] is not None for v in found.values()):
            break
        try:
            with Image.open(tile) as im:
                about = json.loads(im.text.get(TILE_TEXT_KEY, "{}"))
        except (OSError, ValueError):
            continue
        entry = found.get(about.get("layer"))
        if entry is not None and entry["settings"] is None and about.get("objective", "channel") == "channel":
            entry["settings"] = {k: about[k] for k in RENDER_KEYS if k in about}
    return found


def _default_layer(model) -> str:
    from ...metrics.driver import overview_layers

    # Two thirds of the way up the network, below the head: a layer that fine-tuning
    # usually changes visibly while its features are still recognizable.
    from ...models.layers import layer_info

    layers = [l for l in overview_layers(model) if not l.startswith(("classifier", "fc", "head"))
              and "Pool" not in layer_info(model, l).type]
    return layers[min(len(layers) - 1, (2 * len(layers)) // 3)]


# ---------------------------------------------------------------- the build

def build_report(run_dir: str | os.PathLike, layers: str | Sequence[str] | None = None,
                 channels: int | str | Sequence[int] | None = None, *, probe: str | os.PathLike | None = None,
                 probe_limit: int | None = 256, image_size: int | None = None, examples: int = 6,
                 settings: RenderSettings | None = None, device: str = "auto", batch_size: int | None = None,
                 open_browser: bool = False, quiet: bool = False, **changes) -> Path:
    """Write RUN/report/ and return the path of its index.html.

    layers: the layers to render and rank channel by channel (default: those the run has
    timelines of, else one layer two thirds up the network). channels: a count N (the
    first N), a spec like "0-4,17" or a list (default: the timeline's, else 5).
    settings: the RenderSettings of the renders (default: those of the run's existing
    timeline of the layer, so its cached renders are reused, else the engine's); keyword
    `changes` to its fields (steps=64, ...) apply on top, None keeping the value. probe:
    a folder of images for the representation measures and dataset examples (default:
    the run's validation images, at most `probe_limit`). examples: probe images per channel.
    """
    from ...metrics.driver import run_metrics
    from ...run import list_snapshots, read_metrics, read_run
    from ...snapshot import load_snapshot, read_meta
    from ..timeline.timeline import timeline

    if examples < 0:
        raise FeatureshiftError(f"--examples must be 0 or more, not {examples}.")
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    entries = list_snapshots(run_dir)
    if probe is not None and not Path(probe).is_dir():
        from ...metrics.probe import resolve_probe

        resolve_probe(run_dir, probe, probe_limit)  # the clear error, before any rendering
    first = None
    for _, path in entries:
        try:
            first = path, read_meta(path)
            break
        except FeatureshiftError:
            continue
    if first is None:
        raise FeatureshiftError(f"None of the snapshots in {run_dir / 'snapshots'} can be read.")
    first_meta = first[1]

    existing = existing_timelines(run_dir)
    if layers is None:
        layers = list(existing) or [_default_layer(load_snapshot(first[0])[0])]
    layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not layers:
        raise FeatureshiftError("Name at least one layer (--layer); `featureshift layers MODEL` lists them.")
    DEFAULT_SETTINGS.replace(**changes)  # an unknown setting fails now, before any work

    # The renders: the timeline makes sure every tile exists (cached ones are only read).
    tiles: dict[tuple[str, int, int], Path] = {}
    chosen: dict[str, list[int]] = {}
    merged: dict[str, Path] = {}
    used_settings: dict[str, RenderSettings] = {}
    for layer in layers:
        prior = existing.get(layer, {})
        base = settings or DEFAULT_SETTINGS.replace(**(prior.get("settings") or {}))
        layer_settings = base.replace(**changes)
        cols = channels if channels is not None else (prior.get("channels") or DEFAULT_COLUMNS)
        tl = timeline(run_dir, [layer], cols, settings=layer_settings, device=device, batch_size=batch_size,
                      quiet=quiet)
        tiles.update(tl.tiles)
        chosen[layer] = tl.channels[layer]
        merged[layer] = tl.merged[layer]
        used_settings[layer] = layer_settings

    measured = [l for l in layers if l != "logits"]
    m = run_metrics(run_dir, measured, {l: chosen[l] for l in measured}, renders=tiles, probe=probe,
                    probe_limit=probe_limit, image_size=image_size, examples=examples, device=device, quiet=quiet)

    out = run_dir / REPORT_DIR
    scratch = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
    os.chmod(scratch, 0o777 & ~current_umask())  # mkdtemp makes 0700: the report is for sharing
    try:
        inputs = ReportInputs(run_dir=run_dir, run=run, rows=read_metrics(run_dir), meta=first_meta, metrics=m,
                              chosen=chosen, merged=merged, tiles=tiles, settings=used_settings)
        _Writer(scratch, inputs, quiet).write()
        old = None
        if out.exists():
            old = run_dir / f".report-old-{os.getpid()}"
            os.replace(out, old)
        os.replace(scratch, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    index = out / "index.html"
    if open_browser:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())
    return index


report = build_report  # the API name of `featureshift report`


@dataclasses.dataclass
class ReportInputs:
    """Everything the pages show, gathered before the first page is written."""

    run_dir: Path
    run: dict[str, Any]  # run.json
    rows: list[dict[str, Any]]  # metrics.jsonl, one row per epoch
    meta: Any  # SnapshotMeta of the first readable snapshot
    metrics: Any  # RunMetrics: the measures of change
    chosen: dict[str, list[int]]  # layer -> rendered channels
    merged: dict[str, Path]  # layer -> the timeline's merged.png
    tiles: dict[tuple[str, int, int], Path]  # (layer, epoch, channel) -> cached render
    settings: dict[str, RenderSettings]  # layer -> what its renders were made with


class _Writer:
    def __init__(self, out: Path, inputs: ReportInputs, quiet: bool):
        self.out, self.quiet = out, quiet
        self.run_dir, self.run, self.rows, self.meta = inputs.run_dir, inputs.run, inputs.rows, inputs.meta
        self.m, self.chosen, self.merged, self.tiles = inputs.metrics, inputs.chosen, inputs.merged, inputs.tiles
        self.settings = inputs.settings
        self.env = _env()
        self.info = self.meta.info
        self.epochs = self.m.epochs
        self.reference = self.m.reference
        self.last = self.m.epochs[-1]
        self.nothing = len(self.m.epochs) < 2
        self.acc = {r.get("epoch"): r.get("val_acc") for r in self.rows}
        where = self.run_dir.resolve()
        self.common = {"run_name": where.name, "run_dir": str(where), "version": __version__,
                       "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "nothing_to_compare": self.nothing,
                       "reference": self.reference, "last": self.last}
        self._images: dict[int, Any] = {}
        self._copied: dict[Path, str] = {}

    # ------------------------------------------------------------ helpers
    def page(self, name: str, template: str, **context) -> None:
        html = self.env.get_template(template).render(**self.common, **context)
        write_text(self.out / name, html)

    def tile(self, layer: str, epoch: int, channel: int) -> str | None:
        src = self.tiles.get((layer, epoch, channel))
        if src is None:
            return None
        if src not in self._copied:
            rel = f"img/renders/{src.name}"
            write_bytes(self.out / rel, src.read_bytes())
            self._copied[src] = rel
        return self._copied[src]

    def frame_label(self, epoch: int) -> str:
        acc = self.acc.get(epoch)
        text = f"epoch {epoch}" + (" (before training)" if epoch == self.reference else "")
        if isinstance(acc, (int, float)) and math.isfinite(acc):
            text += f" · validation accuracy {100 * acc:.1f}%"
        return text

    # ------------------------------------------------------------ pages
    def write(self) -> None:
        from tqdm.auto import tqdm

        pages = [(l, c) for l in self.m.channels for c in self.chosen.get(l, [])]
        bar = tqdm(total=1 + len(self.m.channels) + len(pages), desc="report", unit="page", disable=self.quiet,
                   dynamic_ncols=True)
        self.write_index()
        bar.update()
        for layer in self.m.channels:
            self.write_layer(layer)
            bar.update()
        for i, (layer, c) in enumerate(pages):
            same = [p for p in pages if p[0] == layer]
            j = same.index((layer, c))
            self.write_channel(layer, c, same[j - 1] if j > 0 else None, same[j + 1] if j + 1 < len(same) else None)
            bar.update()
        bar.close()

    def write_index(self) -> None:
        m, run = self.m, self.run
        curves = "img/plots/curves.svg" if plots.training_curves(self.rows, self.out / "img/plots/curves.svg") else None
        change = None
        if not self.nothing:
            weight = np.array([[_row(m.layer_rows, e, l).get("weight_change", np.nan) for e in m.epochs]
                               for l in m.layers], float)
            cka = np.array([[_row(m.layer_rows, e, l).get("cka", np.nan) for e in m.epochs] for l in m.layers], float)
            change = "img/plots/change.svg"
            plots.change_heatmaps(m.layers, m.epochs, weight, cka, self.out / change)
        layer_table = []
        for l in m.layers:
            r = _row(m.layer_rows, self.last, l)
            layer_table.append({"layer": l, "page": layer_page(l) if l in m.channels else None,
                                "weight_change": _num(r.get("weight_change")), "weight_change_v": _val(r.get("weight_change")),
                                "cka": _num(r.get("cka")), "cka_v": _val(r.get("cka"))})
        timelines = []
        for layer, path in self.merged.items():
            rel = f"img/timeline-{safe_name(layer)}.png"
            write_bytes(self.out / rel, Path(path).read_bytes())
            timelines.append({"layer": layer, "src": rel, "channels": self.chosen[layer], "width": _shown_width(path),
                              "page": layer_page(layer) if layer in m.channels else None})
        ds = run.get("dataset", {}) or {}
        counts = ds.get("counts", {}) or {}
        classes = list(ds.get("classes") or self.info.class_names)
        class_rows = [{"name": c, "train": (counts.get(c) or {}).get("train", "–"), "val": (counts.get(c) or {}).get("val", "–")}
                      for c in classes]
        dataset_rows = [(k, v) for k, v in (("folder", ds.get("root")), ("validation folder", ds.get("val_root")),
                                            ("split", ds.get("split")), ("training images", ds.get("train_images")),
                                            ("validation images", ds.get("val_images"))) if v not in (None, "")]
        config_rows = [(k, _text(v)) for k, v in (run.get("config") or {}).items()]
        # What the run resolved (device "auto" -> "cpu"), labelled apart from the settings asked for.
        for k, label in (("status", "status"), ("device", "device used"), ("workers", "workers used"),
                         ("amp", "mixed precision used"), ("created", "created"), ("updated", "updated")):
            if run.get(k) is not None:
                config_rows.append((label, describe_status(run) if k == "status" else _text(run[k])))
        cut = run.get("cutoff") or {}
        if cut.get("frozen") is not None:
            config_rows.append(("frozen modules", f"{len(cut['frozen'])}: " + _text(cut["frozen"])))
        for k, v in (run.get("versions") or {}).items():
            config_rows.append((f"version of {k}", _text(v)))
        settings_rows = [("probe images", f"{len(m.probe)} at {m.image_size} px"),
                         ("reference snapshot", f"epoch {m.reference}")]
        for layer, s in self.settings.items():
            settings_rows.append((f"renders of {layer}", s.describe()))
        for epoch, why in m.missing.items():
            settings_rows.append((f"epoch {epoch} left out", why))
        finals = [r.get("val_acc") for r in self.rows if isinstance(r.get("val_acc"), (int, float))]
        notes = []
        if "logits" in self.merged:
            notes.append("The logits timeline has renders only: the change measures are taken on feature-map layers.")
        self.page("index.html", "index.html", model=self.info, classes=classes, epochs=m.epochs,
                  epochs_done=run.get("epochs_done", self.last), final_acc=finals[-1] if finals else None,
                  probe_count=len(m.probe), curves=curves, change_plot=change, layer_table=layer_table,
                  timelines=timelines, layer_pages=[{"layer": l, "page": layer_page(l)} for l in m.channels],
                  dataset_rows=dataset_rows, class_rows=class_rows, skipped=ds.get("skipped") or [],
                  config_rows=config_rows, settings_rows=settings_rows, notes=notes)

    def write_layer(self, layer: str) -> None:
        m = self.m
        li = m.layer_info[layer]
        sources = m.sources.get(layer, [])
        table = {r["channel"]: r for r in m.channel_table(layer, self.last)}
        rendered = self.chosen.get(layer, [])
        rows = []
        for c in range(li.channels):
            page = channel_page(layer, c) if c in rendered else None
            rows.append({"channel": c, "page": page, **_cells(table.get(c)),
                         "before": self.tile(layer, self.reference, c) if page else None,
                         "after": self.tile(layer, self.last, c) if page else None})
        # Rendered channels first: they are the ones with pictures and pages.
        rows.sort(key=lambda r: (r["page"] is None, r["channel"]))
        lr = _row(m.layer_rows, self.last, layer)
        plot = None
        if not self.nothing:
            plot = f"img/plots/layer-{safe_name(layer)}.svg"
            plots.layer_history(m.epochs, [v for _, v in m.layer_series(layer, "weight_change")],
                                [v for _, v in m.layer_series(layer, "cka")], self.out / plot)
        timeline = None
        if layer in self.merged:
            timeline = {"src": f"img/timeline-{safe_name(layer)}.png", "width": _shown_width(self.merged[layer])}
        self.page(layer_page(layer), "layer.html", layer=layer, layer_type=li.type, channels=li.channels,
                  sources=sources, layer_wc=_num(lr.get("weight_change")), layer_cka=_num(lr.get("cka")),
                  rendered=rendered, plot=plot, timeline=timeline, rows=rows,
                  drift_scale=_num(self.drift_scale(layer), 2))

    def drift_scale(self, layer: str) -> float | None:
        """The median drift between renders of two different channels at the reference epoch:
        a channel that drifted this far now looks like another neuron."""
        import itertools

        from ...metrics.drift import read_image, visual_drift

        have = [c for c in self.chosen.get(layer, []) if (layer, self.reference, c) in self.tiles][:6]
        pairs = list(itertools.combinations(have, 2))
        if not pairs:
            return None
        images = {c: read_image(self.tiles[(layer, self.reference, c)]) for c in have}
        return float(np.median(visual_drift([images[a] for a, _ in pairs], [images[b] for _, b in pairs])))

    def write_channel(self, layer: str, c: int, prev, nxt) -> None:
        from ...metrics.examples import example_crops

        m = self.m
        frames = []
        for e in self.epochs:
            src = self.tile(layer, e, c)
            if src is not None:
                frames.append({"epoch": e, "src": src, "label": self.frame_label(e)})
        sides = []
        shown = [(self.reference, f"Epoch {self.reference} (before training)")]
        if not self.nothing:
            shown.append((self.last, f"Epoch {self.last}"))
        for e, title in shown:
            exs = m.examples.get((layer, c, e), [])
            crops = example_crops(exs, self.info, m.image_size, tile=112, cache=self._images)
            items = []
            for k, (ex, (_, crop)) in enumerate(zip(exs, crops)):
                rel = f"img/examples/{safe_name(layer)}-{c:04d}-{e:03d}-{k}.png"
                save_image(self.out / rel, crop)
                items.append({"src": rel, "name": f"{ex.path.parent.name}/{ex.path.name}", "path": str(ex.path),
                              "value": f"{ex.value:.3g}"})
            sides.append({"title": title, "shown": items})
        history = [{"epoch": r["epoch"], **_cells(r)} for r in m.channel_rows if r["layer"] == layer and r["channel"] == c]
        last = next((r for r in m.channel_rows if r["layer"] == layer and r["channel"] == c and r["epoch"] == self.last), {})
        names = {"weight_change": "weight change", "correlation": "correlation", "drift": "visual drift",
                 "cross_b_on_a": f"epoch {self.last} net on epoch {self.reference} render (B on A)",
                 "cross_a_on_b": f"epoch {self.reference} net on epoch {self.last} render (A on B)"}
        summary = [(names[k], _num(last.get(k))) for k in COLUMNS]
        plot = None
        if not self.nothing:
            plot = f"img/plots/channel-{safe_name(layer)}-{c:04d}.svg"
            series = {"weight change": "weight_change", "drift": "drift", "correlation": "correlation",
                      "B on A": "cross_b_on_a", "A on B": "cross_a_on_b"}
            plots.channel_history(m.epochs, {k: [v for _, v in m.channel_series(layer, c, col)]
                                             for k, col in series.items()}, self.out / plot)
        self.page(channel_page(layer, c), "channel.html", layer=layer, channel=c, layer_page=layer_page(layer),
                  prev={"channel": prev[1], "page": channel_page(*prev)} if prev else None,
                  next={"channel": nxt[1], "page": channel_page(*nxt)} if nxt else None,
                  frames=frames, summary=summary, examples=sides, rf=m.receptive_field.get(layer, 0),
                  image_size=m.image_size, history=history, plot=plot)


def _shown_width(path: Path) -> int:
    """Small grids (small renders, few channels) are shown enlarged, up to the page width."""
    from PIL import Image

    with Image.open(path) as im:
        w = im.width
    return min(max(w, min(2 * w, 1100)), 1100) if w < 550 else w


def _row(rows: list[dict], epoch: int, layer: str) -> dict:
    return next((r for r in rows if r["epoch"] == epoch and r["layer"] == layer), {})


def _text(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "–"
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return "–" if v is None else str(v)
