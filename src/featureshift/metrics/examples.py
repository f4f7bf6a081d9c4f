"""Dataset examples: the probe images that activate a channel most, and the crop around
where it fires, like the dataset examples of OpenAI Microscope.

Found from the probe statistics (`probe.probe_stats`), so they cost nothing beyond
the pass over the probe set that the metrics make anyway; shown for two snapshots side
by side they answer "does this neuron still respond to the same things?".
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
    side = int(min(image_size, max(rf, round(image_size * MIN_CROP_FRACTION))))
    out = []
    for i in order:
        row, col = divmod(int(stats.peak_pos[i, channel]), stats.width)
        cx = (col + 0.5) * image_size / stats.width
        cy = (row + 0.5) * image_size / stats.height
        x0 = int(np.clip(round(cx - side / 2), 0, image_size - side))
        y0 = int(np.clip(round(cy - side / 2), 0, image_size - side))
        out.append(Example(int(i), Path(paths[i]), float(peak[i]), (x0, y0, x0 + side, y0 + side)))
    return out


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
