"""Grid images: tiles in rows and columns, with optional labels.

One function assembles every picture featureshift writes (vis sheets, timeline rows
and merged images, merge, compare): tiles of any size, missing tiles drawn as a
marked gap, channels that do not respond drawn as their own kind of tile, rows of
different widths padded rather than rejected. Labels are set in DejaVu Sans (shipped
with matplotlib) at a size that grows with the tiles.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MISSING_FILL = (232, 232, 232)
MISSING_MARK = (190, 60, 60)
NO_RESPONSE_FILL = (222, 228, 238)
NO_RESPONSE_MARK = (70, 90, 130)
NO_RESPONSE_LABEL = "no response"
SMALLEST_FONT = 10  # px: smaller labels are hard to read on screen
LARGEST_FONT = 32


class _NoResponse:
    """The tile of a channel that does not respond to its input (see NO_RESPONSE)."""

    def __repr__(self) -> str:
        return "NO_RESPONSE"


# Put in place of a tile: a channel that is zero for every input has no picture, and a
# grey square would read as one. Drawn flat blue-grey with a bar and "no response".
NO_RESPONSE = _NoResponse()


def channel_label(layer: str, channel: int, class_names: Sequence[str] | None = None, prefix: str = "") -> str:
    """The label of CHANNEL of LAYER: "130 flamingo" for a class of the output layer ('logits')
    whose name is known, else PREFIX + the channel number ("ch 130")."""
    if layer == "logits" and class_names and 0 <= channel < len(class_names):
        name = str(class_names[channel]).strip()
        if name and name != str(channel):  # a head without names calls its classes "0", "1", ...
            return f"{channel} {name}"
    return f"{prefix}{channel}"


def to_pil(image) -> Image.Image:
    """An RGB PIL image from a PIL image, a float array in [0, 1] or a uint8 array (HxW, HxWxC).

    One channel is shown as gray; more than three (the bands of a multi-band network) as their first
    three in RGB (`bands_note` says so in words)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    a = np.asarray(image)
    if hasattr(image, "detach"):  # a torch tensor that slipped through
        a = image.detach().cpu().numpy()
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] > 3:  # a multi-band image: its first three bands, as RGB
        a = a[..., :3]
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(a)
    return img if img.mode == "RGB" else img.convert("RGB")


def bands_note(channels: int) -> str | None:
    """What a picture of a CHANNELS-band network shows, for its label: None for RGB."""
    if channels == 1:
        return "grayscale (1 input channel)"
    if channels > 3:
        return f"bands 1-3 of {channels} shown as RGB"
    return None


def font_path() -> Path | None:
    """DejaVu Sans as installed with matplotlib, found without importing matplotlib (slow)."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=32)
def label_font(size: int = SMALLEST_FONT):
    """The label font at SIZE px: DejaVu Sans, else Pillow's own font at that size."""
    path = font_path()
    if path is not None:
        try:
            return ImageFont.truetype(str(path), size)
        except OSError:
            pass
    return ImageFont.load_default(size)


def label_size(tile_side: int) -> int:
    """Label size in px for tiles of about TILE_SIDE px: a tenth of it, within readable bounds."""
    return int(min(max(round(tile_side / 10), SMALLEST_FONT), LARGEST_FONT))


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    # The extent from the drawing origin, which is what placing the text needs: a TrueType
    # font's ink starts below the origin by a few pixels.
    _, _, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right, bottom


def _centred_label(d: ImageDraw.ImageDraw, w: int, h: int, label: str, size: int, fill, background) -> None:
    """LABEL in the middle of a W x H tile: at SIZE, else on two lines, else smaller; left out if nothing fits."""
    if not label:
        return
    texts = [label] + ([label.replace(" ", "\n", 1)] if " " in label else [])
    for s in range(size, 5, -1):
        font = label_font(s)
        for text in texts:
            tw, th = _text_size(d, text, font)
            if tw + 4 <= w and th + 4 <= h:
                x, y = max((w - tw) // 2, 0), max((h - th) // 2, 0)
                d.rectangle([x - 2, y - 2, x + tw + 2, y + th + 4], fill=background)
                d.multiline_text((x, y), text, fill=fill, font=font, align="center")
                return


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """TEXT with each of its lines broken at spaces so that they fit WIDTH px where words allow."""
    out = []
    for line in text.split("\n"):
        words, current = line.split(" "), ""
        for word in words:
            trial = f"{current} {word}" if current else word
            if current and _text_size(draw, trial, font)[0] > width:
                out.append(current)
                current = word
            else:
                current = trial
        out.append(current)
    return "\n".join(out)


def _missing_tile(w: int, h: int, label: str, size: int = SMALLEST_FONT) -> Image.Image:
    tile = Image.new("RGB", (max(w, 1), max(h, 1)), MISSING_FILL)
    d = ImageDraw.Draw(tile)
    # A cross plus the word, so a gap is never mistaken for a grey render.
    d.line([(0, 0), (w - 1, h - 1)], fill=MISSING_MARK, width=1)
    d.line([(0, h - 1), (w - 1, 0)], fill=MISSING_MARK, width=1)
    _centred_label(d, w, h, label, size, MISSING_MARK, MISSING_FILL)
    return tile


def no_response_tile(w: int, h: int, size: int = SMALLEST_FONT) -> Image.Image:
    """The tile of a channel that does not respond: flat blue-grey, a bar across the middle and
    "no response", unlike both a render and a missing tile (grey with a red cross)."""
    tile = Image.new("RGB", (max(w, 1), max(h, 1)), NO_RESPONSE_FILL)
    d = ImageDraw.Draw(tile)
    d.rectangle([0, 0, w - 1, h - 1], outline=NO_RESPONSE_MARK, width=1)
    d.line([(0, h // 2), (w - 1, h // 2)], fill=NO_RESPONSE_MARK, width=max(1, h // 32))
    _centred_label(d, w, h, NO_RESPONSE_LABEL, size, NO_RESPONSE_MARK, NO_RESPONSE_FILL)
    return tile


def make_grid(rows: Sequence[Sequence[np.ndarray | Image.Image | None]],
              row_labels: Sequence[str | None] | None = None,
              col_labels: Sequence[str | None] | None = None,
              title: str | None = None, pad: int = 2, missing_label: str = "missing",
              font_size: int | None = None) -> Image.Image:
    """One image of `rows` of tiles.

    Tiles may have any sizes: each column is as wide as its widest tile and each row as
    tall as its tallest; smaller tiles are centred, short rows are padded. A `None`
    tile (or an empty row) is drawn as a marked gap labelled `missing_label`; a
    `NO_RESPONSE` tile as a channel that does not respond. Row labels go on the left,
    column labels on top, the title above everything, in DejaVu Sans at `font_size`
    px (default: a tenth of the largest tile side, at least 10 px).
    """
    tiles = [[t if t is None or t is NO_RESPONSE else to_pil(t) for t in r] for r in rows]
    present = [t for r in tiles for t in r if isinstance(t, Image.Image)]
    cells = _cell_sizes(tiles, present)
    col_w, row_h = cells.col_w, cells.row_h

    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if font_size is None:
        font_size = label_size(max((min(t.width, t.height) for t in present), default=0))
    font = label_font(font_size)
    row_labels = list(row_labels or [])
    # A column label wider than its column is wrapped at spaces; what still does not fit widens the column.
    col_labels = [None if not l else _wrap(scratch, str(l), font, col_w[c] if c < len(col_w) else cells.fallback_w)
                  for c, l in enumerate(col_labels or [])]
    for c, l in enumerate(col_labels[:len(col_w)]):
        if l:
            col_w[c] = max(col_w[c], _text_size(scratch, l, font)[0])
    label_w = max((_text_size(scratch, str(l), font)[0] for l in row_labels if l), default=0)
    label_w = label_w + 2 * pad + 4 if label_w else 0
    header_h = max((_text_size(scratch, str(l), font)[1] for l in col_labels if l), default=0)
    header_h = header_h + 2 * pad + 4 if header_h else 0
    title_h = _text_size(scratch, title, font)[1] + 2 * pad + 6 if title else 0

    width = label_w + sum(col_w) + pad * (len(col_w) + 1)
    height = title_h + header_h + sum(row_h) + pad * (len(row_h) + 1)
    if title:
        width = max(width, _text_size(scratch, title, font)[0] + 2 * pad + 4)
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    if title:
        draw.multiline_text((pad + 2, pad + 2), title, fill=TEXT, font=font)
    x = label_w + pad
    for w in col_w:
        cells.x0s.append(x)
        x += w + pad
    for c, label in enumerate(col_labels[:len(col_w)]):
        if label:
            tw, _ = _text_size(draw, str(label), font)
            draw.multiline_text((cells.x0s[c] + max((col_w[c] - tw) // 2, 0), title_h + pad + 2), str(label),
                                fill=TEXT, font=font, align="center")
    _paste_rows(canvas, tiles, cells, row_labels, top=title_h + header_h + pad, pad=pad, font_size=font_size,
                missing_label=missing_label)
    return canvas


@dataclasses.dataclass
class _Cells:
    """Where a grid's tiles go: each column's width and left edge, each row's height."""
    col_w: list[int]  # widened where a column label needs it
    gap_w: list[int]  # a gap is as wide as the column's tiles, not its label
    row_h: list[int]
    fallback_w: int  # the size a gap takes when nothing else in its row or column gives one
    x0s: list[int] = dataclasses.field(default_factory=list)


def _cell_sizes(tiles: list[list], present: list[Image.Image]) -> _Cells:
    """Each column as wide as its widest tile and each row as tall as its tallest."""
    ncols = max((len(r) for r in tiles), default=0)
    fallback_w = max((t.width for t in present), default=64)
    fallback_h = max((t.height for t in present), default=64)
    col_w = []
    for c in range(max(ncols, 1)):
        ws = [r[c].width for r in tiles if c < len(r) and isinstance(r[c], Image.Image)]
        col_w.append(max(ws) if ws else fallback_w)
    row_h = []
    for r in tiles:
        hs = [t.height for t in r if isinstance(t, Image.Image)]
        row_h.append(max(hs) if hs else fallback_h)
    return _Cells(col_w=col_w, gap_w=list(col_w), row_h=row_h, fallback_w=fallback_w)


def _paste_rows(canvas: Image.Image, tiles: list[list], cells: _Cells, row_labels: list, *, top: int, pad: int,
                font_size: int, missing_label: str) -> None:
    """Each row's label and tiles, from TOP down: smaller tiles centred in their cell, gaps marked."""
    draw = ImageDraw.Draw(canvas)
    font = label_font(font_size)
    y = top
    for i, r in enumerate(tiles):
        h = cells.row_h[i]
        if i < len(row_labels) and row_labels[i]:
            _, th = _text_size(draw, str(row_labels[i]), font)
            draw.multiline_text((pad + 2, y + max((h - th) // 2, 0)), str(row_labels[i]), fill=TEXT, font=font)
        if not r:  # a whole row missing: one gap across the grid
            span = sum(cells.col_w) + pad * (len(cells.col_w) - 1)
            canvas.paste(_missing_tile(span, h, missing_label, font_size), (cells.x0s[0], y))
            y += h + pad
            continue
        for c, tile in enumerate(r):
            w = cells.col_w[c]
            if tile is None:
                tile = _missing_tile(cells.gap_w[c], h, missing_label, font_size)
            elif tile is NO_RESPONSE:
                tile = no_response_tile(cells.gap_w[c], h, font_size)
            canvas.paste(tile, (cells.x0s[c] + (w - tile.width) // 2, y + (h - tile.height) // 2))
        y += h + pad
