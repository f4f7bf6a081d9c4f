"""`featureshift compare-runs RUN1 RUN2 ...`: the paper's measures side by side for runs that
differ in one setting (the images per class, the cutoff, ...), with that setting named.

Each run's measures come from its RUN/metrics/ (written by `featureshift report`) and, for
the spatial scale, from its atlas (RUN/atlas.json and the tile cache): nothing is rendered
again. A run whose report was never built gets its layer measures computed (and written to
RUN/metrics/, as the report would) from its snapshots.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import FeatureshiftError
from ..metrics.adaptation import Reuse, Speed, layer_speed
from ..metrics.answers import analyse_layer

# Settings that never make two runs different experiments: where the run was written and how
# its images were decoded. How it computed (device, processes, precision) is named, since it
# changes the numbers: two processes see half batches each, float16 rounds otherwise.
IGNORED_SETTINGS = {"out", "force", "resume", "quiet", "workers", "tensorboard", "created", "updated",
                    "device", "amp", "channels_last"}


@dataclasses.dataclass
class MeasuredRun:
    """What RUN/metrics/ holds, in the shape the adaptation measures read (see RunMetrics)."""

    run_dir: Path
    epochs: list[int]
    reference: int
    layer_rows: list[dict[str, Any]]
    channel_rows: list[dict[str, Any]]
    floors: dict[str, Any] = dataclasses.field(default_factory=dict)  # layer -> metrics.floors.NoiseFloor

    def layer_series(self, layer: str, column: str) -> list[tuple[int, float]]:
        return [(r["epoch"], r[column]) for r in self.layer_rows if r["layer"] == layer]

    def channel_table(self, layer: str, epoch: int) -> list[dict]:
        return [r for r in self.channel_rows if r["layer"] == layer and r["epoch"] == epoch]


def _read_csv(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            out: dict[str, Any] = {}
            for k, v in r.items():
                if k == "layer":
                    out[k] = v
                elif k in ("epoch", "channel", "dead"):
                    out[k] = int(v) if v not in ("", None) else 0
                else:
                    out[k] = float(v) if v not in ("", None) else math.nan
            rows.append(out)
    return rows


def read_measures(run_dir: str | os.PathLike, quiet: bool = True) -> MeasuredRun:
    """A run's measures from RUN/metrics/layers.csv and channels.csv; where the run has none yet
    (no report was built), its layer measures are computed from its snapshots first."""
    run_dir = Path(run_dir)
    folder = run_dir / "metrics"
    layers, channels = folder / "layers.csv", folder / "channels.csv"
    if not layers.is_file():
        from ..metrics.driver import run_metrics

        if not quiet:
            print(f"featureshift: {run_dir} has no report yet; measuring its snapshots (layer measures only: "
                  f"`featureshift report {run_dir}` adds the rendered channels)", file=sys.stderr)
        run_metrics(run_dir, quiet=quiet)
    layer_rows = _read_csv(layers)
    channel_rows = _read_csv(channels) if channels.is_file() else []
    epochs = sorted({r["epoch"] for r in layer_rows})
    if not epochs:
        raise FeatureshiftError(f"{layers} holds no measures; build the report of {run_dir} again.")
    return MeasuredRun(run_dir, epochs, epochs[0], layer_rows, channel_rows, read_floors(folder / "summary.json"))


def read_floors(summary: Path) -> dict[str, Any]:
    """The render-noise floors summary.json records (none for a run measured without them)."""
    from ..metrics.floors import floor_from_record

    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return {}
    layers = ((data.get("floors") or {}).get("layers") or {}) if isinstance(data, dict) else {}
    return {l: floor_from_record(l, rec) for l, rec in layers.items() if isinstance(rec, dict)}


def run_settings(run: dict[str, Any]) -> dict[str, Any]:
    """The settings of a run (run.json) that make it an experiment: its config, and the
    training images per class its dataset had."""
    out = {k: v for k, v in (run.get("config") or {}).items() if k not in IGNORED_SETTINGS}
    # runs made before the scale existed trained every layer at lr (see train's --pretrained-lr-scale)
    out.setdefault("pretrained_lr_scale", 1.0)
    out["device"] = str(run.get("device") or "?").split(":")[0]
    out["processes"] = run.get("processes", 1)
    out["precision"] = run.get("amp") or "float32"
    counts = (run.get("dataset") or {}).get("counts") or {}
    train = [c.get("train") for c in counts.values() if isinstance(c, dict) and isinstance(c.get("train"), int)]
    if train:
        out["training images per class"] = min(train) if min(train) == max(train) else f"{min(train)}-{max(train)}"
    return out


@dataclasses.dataclass
class RunColumn:
    """One run's column of the comparison."""

    run_dir: Path
    settings: dict[str, Any]
    final_acc: float | None
    speed: dict[str, Speed]  # layer -> speed of adaptation (its weight change)
    reuse: dict[str, Reuse]  # channel-measured layer -> fates of its channels
    coarsening: dict[str, float]  # atlased layer -> geometric mean coarsening


@dataclasses.dataclass
class CompareRunsResult:
    runs: list[RunColumn]
    differs: dict[str, list[Any]]  # setting -> its value in each run, for the settings that differ
    layers: list[str]  # layers measured in every run

    def rows(self) -> list[tuple[str, list[str]]]:
        """(measure, value in each run): the table, settings that differ first."""
        out: list[tuple[str, list[str]]] = [("run", [r.run_dir.name for r in self.runs])]
        for k, values in self.differs.items():
            out.append((f"setting: {k}", [_text(v) for v in values]))
        out.append(("final validation accuracy", [_pct(r.final_acc, 1) for r in self.runs]))
        for layer in self.layers:
            out.append((f"{layer}: half of the change by epoch",
                        [_text(r.speed[layer].half_epoch) if layer in r.speed else "–" for r in self.runs]))
            out.append((f"{layer}: change in the first epoch",
                        [_pct(r.speed[layer].first_share) if layer in r.speed else "–" for r in self.runs]))
            if any(layer in r.reuse and r.reuse[layer].measured for r in self.runs):
                for fate in ("kept", "repurposed", "died"):
                    out.append((f"{layer}: {fate}", [_pct(r.reuse[layer].share(fate)) if layer in r.reuse else "–"
                                                    for r in self.runs]))
            if any(math.isfinite(r.coarsening.get(layer, math.nan)) for r in self.runs):
                out.append((f"{layer}: coarsening", [_num(r.coarsening.get(layer, math.nan)) for r in self.runs]))
        return out

    def table(self) -> str:
        """The comparison as aligned text, one column per run."""
        rows = self.rows()
        widths = [max(len(r[0]) for r in rows)] + [max(len(r[1][i]) for r in rows) for i in range(len(self.runs))]
        lines = []
        if self.differs:
            lines.append("The runs differ in: " + ", ".join(self.differs) + ".")
            if len(self.differs) > 1:
                lines.append("(more than one setting differs: a difference in the measures has more than one cause)")
        else:
            lines.append("The runs have the same settings.")
        for name, values in rows:
            lines.append("  ".join([name.ljust(widths[0])] + [v.rjust(w) for v, w in zip(values, widths[1:])]))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": [str(r.run_dir) for r in self.runs], "differs": {k: list(map(_text, v)) for k, v in
                                                                        self.differs.items()},
                "table": [[name, *values] for name, values in self.rows()]}


def _text(v) -> str:
    return "–" if v is None else str(v)


def _pct(v, digits: int = 0) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}%"


def _num(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def compare_runs(run_dirs: Sequence[str | os.PathLike], *, output: str | os.PathLike | None = None,
                 quiet: bool = False) -> CompareRunsResult:
    """Set the measures of RUN_DIRS side by side and name the settings in which they differ.

    Per run: the final validation accuracy; per layer measured in every run, the speed of
    adaptation, the shares of kept / repurposed / died channels (where renders exist) and
    the coarsening of an atlased layer. A run without a report (RUN/metrics/) is measured from
    its snapshots first (layer measures only). output: also write the table to a .json, or as text to any other file.
    """
    from ..io import write_json, write_text
    from ..run import read_metrics, read_run
    from .atlas import atlas_tiles

    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise FeatureshiftError("Give at least two runs to compare.")
    runs = []
    for d in dirs:
        run = read_run(d)
        m = read_measures(d, quiet=quiet)
        accs = [r["val_acc"] for r in read_metrics(d) if isinstance(r.get("val_acc"), (int, float))]
        # the report's own answers (metrics.answers), from the same measures and the atlas's renders
        tiles = atlas_tiles(d)
        facts = {l: analyse_layer(m, l, tiles) for l in sorted({r["layer"] for r in m.channel_rows})}
        speeds = {l: layer_speed(m, l) for l in dict.fromkeys(r["layer"] for r in m.layer_rows)}
        runs.append(RunColumn(d, run_settings(run), accs[-1] if accs else None, speeds,
                              {l: f.reuse for l, f in facts.items()},
                              {l: f.coarsening for l, f in facts.items() if f.scale_pairs}))
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    differs = {k: [r.settings.get(k) for r in runs] for k in keys
               if len({repr(r.settings.get(k)) for r in runs}) > 1}
    # The layers measured channel by channel in every run (those the reports looked at closely),
    # else every layer measured in all of them.
    common = [l for l in runs[0].reuse if all(l in r.reuse for r in runs[1:])] or \
        [l for l in runs[0].speed if all(l in r.speed for r in runs[1:])]
    result = CompareRunsResult(runs, differs, common)
    if output is not None:
        out = Path(output)
        if out.suffix.lower() == ".json":
            write_json(out, result.to_dict())
        else:
            write_text(out, result.table() + "\n")
    return result
