"""`featureshift vis`: what channels of some layers respond to, as one grid image.

Rows are layers, columns channels (several columns per channel with diversity). Every
tile is also written on its own, as OUTPUT_tiles/<layer>_<channel>.png.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

from ..errors import FeatureshiftError
from ..jobs.cache import read_tile, tile_key, write_tile
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

    Every tile is written to OUTPUT_tiles/ as soon as it is rendered, tagged with the
    network's weight checksum and the settings; a later call that finds a tile with the
    same tag reuses it, so a call stopped by a full disk renders only what is missing
    when run again. A render that fails (NaN/Inf) leaves a marked gap and is listed in
    `result.failed`; a channel that is zero for every input is drawn as "no response"
    and listed in `result.no_response`. A file that cannot be written raises
    `featureshift.io.WriteError` (a FeatureshiftError) saying what was saved.
    """
    from ..grid import NO_RESPONSE, bands_note, channel_label, make_grid, no_response_tile, to_pil
    from ..models.info import input_channels
    from ..io import is_write_error, save_image, write_error
    from ..network import open_network
    from ..jobs.executors import check_ray, render_network

    settings = (settings or DEFAULT_SETTINGS).replace(**changes)
    check_ray(ray)
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not names:
        raise FeatureshiftError("Name at least one layer; `featureshift layers MODEL` lists them.")
    # One channel list for every row; each layer's own range is checked by render, which names the layer.
    chosen = select_channels(sys.maxsize, columns=columns, channels=channels, default=DEFAULT_COLUMNS)
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise FeatureshiftError(f"-o {output}: the grid is written as PNG; give a name ending in .png.")
    net = open_network(model, weights)
    module, checksum = net.module, net.meta.checksum if net.meta is not None else None
    if not checksum:
        from ..snapshot import state_on_cpu, weights_checksum

        checksum = weights_checksum(state_on_cpu(module))
    info = getattr(module, "featureshift_info", None)
    class_names = list(info.class_names) if info is not None else None
    copies = settings.copies
    tiles_dir = out.with_name(out.stem + "_tiles")
    shown_as = bands_note(input_channels(module))  # grayscale, or which bands of a multi-band network

    def tile_path(name: str, c: int, k: int) -> Path:
        return tiles_dir / f"{name}_{c}{f'_{k}' if copies > 1 else ''}.png"

    targets = [(name, c) for name in names for c in chosen]
    keys = {t: tile_key(checksum, t[0], t[1], settings) for t in targets}
    earlier = {t: _earlier(keys[t], [tile_path(*t, k) for k in range(copies)]) for t in targets}
    todo = [t for t in targets if earlier[t] is None]

    tiles: dict[tuple[str, int, int], Path] = {}
    shown: dict[tuple[str, int, int], object] = {}  # what the grid shows: an image, NO_RESPONSE or None (failed)
    failed: list[tuple[str, int, str]] = []
    silent: list[tuple[str, int]] = []
    for t in targets:
        if earlier[t] is not None:
            for k, (image, about) in enumerate(earlier[t]):
                tiles[(*t, k)] = tile_path(*t, k)
                shown[(*t, k)] = NO_RESPONSE if about.get("no_response") else image
            if earlier[t][0][1].get("no_response"):
                silent.append(t)
    saved = len(tiles)
    try:
        if todo:
            result = render_network(module, todo, settings, ray=ray, batch_size=batch_size, device=device,
                                    quiet=quiet)
            if len(result.targets) != len(todo) * copies:  # the objective decides the copies, not the settings
                raise RuntimeError(f"render returned {len(result.targets)} images for {len(todo)} channels; "
                                   f"expected {copies} each")
            for i, t in enumerate(todo):
                idx = range(i * copies, (i + 1) * copies)
                if any(j in result.no_response for j in idx):
                    silent.append(t)
                for k, j in enumerate(idx):
                    if j in result.failed:
                        failed.append((*t, result.failed[j]))
                        shown[(*t, k)] = None
                        continue
                    quiet_channel = t in silent
                    # The starting noise of a channel without response is no picture of it: its tile says so.
                    size = settings.size
                    image = no_response_tile(size, size) if quiet_channel else to_pil(result.images[j])
                    about = {"key": keys[t], "layer": t[0], "channel": t[1], "copy": k, "checksum": checksum,
                             "score": float(result.scores[j]), "no_response": quiet_channel, **settings.key_fields(),
                             **({"precision_used": result.settings["precision"]} if "precision" in result.settings
                                else {}),
                             **({"shown": shown_as} if shown_as else {})}
                    write_tile(tile_path(*t, k), image, about)
                    tiles[(*t, k)] = tile_path(*t, k)
                    saved += 1
                    shown[(*t, k)] = NO_RESPONSE if quiet_channel else image
        rows = [[shown[(name, c, k)] for c in chosen for k in range(copies)] for name in names]
        all_logits = all(name == LOGITS for name in names)
        col_labels = []
        for c in chosen:
            base = channel_label(LOGITS if all_logits else "", c, class_names)
            col_labels += [base] if copies == 1 else [f"{c}.{k}{base[len(str(c)):]}" for k in range(copies)]
        grid = make_grid(rows, row_labels=names if labels else None, col_labels=col_labels if labels else None,
                         title=shown_as if labels else None, pad=2 if labels else 0, missing_label="NaN")
        save_image(out, grid)
    except OSError as e:
        if not is_write_error(e):
            raise
        total = len(targets) * copies
        raise write_error(e, f"{saved} of {total} tiles are saved in {tiles_dir}; the grid {out} was not written",
                          "run the same command again: it reuses the saved tiles and renders only the missing "
                          "ones") from e
    silent_set = set(silent)
    return VisResult(out, tiles_dir, names, chosen, copies, settings, tiles, failed,
                     [t for t in targets if t in silent_set], rendered=len(todo), reused=len(targets) - len(todo))


def _earlier(key: str, paths: list[Path]):
    """The tiles an earlier call wrote at PATHS for the tile key KEY, as [(image, about)], or None
    when any is missing, unreadable or was rendered from other weights or settings."""
    found = []
    for path in paths:
        try:
            image, about = read_tile(path)
        except (OSError, ValueError):
            return None
        if about.get("key") != key:
            return None
        found.append((image, about))
    return found
