"""Dataset examples: the probe images that activate a channel most, and the crop around
where it fires, like the dataset examples of OpenAI Microscope.

Found from the probe statistics (`probe.probe_stats`), so they cost nothing beyond
the pass over the probe set that the metrics make anyway; shown for two snapshots side
by side they answer "does this neuron still respond to the same things?", and the images
whose activation rose and fell most between them (`shifted_examples`) what it now responds
to more and what less.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..grid import make_grid
from ..models.layers import blank_input, truncated

MIN_CROP_FRACTION = 1 / 6  # a crop smaller than this of the image shows too little to recognize


@dataclasses.dataclass
class Example:
    index: int  # position in the probe list
    path: Path
    value: float  # the channel's largest activation on the image
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the image as the network saw it (image_size square)


def receptive_field(model: nn.Module, layer: str, image_size: int) -> int:
    """Side in pixels of the input region that drives one position of `layer`: where the
    gradient of the center position, on a noise image, is at least 1% of its largest value."""
    x = torch.randn_like(blank_input(model, image_size, device=next(model.parameters()).device)).requires_grad_(True)
    with truncated(model, [layer]) as net:
        out = net(x)[layer]
    h, w = out.shape[2:]
    (g,) = torch.autograd.grad(out[0, :, h // 2, w // 2].sum(), x)
    g = g.abs().sum(1)[0]
    if not (g > 0).any():
        return image_size
    ys, xs = torch.nonzero(g >= 0.01 * g.max(), as_tuple=True)
    return int(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))


def find_examples(stats, channel: int, k: int, paths: Sequence[Path], image_size: int, rf: int) -> list[Example]:
    """The `k` probe images with the largest activation of `channel` (its spatial maximum), each
    with a square crop of the receptive field around that maximum. Images on which the
    channel does not fire at all are left out."""
    peak = stats.peak[:, channel]
    order = [i for i in np.argsort(-peak, kind="stable")[:k] if peak[i] > 0]
    return [Example(int(i), Path(paths[i]), float(peak[i]), crop_box(stats, int(i), channel, image_size, rf))
            for i in order]


def crop_box(stats, index: int, channel: int, image_size: int, rf: int) -> tuple[int, int, int, int]:
    """The square crop of the receptive field (at least MIN_CROP_FRACTION of the image) around
    where `channel` fires most on probe image `index`, in the image_size square the network saw."""
    side = int(min(image_size, max(rf, round(image_size * MIN_CROP_FRACTION))))
    row, col = divmod(int(stats.peak_pos[index, channel]), stats.width)
    cx = (col + 0.5) * image_size / stats.width
    cy = (row + 0.5) * image_size / stats.height
    x0 = int(np.clip(round(cx - side / 2), 0, image_size - side))
    y0 = int(np.clip(round(cy - side / 2), 0, image_size - side))
    return x0, y0, x0 + side, y0 + side


@dataclasses.dataclass
class ShiftedExample:
    """A probe image whose activation of a channel changed between two snapshots."""
    index: int  # position in the probe list
    path: Path
    before: float  # the channel's largest activation on the image at the earlier snapshot
    after: float  # ... at the later one
    box: tuple[int, int, int, int]  # crop around where it fires: at the later snapshot if it rose, else the earlier

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclasses.dataclass
class ExampleShifts:
    """The probe images on which a channel's activation rose most and fell most, largest change first."""
    rose: list[ShiftedExample]
    fell: list[ShiftedExample]


def shifted_examples(before, after, channel: int, k: int, paths: Sequence[Path], image_size: int,
                     rf: int) -> ExampleShifts:
    """The `k` probe images on which the largest activation of `channel` (its spatial maximum, as
    for `find_examples`) rose most from the LayerStats `before` to `after`, and the `k` on which
    it fell most. An image whose activation did not change is in neither; the crop is where the
    channel fires where it fires more: at `after` for a rise, at `before` for a fall."""
    a = before.peak[:, channel].astype(np.float64)
    b = after.peak[:, channel].astype(np.float64)
    delta = b - a

    def pick(order, stats) -> list[ShiftedExample]:
        return [ShiftedExample(int(i), Path(paths[i]), float(a[i]), float(b[i]),
                               crop_box(stats, int(i), channel, image_size, rf)) for i in order]

    rose = [i for i in np.argsort(-delta, kind="stable")[:k] if delta[i] > 0]
    fell = [i for i in np.argsort(delta, kind="stable")[:k] if delta[i] < 0]
    return ExampleShifts(pick(rose, after), pick(fell, before))


def probe_image(path: str | Path, info, image_size: int) -> Image.Image:
    """The probe image as the network saw it: the model's own resize and center crop (RGB; a
    grayscale network's image in gray, a multi-band one's first three bands)."""
    from ..data import eval_transform, open_image
    from ..grid import to_pil

    t = eval_transform(info, image_size)(open_image(path, channels=getattr(info, "in_chans", 3)))
    t = t * torch.tensor(info.std).view(-1, 1, 1) + torch.tensor(info.mean).view(-1, 1, 1)
    return to_pil(t.clamp(0, 1).permute(1, 2, 0).numpy())


def example_crops(examples: Sequence[Example], info, image_size: int, tile: int = 96,
                  cache: dict | None = None) -> list[tuple[Image.Image, Image.Image]]:
    """(whole image with the crop outlined, the crop) for each example, `tile` px square.

    cache: a dict kept between calls, so an image shown for many channels is decoded once."""
    from PIL import ImageDraw

    cache = {} if cache is None else cache
    out = []
    for ex in examples:
        key = (str(ex.path), image_size)
        if key not in cache:
            cache[key] = probe_image(ex.path, info, image_size)
        image = cache[key]
        crop = image.crop(ex.box).resize((tile, tile), Image.Resampling.LANCZOS)
        whole = image.copy()
        ImageDraw.Draw(whole).rectangle(ex.box, outline=(255, 60, 60), width=max(1, image_size // 96))
        out.append((whole.resize((tile, tile), Image.Resampling.LANCZOS), crop))
    return out


def examples_sheet(before: Sequence[Example], after: Sequence[Example], info, image_size: int,
                   labels: tuple[str, str] = ("before", "after"), tile: int = 96, title: str | None = None
                   ) -> Image.Image:
    """Before and after side by side: a row of crops for each snapshot, best first."""
    rows = [[c for _, c in example_crops(before, info, image_size, tile)],
            [c for _, c in example_crops(after, info, image_size, tile)]]
    return make_grid(rows, row_labels=list(labels), col_labels=[f"#{i + 1}" for i in range(max(map(len, rows)))],
                     title=title, missing_label="none")
