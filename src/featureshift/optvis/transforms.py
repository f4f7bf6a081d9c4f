"""Lucid's random transforms, drawn per image and applied to the whole batch at once.

Pad, jitter, scale, rotate and jitter again compose into one affine map per image, so a
batch is resampled with one `grid_sample` (no Python loop over images). A second bilinear
resampling at a random sub-pixel offset follows, as Lucid resamples twice (scale, then
rotate): measured, it is what keeps a picture's activation under small shifts, scalings
and rotations (96-99% with it, 83-89% with the single resampling; docs/render.md). Each image's
draws come from its own generator: an image sees the same sequence of transforms whatever
else shares its batch.

Lucid changes the network's input size with the scale; here the output size is fixed at
Lucid's average (size + 2*pad - jitter - jitter2, e.g. 140 px for 128), so the content is
magnified by the drawn scale exactly as in Lucid while a batch keeps one shape.
"""
from __future__ import annotations

# torch loads inside the methods: the CLI reads these defaults without loading torch.

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the annotations only
    import torch


DEFAULT_SCALES = tuple(1 + (i - 5) / 50 for i in range(11))
DEFAULT_ANGLES = tuple(float(a) for a in range(-10, 11)) + (0.0,) * 5  # 0 weighted 6 times


@dataclasses.dataclass(frozen=True)
class Transforms:
    """Per-step random transforms (Lucid's `standard_transforms`); every value settable."""
    pad: int = 12
    pad_value: float = 0.5
    jitter: int = 8
    scales: tuple[float, ...] = DEFAULT_SCALES
    angles: tuple[float, ...] = DEFAULT_ANGLES  # degrees
    jitter2: int = 4
    # The second resampling's offset: uniform in +-resample_shift px (0: one resampling only).
    # Bilinear interpolation twice low-passes the image and its gradient, so the optimization
    # cannot build detail that excites the network at one exact pixel alignment only.
    resample_shift: float = 0.5

    @classmethod
    def none(cls) -> "Transforms":
        """No transforms at all: the network sees the canvas as it is."""
        return cls(pad=0, jitter=0, scales=(1.0,), angles=(0.0,), jitter2=0, resample_shift=0.0)

    def output_size(self, size: int) -> int:
        return size + 2 * self.pad - self.jitter - self.jitter2

    def draw(self, generator: torch.Generator, steps: int) -> torch.Tensor:
        """(steps, 6) indices: jitter x, y; scale index; angle index; jitter2 x, y.

        Row i is step i's draw whatever the number of steps (a shorter render sees the
        start of a longer one's sequence)."""
        import torch

        u = torch.rand((steps, 6), generator=generator, dtype=torch.float64)
        high = torch.tensor([self.jitter + 1] * 2 + [len(self.scales), len(self.angles)] + [self.jitter2 + 1] * 2,
                            dtype=torch.float64)
        return (u * high).floor().to(torch.int32).minimum(high.to(torch.int32) - 1)

    def draw_offsets(self, generator: torch.Generator, steps: int) -> torch.Tensor:
        """(steps, 2) offsets of the second resampling in output pixels, uniform in +-resample_shift.

        Row i is step i's offset whatever the number of steps (give it a generator of its own)."""
        import torch

        return (torch.rand((steps, 2), generator=generator, dtype=torch.float64) * 2 - 1) * self.resample_shift

    def theta(self, draws: torch.Tensor, size: int) -> torch.Tensor:
        """(B, 2, 3) affine matrices for `F.affine_grid` (output -> canvas, normalized coordinates)."""
        import torch

        d = draws.double()
        scales = torch.tensor(self.scales, dtype=torch.float64)[draws[:, 2].long()]
        angles = torch.tensor(self.angles, dtype=torch.float64)[draws[:, 3].long()] * (math.pi / 180)
        t1 = d[:, 0:2] - self.jitter / 2  # crop offset on the padded canvas, in canvas pixels
        t2 = d[:, 4:6] - self.jitter2 / 2  # crop offset after scale and rotation, in output pixels
        cos, sin = torch.cos(angles), torch.sin(angles)
        inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / scales[:, None, None]
        shift = (inv @ t2[:, :, None])[:, :, 0] + t1
        out = self.output_size(size)
        return torch.cat([inv * (out / size), (shift * (2 / size))[:, :, None]], dim=2).float()

    def apply(self, images: torch.Tensor, theta: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Transform (B, 3, S, S) images with their own matrices (B, 2, 3) from `theta` -> (B, 3, S', S'),
        then, given OFFSETS (B, 2) from `draw_offsets`, resample once more shifted by them."""
        import torch.nn.functional as F

        if self == Transforms.none():
            return images
        grid = affine_grid(theta, self.output_size(images.shape[-1]))
        # grid_sample pads with zeros; shift so that the padding is pad_value
        x = F.grid_sample(images - self.pad_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if offsets is not None and self.resample_shift:
            x = subpixel_shift(x, offsets.to(x))
        return x + self.pad_value


@dataclasses.dataclass
class TransformDraws:
    """The random transforms of a chunk of images: `draws[:, step]` is one step's."""
    thetas: torch.Tensor  # (n, steps, 2, 3) from Transforms.theta, or (n, 2, 3) for one step
    offsets: torch.Tensor  # (n, steps, 2) from Transforms.draw_offsets, or (n, 2)

    def __getitem__(self, index) -> "TransformDraws":
        return TransformDraws(self.thetas[index], self.offsets[index])

    def apply(self, transforms: Transforms, images: torch.Tensor) -> torch.Tensor:
        """IMAGES transformed by one step's draws (see Transforms.apply)."""
        return transforms.apply(images, self.thetas, self.offsets)


def draw_transforms(transforms: Transforms, generators, steps: int, size: int, device) -> TransformDraws:
    """Every step's transforms for each image of a SIZE px canvas, from the image's own generator;
    the sub-pixel offsets from a second generator seeded from the first, so that neither
    sequence depends on the other's length."""
    import torch

    n = len(generators)
    draws = torch.stack([transforms.draw(g, steps) for g in generators])  # (n, steps, 6)
    thetas = transforms.theta(draws.reshape(-1, 6), size).view(n, steps, 2, 3)
    offsets = torch.stack([transforms.draw_offsets(torch.Generator().manual_seed(g.initial_seed() ^ OFFSET_STREAM),
                                                   steps) for g in generators]).float()
    return TransformDraws(thetas.to(device), offsets.to(device))


OFFSET_STREAM = 0x9E3779B9  # seeds the offsets' generator from the transforms' own seed


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """`F.affine_grid(theta, (B, C, size, size), align_corners=False)` as two broadcast multiply-adds:
    the same grid (to float rounding) in a fifth of the time, which matters once per step."""
    import torch

    c = (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1  # pixel centers
    x, y = c[None, None, :], c[None, :, None]
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    return (t[:, :, 0] * x + t[:, :, 1] * y + t[:, :, 2]).permute(0, 2, 3, 1)


def subpixel_shift(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images read at (x + dx, y + dy) by bilinear interpolation, zero outside, with
    OFFSETS (B, 2) = (dx, dy) in pixels, each in (-1, 1).

    The same as `grid_sample` with a translation, but as one depthwise 3x3 convolution whose
    kernel holds each image's bilinear weights: its backward costs a fraction of grid_sample's
    (or of the same weights applied as shifted slices) on a CPU."""
    import torch
    import torch.nn.functional as F

    def taps(d):  # the weights of the pixels at -1, 0, +1
        a, below = d.abs(), (d < 0).to(d.dtype)
        return torch.stack([below * a, 1 - a, (1 - below) * a], 1)

    b, c, h, w = images.shape
    kernel = taps(offsets[:, 1])[:, :, None] * taps(offsets[:, 0])[:, None, :]  # (B, 3, 3): rows y, columns x
    kernel = kernel[:, None].expand(b, c, 3, 3).reshape(b * c, 1, 3, 3)
    return F.conv2d(images.reshape(1, b * c, h, w), kernel, padding=1, groups=b * c).view(b, c, h, w)


VIEW_COUNT = 4  # fixed views per image in the transformed-views measure
VIEW_SHIFT, VIEW_SCALES, VIEW_ANGLE = 8, (0.9, 1.1), 10.0  # px, factor range, degrees


def fixed_views(images: torch.Tensor, count: int = VIEW_COUNT, seed: int = 0) -> list[torch.Tensor]:
    """COUNT fixed random views of (B, C, S, S) images: each a shift of up to VIEW_SHIFT px, a scale
    in VIEW_SCALES and a rotation of up to VIEW_ANGLE degrees, the same for every image, in one
    bilinear resampling reflected at the border. Seeded: the same views on every call, so that two
    pictures measured with them are measured alike (the benchmarks' time to quality, and the
    report's self-checks)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    low, high = VIEW_SCALES
    out = []
    for dx, dy, scale, angle in torch.rand(count, 4, generator=g, dtype=torch.float64).tolist():
        dx, dy = (2 * dx - 1) * VIEW_SHIFT, (2 * dy - 1) * VIEW_SHIFT
        scale, angle = low + (high - low) * scale, (2 * angle - 1) * math.radians(VIEW_ANGLE)
        c, s = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[c, -s, dx * 2 / size], [s, c, dy * 2 / size]], dtype=images.dtype,
                             device=images.device).expand(len(images), 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out.append(F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False))
    return out
