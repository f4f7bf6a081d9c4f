"""Grid images: tiles in rows and columns, with optional labels.

One function assembles every picture featureshift writes (vis sheets, timeline rows
and merged images, merge, compare): tiles of any size, missing tiles drawn as a
marked gap, rows of different widths padded rather than rejected.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MISSING_FILL = (232, 232, 232)
MISSING_MARK = (190, 60, 60)


def to_pil(image) -> Image.Image:
    """An RGB PIL image from a PIL image, a float array in [0, 1] or a uint8 array (HxW, HxWx1/3/4)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    a = np.asarray(image)
    if hasattr(image, "detach"):  # a torch tensor that slipped through
        a = image.detach().cpu().numpy()
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(a)
    return img if img.mode == "RGB" else img.convert("RGB")


def _font():
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _missing_tile(w: int, h: int, label: str) -> Image.Image:
    tile = Image.new("RGB", (max(w, 1), max(h, 1)), MISSING_FILL)
    d = ImageDraw.Draw(tile)
    # A cross plus the word, so a gap is never mistaken for a grey render.
    d.line([(0, 0), (w - 1, h - 1)], fill=MISSING_MARK, width=1)
    d.line([(0, h - 1), (w - 1, 0)], fill=MISSING_MARK, width=1)
    font = _font()
    tw, th = _text_size(d, label, font)
    if label and tw + 4 <= w and th + 4 <= h:
        x, y = max((w - tw) // 2, 0), max((h - th) // 2, 0)
        d.rectangle([x - 2, y - 2, x + tw + 2, y + th + 4], fill=MISSING_FILL)
        d.text((x, y), label, fill=MISSING_MARK, font=font)
    return tile


def make_grid(rows: Sequence[Sequence[np.ndarray | Image.Image | None]],
              row_labels: Sequence[str | None] | None = None,
              col_labels: Sequence[str | None] | None = None,
              title: str | None = None, pad: int = 2, missing_label: str = "missing") -> Image.Image:
    """One image of `rows` of tiles.

    Tiles may have any sizes: each column is as wide as its widest tile and each row as
    tall as its tallest; smaller tiles are centred, short rows are padded. A `None`
    tile (or an empty row) is drawn as a marked gap labelled `missing_label`.
    Row labels go on the left, column labels on top, the title above everything.
    """
    rows = [list(r) for r in rows]
    tiles = [[None if t is None else to_pil(t) for t in r] for r in rows]
    ncols = max((len(r) for r in tiles), default=0)
    present = [t for r in tiles for t in r if t is not None]
    # The size a gap takes when nothing else in its row or column gives one.
    fallback_w = max((t.width for t in present), default=64)
    fallback_h = max((t.height for t in present), default=64)

    col_w = []
    for c in range(max(ncols, 1)):
        ws = [r[c].width for r in tiles if c < len(r) and r[c] is not None]
        col_w.append(max(ws) if ws else fallback_w)
    row_h = []
    for r in tiles:
        hs = [t.height for t in r if t is not None]
        row_h.append(max(hs) if hs else fallback_h)

    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font()
    row_labels = list(row_labels or [])
    col_labels = list(col_labels or [])
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
        draw.text((pad + 2, pad + 2), title, fill=TEXT, font=font)
    x0s, x = [], label_w + pad
    for w in col_w:
        x0s.append(x)
        x += w + pad
    for c, label in enumerate(col_labels[:len(col_w)]):
        if label:
            tw, _ = _text_size(draw, str(label), font)
            draw.text((x0s[c] + max((col_w[c] - tw) // 2, 0), title_h + pad + 2), str(label), fill=TEXT, font=font)

    y = title_h + header_h + pad
    for i, r in enumerate(tiles):
        h = row_h[i]
        if i < len(row_labels) and row_labels[i]:
            _, th = _text_size(draw, str(row_labels[i]), font)
            draw.text((pad + 2, y + max((h - th) // 2, 0)), str(row_labels[i]), fill=TEXT, font=font)
        if not r:  # a whole row missing: one gap across the grid
            span = sum(col_w) + pad * (len(col_w) - 1)
            canvas.paste(_missing_tile(span, h, missing_label), (x0s[0], y))
            y += h + pad
            continue
        for c, tile in enumerate(r):
            w = col_w[c]
            if tile is None:
                tile = _missing_tile(w, h, missing_label)
            canvas.paste(tile, (x0s[c] + (w - tile.width) // 2, y + (h - tile.height) // 2))
        y += h + pad
    return canvas
