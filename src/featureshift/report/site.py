"""The site writer of the report: index.html, a page per layer and per rendered channel, the
plots and pictures they show, from a ReportInputs gathered beforehand (`featureshift report`
decides what to render and measure; commands/report.py).

Everything the pages show is in the folder (PNG and SVG files, inline CSS and JS), so it
opens from disk with no server and no network.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..grid import no_response_tile
from ..jobs.cache import read_tile_about
from ..io import safe_name, save_image, write_bytes, write_text
from ..optvis.settings import RenderSettings
from ..run import describe_status
from ..version import __version__
from . import plots
from .changes import ChannelChange, change_pictures, example_items, shift_section

REPORT_DIR = "report"
# The settings taken over from a run's existing timeline of a layer, so that its renders are reused.
COLUMNS = ("weight_change", "correlation", "drift", "cross_b_on_a", "cross_a_on_b")
PLOTTED_CHANNELS = 24  # channel pages of a layer with more rendered channels get a plot only in the timeline


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape everywhere: class, layer and file names are text from the user's disk.
    return Environment(loader=PackageLoader("featureshift.report", "templates"), autoescape=True,
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


def measure_cells(row: dict | None) -> dict[str, str]:
    """Shown text and sort value of each measure. A channel that no probe image activates is
    "dead": its correlation means nothing, and it takes no place in any ranking by change."""
    row = row or {}
    out = {}
    dead = bool(row.get("dead"))
    for k in COLUMNS:
        out[k], out[k + "_v"] = _num(row.get(k)), ("" if dead else _val(row.get(k)))
        out[k + "_beyond"] = False
    # Past the layer's render-noise floor (metrics.floors): shown in bold, a change render noise does not explain.
    drift, kept = _finite(row.get("drift")), _finite(row.get("cross_b_on_a"))
    drift_floor, kept_floor = _finite(row.get("drift_floor")), _finite(row.get("kept_floor"))
    out["drift_beyond"] = not dead and None not in (drift, drift_floor) and drift > drift_floor
    out["cross_b_on_a_beyond"] = not dead and None not in (kept, kept_floor) and kept < kept_floor
    if dead:
        out["correlation"] = "dead"
    out["dead"] = dead
    return out


def _finite(v) -> float | None:
    if v is None or v == "":
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def floor_card(floor) -> tuple[str, str] | None:
    """The layer page's card of its render-noise floors (None without them)."""
    if floor is None or not floor.channels:
        return None
    n = len(floor.channels)
    return (f"noise floor, from {n} channel{'s' * (n != 1)} rendered twice",
            f"drift {_num(floor.drift)} · B on A {_num(floor.kept, 2)}")


def floor_lines(floor, channel: int, row: dict) -> list[tuple[str, str]]:
    """The channel page's lines on render noise: the layer's floors against the channel's measures,
    and the channel's own two renders of the reference where it was in the floor's sample."""
    if floor is None:
        return []
    out = []
    drift, kept = _finite(row.get("drift")), _finite(row.get("cross_b_on_a"))
    if drift is not None:
        out.append(("visual drift against the layer's noise floor", f"{_num(drift)} vs {_num(floor.drift)}: "
                    + ("beyond render noise" if drift > floor.drift else "within render noise")))
    if kept is not None:
        out.append(("B on A against the layer's noise floor", f"{_num(kept)} vs {_num(floor.kept)}: "
                    + ("beyond render noise" if kept < floor.kept else "within render noise")))
    if channel in floor.null_drift:
        one, other = floor.null_kept.get(channel, (math.nan, math.nan))
        out.append(("this channel rendered twice before training (two seeds): drift, B on A both ways",
                    f"{_num(floor.null_drift[channel])}; {_num(one, 2)} / {_num(other, 2)}"))
    return out


def _speed_cells(facts) -> dict[str, str]:
    """Sort values and text of the adaptation measures of one channel (ChannelFacts or None)."""
    if facts is None:
        return {"half_epoch": "–", "half_epoch_v": "", "first_share": "–", "first_share_v": "", "coarsening": "–",
                "coarsening_v": "", "fate": "–", "fate_v": ""}
    s = facts.speed
    dead = facts.dead or facts.dead_before
    fate = facts.fate or ("dead" if dead else "–")
    return {"half_epoch": "–" if s.half_epoch is None else str(s.half_epoch),
            "half_epoch_v": "" if s.half_epoch is None or dead else str(s.half_epoch),
            "first_share": "–" if s.first_share is None else f"{100 * s.first_share:.0f}%",
            "first_share_v": "" if s.first_share is None or dead else repr(s.first_share),
            "coarsening": _num(facts.coarsening, 2), "coarsening_v": "" if dead else _val(facts.coarsening),
            "fate": fate, "fate_v": "" if fate == "–" else fate}


def layer_page(layer: str) -> str:
    return f"layer-{safe_name(layer)}.html"


def channel_page(layer: str, channel: int) -> str:
    return f"channel-{safe_name(layer)}-{int(channel):04d}.html"


@dataclasses.dataclass
class Accentuation:
    """A channel's top dataset example, accentuated at each snapshot."""

    example: Path  # the probe image
    epoch: int  # the snapshot it is the top example of
    value: float  # the channel's largest activation on it at that snapshot
    settings: RenderSettings  # method "accent", image: the example
    tiles: dict[int, Path]  # epoch -> cached accentuation (missing: its snapshot could not be used)


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
    settings: dict[str, RenderSettings]  # layer -> what its timeline's renders were made with
    atlas: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # layer -> its RUN/atlas.json entry
    atlas_settings: dict[str, str] = dataclasses.field(default_factory=dict)  # layer -> its atlas's settings, described
    # layer -> the channels of its timeline
    timeline_channels: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # (layer, channel) -> its top dataset example accentuated at each snapshot
    accents: dict[tuple[str, int], Accentuation] = dataclasses.field(default_factory=dict)
    # (layer, channel) -> its page's change section: gained and lost renders, rose and fell examples
    changes: dict[tuple[str, int], ChannelChange] = dataclasses.field(default_factory=dict)
    facts: dict[str, Any] | None = None  # layer -> metrics.answers.LayerFacts, when the caller has them already


def write_site(out: Path, inputs: ReportInputs, quiet: bool = False) -> None:
    """Write the report's pages and pictures into the (empty) folder OUT."""
    _Writer(out, inputs, quiet).write()


class _Writer:
    def __init__(self, out: Path, inputs: ReportInputs, quiet: bool):
        self.out, self.quiet = out, quiet
        self.run_dir, self.run, self.rows, self.meta = inputs.run_dir, inputs.run, inputs.rows, inputs.meta
        self.m, self.chosen, self.merged, self.tiles = inputs.metrics, inputs.chosen, inputs.merged, inputs.tiles
        self.settings = inputs.settings
        self.atlas, self.atlas_settings = inputs.atlas, inputs.atlas_settings
        self.timeline_channels = inputs.timeline_channels
        self.accents, self.changes = inputs.accents, inputs.changes
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
        from ..metrics.answers import analyse_layer

        self.facts = inputs.facts if inputs.facts is not None else \
            {l: analyse_layer(self.m, l, self.tiles) for l in self.m.channels}
        self.badges = {(t.layer, t.epoch, t.channel): tile_badge(t) for t in (getattr(self.m, "checks", None) or [])}
        # (layer, channel) -> its rows in epoch order: an atlas has thousands of channel pages.
        self.channel_rows: dict[tuple[str, int], list[dict]] = {}
        for r in self.m.channel_rows:
            self.channel_rows.setdefault((r["layer"], r["channel"]), []).append(r)

    # ------------------------------------------------------------ helpers
    def page(self, name: str, template: str, **context) -> None:
        html = self.env.get_template(template).render(**self.common, **context)
        write_text(self.out / name, html)

    def precision_used(self, layer: str, settings) -> str:
        """', network in bf16': what "auto" meant on the machine that rendered LAYER's tiles."""
        if settings.precision != "auto":
            return ""  # describe() names it
        src = next((p for (l, _, _), p in self.tiles.items() if l == layer), None)
        try:
            used = read_tile_about(src).get("precision_used") if src is not None else None
        except (OSError, ValueError):
            used = None
        return f", network in {used}" if used else ""

    def tile(self, layer: str, epoch: int, channel: int) -> str | None:
        src = self.tiles.get((layer, epoch, channel))
        return None if src is None else self.cached_tile(src)

    def cached_tile(self, src: Path, mark_silent: bool = True) -> str:
        """The report's copy of the cached tile SRC, relative to the report folder."""
        if src not in self._copied:
            rel = f"img/renders/{src.name}"
            dst = self.out / rel
            if mark_silent and read_tile_about(src).get("no_response"):
                # A channel that never responded renders as noise: show it marked, as grids do.
                from PIL import Image

                with Image.open(src) as im:
                    save_image(dst, no_response_tile(*im.size))
                self._copied[src] = rel
                return rel
            try:
                # A hard link: an atlas puts thousands of tiles in a report, and a cached tile is
                # never changed in place (a new one replaces it under the same name).
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
            except OSError:
                write_bytes(dst, src.read_bytes())
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
        for layer in self.m.channels:
            same = [(layer, c) for c in self.chosen.get(layer, [])]
            for j, (_, c) in enumerate(same):
                self.write_channel(layer, c, same[j - 1] if j > 0 else None,
                                   same[j + 1] if j + 1 < len(same) else None)
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
                                "function_change": _num(r.get("function_change")),
                                "function_change_v": _val(r.get("function_change")),
                                "cka": _num(r.get("cka")), "cka_v": _val(r.get("cka")),
                                "cka_interval": interval_text(r, "cka"), "cka_interval_v": _val(r.get("cka_low"))})
        timelines = []
        for layer, path in self.merged.items():
            rel = f"img/timeline-{safe_name(layer)}.png"
            write_bytes(self.out / rel, Path(path).read_bytes())
            # The timeline's own channels: an atlas of the same layer adds its channels to chosen, not to the picture.
            shown = self.timeline_channels.get(layer) or self.chosen[layer]
            timelines.append({"layer": layer, "src": rel, "channels": shown, "width": _shown_width(path),
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
            settings_rows.append((f"renders of {layer}", s.describe() + self.precision_used(layer, s)))
        for layer in dict.fromkeys(l for l, _ in self.accents):
            s = dataclasses.replace(next(a.settings for (l, _), a in self.accents.items() if l == layer), image=None)
            settings_rows.append((f"accentuations of {layer}",
                                  f"{s.describe()}, image: each channel's top dataset example"))
        for layer, described in self.atlas_settings.items():
            entry = self.atlas.get(layer, {})
            settings_rows.append((f"atlas of {layer}", f"{len(entry.get('channels', []))} channels at epochs "
                                  f"{_text(entry.get('epochs', []))}; {described}"))
        for epoch, why in m.missing.items():
            settings_rows.append((f"epoch {epoch} left out", why))
        finals = [r.get("val_acc") for r in self.rows if isinstance(r.get("val_acc"), (int, float))]
        notes = []
        if "logits" in self.merged:
            notes.append("The logits timeline has renders only: the change measures are taken on feature-map layers.")
        self.page("index.html", "index.html", findings=self.findings(finals), most_changed=self.most_changed(),
                  model=self.info, classes=classes, epochs=m.epochs,
                  epochs_done=run.get("epochs_done", self.last), final_acc=finals[-1] if finals else None,
                  probe_count=len(m.probe), curves=curves, change_plot=change, layer_table=layer_table,
                  timelines=timelines, layer_pages=[{"layer": l, "page": layer_page(l)} for l in m.channels],
                  dataset_rows=dataset_rows, class_rows=class_rows, skipped=ds.get("skipped") or [],
                  config_rows=config_rows, settings_rows=settings_rows, notes=notes,
                  interval_level=interval_level(m))

    def findings(self, finals: list) -> list[dict[str, str]]:
        """The report's conclusions in sentences with numbers, each linking to its evidence."""
        from ..metrics.answers import rank_layers
        from .analysis import change_findings, check_findings, head_is_new, layer_findings

        if self.nothing:
            return []
        out = []
        accs = [(r.get("epoch"), r["val_acc"]) for r in self.rows if isinstance(r.get("val_acc"), (int, float))]
        if len(accs) >= 2:
            first = ("before training " if accs[0][0] == self.reference else "") + f"(epoch {accs[0][0]})"
            # Where a run starts from a new head, its first accuracy is about chance: say what chance is.
            chance = f"; chance with {self.info.num_classes} classes is {100 / self.info.num_classes:.1f}%" \
                if self.info.num_classes > 1 else ""
            out.append({"text": f"Validation accuracy went from {100 * accs[0][1]:.1f}% {first} to "
                                f"{100 * accs[-1][1]:.1f}% at epoch {accs[-1][0]}{chance}.",
                        "href": "index.html#curves"})
        cut = self.run.get("cutoff") or {}
        ranking = rank_layers(self.m, self.last, frozen=cut.get("frozen") or ())
        out.extend(change_findings(ranking, self.info.num_classes, head_is_new(self.run),
                                   f"--cutoff {cut['value']}" if cut.get("value") else None,
                                   {r["layer"]: r for r in self.m.layer_rows if r["epoch"] == self.last},
                                   interval_level(self.m)))
        for layer, facts in self.facts.items():
            made_by = [] if self.m.parameters.get(layer) else self.m.sources.get(layer, [])
            out.extend(layer_findings(facts, layer_page(layer), self.epochs, made_by))
            out.extend(check_findings(self.m.checks or [], layer, layer_page(layer)))
        return out

    def most_changed(self) -> list[dict[str, Any]]:
        """Per ranking measure, the most changed atlased channels, with their renders before and after."""
        from .analysis import most_changed

        layers = [l for l in self.m.channels if l in self.atlas]
        if self.nothing or not layers:
            return []
        out = []
        for name, items in most_changed(self.m, layers, self.tiles, self.facts).items():
            shown = [{**it, "page": channel_page(it["layer"], it["channel"]), "value": f"{it['value']:.3f}",
                      "before": self.tile(it["layer"], self.reference, it["channel"]),
                      "after": self.tile(it["layer"], self.last, it["channel"])} for it in items]
            out.append({"name": name, "id": "top-" + safe_name(name.split(" ")[0]), "channels": shown})
        return out

    def write_layer(self, layer: str) -> None:
        m = self.m
        li = m.layer_info[layer]
        sources = m.sources.get(layer, [])
        table = {r["channel"]: r for r in m.channel_table(layer, self.last)}
        rendered = self.chosen.get(layer, [])
        facts = self.facts.get(layer)
        rows = []
        for c in range(li.channels):
            page = channel_page(layer, c) if c in rendered else None
            before = self.tile(layer, self.reference, c) if page else None
            after = self.tile(layer, self.last, c) if page else None
            cells = measure_cells(table.get(c))
            extra = _speed_cells(facts.channels.get(c) if facts else None)
            rows.append({"channel": c, "page": page, **cells, **extra, "before": before, "after": after,
                         "rendered": bool(before or after), "badges": [self.badges.get((layer, e, c)) for e in
                                                                       (self.reference, self.last)]})
        # Rendered channels first: they are the ones with pictures and pages.
        rows.sort(key=lambda r: (r["page"] is None, r["channel"]))
        lr = _row(m.layer_rows, self.last, layer)
        plot = None
        if not self.nothing:
            plot = f"img/plots/layer-{safe_name(layer)}.svg"
            plots.layer_history(m.epochs, [v for _, v in m.layer_series(layer, "weight_change")],
                                [v for _, v in m.layer_series(layer, "cka")], self.out / plot,
                                [r.get("cka_low") for r in _layer_rows(m, layer)],
                                [r.get("cka_high") for r in _layer_rows(m, layer)])
        timeline = None
        if layer in self.merged:
            timeline = {"src": f"img/timeline-{safe_name(layer)}.png", "width": _shown_width(self.merged[layer])}
        cards = []
        if facts is not None and not self.nothing:
            from .analysis import scale_phrase

            s, r = facts.speed, facts.reuse
            # Distances from the reference, as the speed measures them: not amounts of training done.
            first = s.first_epoch or self.epochs[min(1, len(self.epochs) - 1)]
            cards = [("weights half as far as at the end by", "–" if s.half_epoch is None else f"epoch {s.half_epoch}"),
                     (f"share of the final weight distance at epoch {first}",
                      "–" if s.first_share is None else f"{100 * s.first_share:.0f}%")]
            if r.measured:
                cards.append(("kept / repurposed / died", " / ".join(
                    f"{100 * (r.share(k) or 0):.0f}%" for k in ("kept", "repurposed", "died"))))
            if facts.scale_pairs:
                cards.append(("spatial scale", scale_phrase(facts.coarsening)))
            if floor_card(facts.floor):
                cards.append(floor_card(facts.floor))
        unrendered = sum(1 for r in rows if not r["rendered"])
        self.page(layer_page(layer), "layer.html", layer=layer, layer_type=li.type, channels=li.channels,
                  sources=sources, layer_wc=_num(lr.get("weight_change")), layer_fc=_num(lr.get("function_change")),
                  layer_cka=_num(lr.get("cka")), layer_cka_interval=interval_text(lr, "cka"),
                  interval_level=interval_level(m),
                  rendered=rendered, plot=plot, timeline=timeline, rows=rows, cards=cards,
                  unrendered=unrendered, dead=sum(1 for r in rows if r["dead"]),
                  atlas=self.atlas_settings.get(layer), drift_scale=_num(self.drift_scale(layer), 2),
                  floor=facts.floor if facts is not None else None)

    def drift_scale(self, layer: str) -> float | None:
        """The median drift between renders of two different channels at the reference epoch:
        a channel that drifted this far now looks like another neuron."""
        import itertools

        from ..metrics.drift import read_image, visual_drift

        have = [c for c in self.chosen.get(layer, []) if (layer, self.reference, c) in self.tiles][:6]
        pairs = list(itertools.combinations(have, 2))
        if not pairs:
            return None
        images = {c: read_image(self.tiles[(layer, self.reference, c)]) for c in have}
        return float(np.median(visual_drift([images[a] for a, _ in pairs], [images[b] for _, b in pairs])))

    def write_channel(self, layer: str, c: int, prev, nxt) -> None:
        from ..metrics.examples import example_crops

        m = self.m
        frames = []
        for e in self.epochs:
            src = self.tile(layer, e, c)
            if src is not None:
                frames.append({"epoch": e, "src": src, "label": self.frame_label(e),
                               "check": self.badges.get((layer, e, c))})
        sides = []
        shown = [(self.reference, f"Epoch {self.reference} (before training)")]
        if not self.nothing:
            shown.append((self.last, f"Epoch {self.last}"))
        for e, title in shown:
            exs = m.examples.get((layer, c, e), [])
            crops = example_crops(exs, self.info, m.image_size, tile=112, cache=self._images)
            sides.append({"title": title, "shown": example_items(self.out, exs, crops, f"{safe_name(layer)}-{c:04d}-{e:03d}",
                                                                 lambda ex: f"{ex.value:.3g}")})
        accent = self.accentuation(layer, c)
        own = self.channel_rows.get((layer, c), [])
        history = [{"epoch": r["epoch"], **measure_cells(r)} for r in own]
        last = next((r for r in own if r["epoch"] == self.last), {})
        names = {"weight_change": "weight change", "correlation": "correlation", "drift": "visual drift",
                 "cross_b_on_a": f"epoch {self.last} net on epoch {self.reference} render (B on A)",
                 "cross_a_on_b": f"epoch {self.reference} net on epoch {self.last} render (A on B)"}
        summary = [(names[k], _num(last.get(k))) for k in COLUMNS]
        if last.get("dead"):
            summary[1] = (names["correlation"], "dead: no probe image activates it")
        f = self.facts[layer].channels.get(c) if layer in self.facts else None
        if f is not None and not self.nothing:
            cells = _speed_cells(f)
            summary += [("weights half as far from the reference as at the end by", "–" if f.speed.half_epoch is None
                         else f"epoch {f.speed.half_epoch}"),
                        ("share of the final weight distance reached at the first snapshot after training began",
                         cells["first_share"]),
                        ("its feature (kept / repurposed / died)", cells["fate"]),
                        ("dominant spatial frequency, before → after",
                         f"{_num(f.freq_before)} → {_num(f.freq_after)} cycles/px" if math.isfinite(f.freq_before)
                         else "–"),
                        ("coarsening (before / after frequency)", cells["coarsening"])]
            summary += floor_lines(self.facts[layer].floor, c, last)
        plot = None
        # An atlas gives every channel a page; past a few dozen channels the plots would take
        # longer than the rest of the report, and the table below holds the same numbers.
        many = len(self.chosen.get(layer, [])) > PLOTTED_CHANNELS and c not in self.timeline_channels.get(layer, ())
        if not self.nothing and not many:
            plot = f"img/plots/channel-{safe_name(layer)}-{c:04d}.svg"
            series = {"weight change": "weight_change", "drift": "drift", "correlation": "correlation",
                      "B on A": "cross_b_on_a", "A on B": "cross_a_on_b"}
            plots.channel_history(m.epochs, {k: [r[col] for r in own] for k, col in series.items()}, self.out / plot,
                                  {"correlation": ([r.get("correlation_low") for r in own],
                                                   [r.get("correlation_high") for r in own])})
        self.page(channel_page(layer, c), "channel.html", layer=layer, channel=c, layer_page=layer_page(layer),
                  prev={"channel": prev[1], "page": channel_page(*prev)} if prev else None,
                  next={"channel": nxt[1], "page": channel_page(*nxt)} if nxt else None,
                  frames=frames, summary=summary, examples=sides, rf=m.receptive_field.get(layer, 0),
                  image_size=m.image_size, history=history, plot=plot, accent=accent, **self.change_section(layer, c))

    def change_section(self, layer: str, c: int) -> dict[str, Any]:
        """The channel page's gained/lost pictures and rose/fell examples (None each where it has none)."""
        if self.nothing or (layer, c) not in self.changes:
            return {"change": None, "shifts": None}
        return {"change": change_pictures(self.changes[(layer, c)], self.tile(layer, self.reference, c),
                                          self.tile(layer, self.last, c), self.cached_tile),
                "shifts": shift_section(self.out, self.m, layer, c, self.info, self._images)}

    def accentuation(self, layer: str, c: int) -> dict[str, Any] | None:
        """The channel page's row: the top dataset example as the accentuation starts from it,
        then its accentuation at each snapshot."""
        from ..grid import to_pil
        from ..optvis.accent import load_photo

        a = self.accents.get((layer, c))
        if a is None or not a.tiles:
            return None
        rel = f"img/accent/{safe_name(layer)}-{c:04d}-example.png"
        save_image(self.out / rel, to_pil(load_photo(a.example, a.settings.size)))
        frames = [{"epoch": e, "src": self.cached_tile(a.tiles[e], mark_silent=False), "label": self.frame_label(e)}
                  for e in self.epochs if e in a.tiles]
        return {"example": {"src": rel, "name": f"{a.example.parent.name}/{a.example.name}", "path": str(a.example),
                            "epoch": a.epoch, "value": f"{a.value:.3g}"},
                "frames": frames, "describe": a.settings.describe()}


def tile_badge(check) -> dict[str, str]:
    """A tile's self-check badge (metrics.checks.TileCheck): its mark, class and tooltip."""
    ok = not check.failed
    return {"mark": "✓" if ok else "⚠", "cls": "ok" if ok else "warn", "title": check.describe()}


def _shown_width(path: Path) -> int:
    """Small grids (small renders, few channels) are shown enlarged, up to the page width."""
    from PIL import Image

    with Image.open(path) as im:
        w = im.width
    return min(max(w, min(2 * w, 1100)), 1100) if w < 550 else w


def interval_text(row: dict, column: str) -> str:
    """The bootstrap interval of COLUMN in ROW ("0.912–0.957"), or "–" where it was not computed."""
    low, high = row.get(f"{column}_low"), row.get(f"{column}_high")
    if low is None or high is None or not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return "–"
    return f"{_num(low)}–{_num(high)}"


def interval_level(m) -> str:
    """The level of a RunMetrics' bootstrap intervals, as the pages name it ("95%")."""
    level = m.intervals.level if getattr(m, "intervals", None) is not None else 0.95
    return f"{100 * level:g}%"


def _layer_rows(m, layer: str) -> list[dict]:
    return [r for r in m.layer_rows if r["layer"] == layer]


def _row(rows: list[dict], epoch: int, layer: str) -> dict:
    return next((r for r in rows if r["epoch"] == epoch and r["layer"] == layer), {})


def _text(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "–"
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return "–" if v is None else str(v)
