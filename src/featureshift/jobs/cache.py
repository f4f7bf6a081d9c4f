"""The content-addressed tile cache: every render a command keeps is one PNG named by its key.

A key is a hash of everything that decides the tile's pixels (the snapshot's weight
checksum, the layer, the channel, every render setting and the engine version) and of
nothing else, so any command that needs the same picture finds it, a changed setting
never returns a stale one, and a half-finished job resumes where it stopped. Each tile
carries its header in a PNG text chunk: its key, what it shows and the settings' record
(`RenderSettings.to_record`, at the top level; `executors.tile_about` builds every header).
Tiles are written atomically: a tile that exists is whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..io import png_text, save_image
from ..optvis.settings import RenderSettings

TILE_TEXT_KEY = "featureshift-tile"


def tile_key(checksum: str, layer: str, channel: int, settings: RenderSettings, copy: int = 0) -> str:
    """The cache key of one tile: everything that decides its pixels, and nothing else. copy:
    which of the images the settings render per target (the first has the key of a single one)."""
    from ..optvis.engine import ENGINE_VERSION

    fields = {"checksum": checksum, "layer": layer, "channel": int(channel), "engine": ENGINE_VERSION,
              **settings.key_fields()}
    if copy:
        fields["copy"] = int(copy)
    blob = json.dumps(fields, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_tile(path: str | os.PathLike):
    """A cached tile (an RGB PIL image) and what it was rendered with: (image, {settings, checksum, score, ...})."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB"), json.loads(im.info.get(TILE_TEXT_KEY, "{}"))


def read_tile_about(path: str | os.PathLike) -> dict[str, Any]:
    """What a cached tile was rendered with, read from its header without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.info.get(TILE_TEXT_KEY, "{}"))


def tile_settings(path: str | os.PathLike | None) -> RenderSettings | None:
    """The RenderSettings a cached tile was rendered with, from its header; None for no tile, or a
    damaged or headerless one (a caller then leaves that channel out rather than stop)."""
    if path is None:
        return None
    try:
        about = read_tile_about(path)
    except (OSError, ValueError):
        return None
    return RenderSettings.from_record(about) if about else None


def write_tile(path: str | os.PathLike, image, about: dict[str, Any]) -> None:
    """Save IMAGE (a PIL image) atomically at PATH, tagged with ABOUT (stored as JSON)."""
    save_image(path, image, pnginfo=png_text(TILE_TEXT_KEY, about))


@dataclasses.dataclass(frozen=True)
class TileCache:
    """A folder of tiles named `<key>.png`; or, given `names` (key -> file name), a folder that
    people open (vis's OUTPUT_tiles/), its files named by what they show. There a file holds a
    key's tile only when its header names that key: an earlier call with other weights or
    settings leaves another picture under the same name."""

    root: Path
    names: Mapping[str, str] | None = None

    def path(self, key: str) -> Path:
        name = self.names.get(key) if self.names is not None else None
        return Path(self.root) / (name or f"{key}.png")

    def __contains__(self, key: str) -> bool:
        path = self.path(key)
        if self.names is None or key not in self.names:
            return path.exists()
        try:
            return read_tile_about(path).get("key") == key
        except (OSError, ValueError):
            return False

    def write(self, key: str, image, about: dict[str, Any]) -> Path:
        """Store a tile under KEY; returns its path."""
        path = self.path(key)
        write_tile(path, image, about)
        return path
