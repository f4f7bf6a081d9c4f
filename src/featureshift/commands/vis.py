"""`featureshift vis`: what channels of some layers respond to, as one grid image.

Rows are layers, columns channels (several columns per channel with diversity). Every
tile is also written on its own, as OUTPUT_tiles/<layer>_<channel>.png: that folder is the
call's tile cache (`featureshift.jobs.cache.TileCache` with file names), so the tiles are
planned, rendered (here or on Ray) and written by `featureshift.jobs`, as a timeline's are.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

from ..errors import FeatureshiftError
from ..jobs.cache import TileCache, read_tile, write_tile
from ..jobs.executors import JobReport, check_ray, render_tiles
from ..jobs.plan import HeldNetwork, TileRequest, hold_network, plan_jobs
from ..optvis.objectives import LOGITS
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..selection import DEFAULT_COLUMNS, select_channels

NO_RESPONSE_WHY = "no response (the channel is zero for every input)"


@dataclasses.dataclass
class VisResult:
    output: Path  # the grid image
    tiles_dir: Path  # OUTPUT_tiles/, one PNG per image that rendered
    layers: list[str]  # the rows
    channels: list[int]  # the channels of every row
    copies: int  # images per channel (more than one with diversity)
    settings: RenderSettings
    tiles: dict[tuple[str, int, int], Path]  # (layer, channel, copy) -> tile file
    failed: list[tuple[str, int, str]]  # (layer, channel, why) of every render that stopped early (NaN/Inf)
    # (layer, channel) of every channel that does not respond to its input: no picture, marked so
    no_response: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    rendered: int = 0  # channels rendered by this call
    reused: int = 0  # channels whose tiles an earlier call with the same network and settings left

    @property
    def warnings(self) -> list[str]:
        """One line per failed render and per channel without a response, for people."""
        return ([f"{layer} channel {c}: {why}" for layer, c, why in self.failed]
                + [f"{layer} channel {c}: {NO_RESPONSE_WHY}" for layer, c in self.no_response])

    def summary(self) -> str:
        images = len(self.channels) * self.copies
        reused = f"; {self.reused} channel{'s' * (self.reused != 1)} from earlier tiles" if self.reused else ""
        return (f"{self.output}  ({len(self.layers)} layer{'s' * (len(self.layers) != 1)} x {images} images; "
                f"tiles in {self.tiles_dir}{reused})")


def vis(model, layers: str | Sequence[str], output: str | os.PathLike, *, columns: int | None = None,
        channels: str | Sequence[int] | None = None, settings: RenderSettings | None = None,
        weights: str = "imagenet", device: str = "auto", batch_size: int | None = None, labels: bool = True,
        quiet: bool = False, ray: str | None = None, **changes) -> VisResult:
    """Render channels of each of LAYERS of MODEL into the grid image OUTPUT (.png).

    model: a model name (with `weights`: imagenet, random or a weights file), a snapshot
    file, or an nn.Module. layers: names from `featureshift layers`; "logits" is the
    network output (channels = classes, labelled with their names). columns: channels
    0..N-1 (default 5), or channels: a spec like "0-4,17" or a list. settings (a
    RenderSettings) with keyword `changes` to its fields decide the pictures; device and
    batch_size only how they are computed, and ray where (None: here; "auto" or a cluster
    address: on Ray, see `featureshift.jobs.executors`). labels: the layer left of each row and the
    channel above each column.

    Every tile is written to OUTPUT_tiles/ as soon as it is rendered, tagged with its tile
    key (the network's weight checksum, see `jobs.plan.hold_network`, and the settings); a
    later call that finds a tile with the same key reuses it, so a call stopped by a full
    disk renders only what is missing when run again. A render that fails (NaN/Inf) leaves
    a marked gap and is listed in `result.failed`; a channel that is zero for every input is
    drawn as "no response" and listed in `result.no_response`. A file that cannot be written
    raises `featureshift.io.WriteError` (a FeatureshiftError) saying what was saved.
    """
    from ..io import is_write_error, write_error
    from ..network import open_network

    settings = (settings or DEFAULT_SETTINGS).replace(**changes)
    check_ray(ray)
    names, chosen, out = _check_request(layers, columns, channels, output)
    net = open_network(model, weights)
    source = hold_network(net.module, net.meta.checksum if net.meta is not None else None)
    tiles = _VisTiles.plan(source, names, chosen, settings, out.with_name(out.stem + "_tiles"))
    try:
        report = render_tiles(plan_jobs(tiles.requests.values(), tiles.cache, settings=settings), tiles.cache,
                              ray=ray, device=device, batch_size=batch_size, quiet=quiet, show_steps=True)
        shown, silent, failed = tiles.as_shown(report, settings.size)
        _save_grid(out, net.module, names, chosen, settings.copies, shown, labels)
    except OSError as e:
        if not is_write_error(e):
            raise
        saved = sum(1 for key in tiles.keys.values() if key in tiles.cache)
        raise write_error(e, f"{saved} of {len(tiles.keys)} tiles are saved in {tiles.cache.root}; the grid {out} "
                             "was not written",
                          "run the same command again: it reuses the saved tiles and renders only the missing "
                          "ones") from e
    targets = [(name, c) for name in names for c in chosen]
    rendered = len({(r.layer, r.channel) for r, key in tiles.keys.items() if key in report.written})
    return VisResult(out, tiles.cache.root, names, chosen, settings.copies, settings,
                     {where: tiles.cache.path(key) for where, key in tiles.where.items() if key in tiles.cache},
                     failed, [t for t in targets if t in silent], rendered=rendered, reused=len(targets) - rendered)


def _check_request(layers: str | Sequence[str], columns: int | None, channels: str | Sequence[int] | None,
                   output: str | os.PathLike) -> tuple[list[str], list[int], Path]:
    """The rows, the columns and the grid's path, or a FeatureshiftError before anything loads."""
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not names:
        raise FeatureshiftError("Name at least one layer; `featureshift layers MODEL` lists them.")
    # One channel list for every row; each layer's own range is checked by render, which names the layer.
    chosen = select_channels(sys.maxsize, columns=columns, channels=channels, default=DEFAULT_COLUMNS)
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise FeatureshiftError(f"-o {output}: the grid is written as PNG; give a name ending in .png.")
    return names, chosen, out


@dataclasses.dataclass
class _VisTiles:
    """The tiles of one vis call: a request per (layer, channel, copy), kept in OUTPUT_tiles/
    under the names people know (<layer>_<channel>[_<copy>].png)."""

    requests: dict[tuple[str, int, int], TileRequest]
    cache: TileCache
    keys: dict[TileRequest, str]  # request -> tile key
    where: dict[tuple[str, int, int], str]  # (layer, channel, copy) -> tile key

    @classmethod
    def plan(cls, source: HeldNetwork, names: list[str], chosen: list[int], settings: RenderSettings,
             folder: Path) -> "_VisTiles":
        from ..jobs.cache import tile_key

        copies = settings.copies
        requests = {(name, c, k): TileRequest(source, source.checksum, name, c, copy=k)
                    for name in names for c in chosen for k in range(copies)}
        keys = {r: tile_key(r.checksum, r.layer, r.channel, settings, copy=r.copy) for r in requests.values()}
        files = {keys[r]: f"{name}_{c}{f'_{k}' if copies > 1 else ''}.png" for (name, c, k), r in requests.items()}
        return cls(requests, TileCache(folder, files), keys, {w: keys[r] for w, r in requests.items()})

    def as_shown(self, report: JobReport, size: int) -> tuple[dict[tuple[str, int, int], object], set[tuple[str, int]],
                                                             list[tuple[str, int, str]]]:
        """What the grid shows per (layer, channel, copy): an image, NO_RESPONSE or None (failed);
        the silent (layer, channel)s; the failed (layer, channel, why)s. The files follow what
        people see: a channel without response is drawn so, and a failed render leaves no file
        (a later call tries it again)."""
        from ..grid import NO_RESPONSE, no_response_tile

        shown: dict[tuple[str, int, int], object] = {}
        silent: set[tuple[str, int]] = set()
        failed: list[tuple[str, int, str]] = []
        abouts = {}
        for (name, c, k), key in self.where.items():
            image, about = read_tile(self.cache.path(key)) if key not in report.failed else (None, {})
            why = report.failed.get(key) or about.get("failed")
            if why:
                self.cache.path(key).unlink(missing_ok=True)
                failed.append((name, c, why))
                shown[(name, c, k)] = None
                continue
            shown[(name, c, k)], abouts[(name, c, k)] = image, about
            if about.get("no_response"):
                silent.add((name, c))
        for (name, c, k), about in abouts.items():
            if (name, c) in silent:
                key = self.where[(name, c, k)]
                if key in report.written:  # the starting noise is no picture of the channel: its file says so
                    write_tile(self.cache.path(key), no_response_tile(size, size), {**about, "no_response": True})
                shown[(name, c, k)] = NO_RESPONSE
        return shown, silent, failed


def _save_grid(out: Path, module, names: list[str], chosen: list[int], copies: int,
               shown: dict[tuple[str, int, int], object], labels: bool) -> None:
    from ..grid import bands_note, channel_label, make_grid
    from ..io import save_image
    from ..models.info import input_channels

    info = getattr(module, "featureshift_info", None)
    class_names = list(info.class_names) if info is not None else None
    shown_as = bands_note(input_channels(module))  # grayscale, or which bands of a multi-band network
    rows = [[shown[(name, c, k)] for c in chosen for k in range(copies)] for name in names]
    all_logits = all(name == LOGITS for name in names)
    col_labels = []
    for c in chosen:
        base = channel_label(LOGITS if all_logits else "", c, class_names)
        col_labels += [base] if copies == 1 else [f"{c}.{k}{base[len(str(c)):]}" for k in range(copies)]
    grid = make_grid(rows, row_labels=names if labels else None, col_labels=col_labels if labels else None,
                     title=shown_as if labels else None, pad=2 if labels else 0, missing_label="NaN")
    save_image(out, grid)
