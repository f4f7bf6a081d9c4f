from pathlib import Path

import numpy as np
from PIL import Image, ImageFont

from featureshift.grid import (BACKGROUND, MISSING_FILL, NO_RESPONSE, NO_RESPONSE_FILL, channel_label, label_font,
                              label_size, make_grid, to_pil)


def solid(color, w=16, h=16):
    return Image.new("RGB", (w, h), color)


def test_to_pil_accepts_float_uint8_and_pil():
    f = np.zeros((4, 5, 3), np.float32)
    f[0, 0] = [1.0, 0.5, 2.0]  # out of range clips, never wraps
    f[0, 1] = np.nan
    img = to_pil(f)
    assert img.size == (5, 4) and img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 128, 255)
    assert img.getpixel((1, 0)) == (0, 0, 0)
    u = np.full((3, 3), 200, np.uint8)  # grayscale
    assert to_pil(u).getpixel((1, 1)) == (200, 200, 200)
    assert to_pil(Image.new("RGBA", (2, 2))).mode == "RGB"
    chw = np.ones((3, 6, 7), np.float32)
    assert to_pil(chw).size == (7, 6)


def test_grid_places_tiles_in_row_major_order():
    colors = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)]]
    grid = make_grid([[solid(c) for c in row] for row in colors], pad=2)
    assert grid.size == (2 + 2 * 18, 2 + 2 * 18)
    for i, row in enumerate(colors):
        for j, c in enumerate(row):
            assert grid.getpixel((2 + j * 18 + 8, 2 + i * 18 + 8)) == c


def test_missing_tiles_and_rows_are_marked_not_dropped():
    grid = make_grid([[solid((255, 0, 0)), None], [], [solid((0, 0, 255))]], pad=2)
    # Three rows of 16 px stay three rows; the gap and the empty row are filled, not white.
    assert grid.size == (2 + 2 * 18, 2 + 3 * 18)
    assert grid.getpixel((2 + 18 + 1, 2 + 3)) == MISSING_FILL
    assert grid.getpixel((2 + 30, 2 + 18 + 8)) == MISSING_FILL  # the empty row spans every column
    assert grid.getpixel((2 + 18 + 8, 2 + 36 + 8)) == BACKGROUND  # a short row is padded with background


def test_different_tile_sizes_are_padded_never_rejected():
    grid = make_grid([[solid((255, 0, 0), 40, 10)], [solid((0, 255, 0), 10, 30)]], pad=2)
    assert grid.size == (44, 2 + 10 + 2 + 30 + 2)
    assert grid.getpixel((22, 2 + 5)) == (255, 0, 0)
    assert grid.getpixel((22, 14 + 15)) == (0, 255, 0)  # centred in the wider column
    assert grid.getpixel((4, 14 + 15)) == BACKGROUND


def test_labels_and_title_make_room_and_draw_text():
    tiles = [[solid((0, 0, 0))] * 2] * 2
    bare = make_grid(tiles)
    labeled = make_grid(tiles, row_labels=["epoch 0", "epoch 10"], col_labels=["ch 0", "ch 1"], title="features")
    assert labeled.width > bare.width and labeled.height > bare.height
    left = np.asarray(labeled)[:, : labeled.width - bare.width + 2]
    assert (left < 128).any(), "row labels were not drawn"


def test_labels_are_set_in_a_truetype_font_that_grows_with_the_tiles():
    font = label_font(label_size(128))
    assert isinstance(font, ImageFont.FreeTypeFont)
    assert Path(font.path).name == "DejaVuSans.ttf"
    assert label_size(32) == 10 and label_size(128) < label_size(320)
    small = make_grid([[np.zeros((32, 32, 3))]], col_labels=["ch 0"])
    large = make_grid([[np.zeros((320, 320, 3))]], col_labels=["ch 0"])
    assert large.height - 320 > small.height - 32  # a larger header for larger tiles


def test_a_label_wider_than_its_column_is_wrapped_not_overlapping():
    tiles = [[np.zeros((32, 32, 3))] * 2]
    grid = make_grid(tiles, col_labels=["1 American Staffordshire terrier", "2"])
    one_line = make_grid(tiles, col_labels=["1", "2"])
    assert grid.height > one_line.height  # wrapped to more lines
    assert grid.width < 300


def test_class_labels_of_the_output_layer():
    names = ["tench", "goldfish"] + [f"c{i}" for i in range(2, 200)]
    names[130] = "flamingo"
    assert channel_label("logits", 130, names) == "130 flamingo"
    assert channel_label("features.3", 130, names, prefix="ch ") == "ch 130"
    assert channel_label("logits", 1, ["0", "1", "2"], prefix="ch ") == "ch 1"  # a head without names


def test_the_no_response_tile_differs_from_a_missing_one():
    grid = np.asarray(make_grid([[NO_RESPONSE, None]], pad=0))
    assert grid.shape == (64, 128, 3)
    assert (grid[:, :64] == NO_RESPONSE_FILL).all(-1).mean() > 0.5
    assert not (grid[:, 64:] == NO_RESPONSE_FILL).all(-1).any()
