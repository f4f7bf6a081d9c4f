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
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..selection import DEFAULT_COLUMNS, select_channels


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

    @property
    def warnings(self) -> list[str]:
        """One line per failed render, for people."""
        return [f"{layer} channel {c}: {why}" for layer, c, why in self.failed]

    def summary(self) -> str:
        images = len(self.channels) * self.copies
        return (f"{self.output}  ({len(self.layers)} layer{'s' * (len(self.layers) != 1)} x {images} images; "
                f"tiles in {self.tiles_dir})")


def vis(model, layers: str | Sequence[str], output: str | os.PathLike, *, columns: int | None = None,
        channels: str | Sequence[int] | None = None, settings: RenderSettings | None = None,
        weights: str = "imagenet", device: str = "auto", batch_size: int | None = None, labels: bool = True,
        quiet: bool = False, **changes) -> VisResult:
    """Render channels of each of LAYERS of MODEL into the grid image OUTPUT (.png).

    model: a model name (with `weights`: imagenet, random or a weights file), a snapshot
    file, or an nn.Module. layers: names from `featureshift layers`; "logits" is the
    network output (channels = classes). columns: channels 0..N-1 (default 5), or
    channels: a spec like "0-4,17" or a list. settings (a RenderSettings) with keyword
    `changes` to its fields decide the pictures; device and batch_size only how they are
    computed. labels: the layer left of each row and the channel above each column.
    A render that fails (NaN/Inf) leaves a marked gap and is listed in `result.failed`.
    """
    from ..grid import make_grid, to_pil
    from ..io import save_image
    from ..network import open_network
    from ..optvis.engine import render

    settings = (settings or DEFAULT_SETTINGS).replace(**changes)
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not names:
        raise FeatureshiftError("Name at least one layer; `featureshift layers MODEL` lists them.")
    # One channel list for every row; each layer's own range is checked by render, which names the layer.
    chosen = select_channels(sys.maxsize, columns=columns, channels=channels, default=DEFAULT_COLUMNS)
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise FeatureshiftError(f"-o {output}: the grid is written as PNG; give a name ending in .png.")
    module = model if not isinstance(model, (str, os.PathLike)) else open_network(model, weights).module
    result = render(module, [(name, c) for name in names for c in chosen], settings=settings,
                    batch_size=batch_size, device=device, quiet=quiet)
    copies = len(result.targets) // (len(names) * len(chosen))
    tiles_dir = out.with_name(out.stem + "_tiles")
    tiles: dict[tuple[str, int, int], Path] = {}
    rows, i = [], 0
    for name in names:
        row = []
        for c in chosen:
            for k in range(copies):
                ok = i not in result.failed
                row.append(result.images[i] if ok else None)
                if ok:
                    path = tiles[(name, c, k)] = tiles_dir / f"{name}_{c}{f'_{k}' if copies > 1 else ''}.png"
                    save_image(path, to_pil(result.images[i]))
                i += 1
        rows.append(row)
    col_labels = [f"{c}" if copies == 1 else f"{c}.{k}" for c in chosen for k in range(copies)]
    grid = make_grid(rows, row_labels=names if labels else None, col_labels=col_labels if labels else None,
                     pad=2 if labels else 0, missing_label="NaN")
    save_image(out, grid)
    failed = [(*result.targets[j], why) for j, why in result.failed.items()]
    return VisResult(out, tiles_dir, names, chosen, copies, settings, tiles, failed)
