"""Feature accentuation (Hamblin et al., arXiv 2402.10039): a real photo, changed only as
much as needed to excite a channel.

A rendered picture shows what a channel could respond to; an accentuation shows what it
responds to in one given photo, and how it reads that photo. The optimization starts at
the photo itself, in Lucid's parameterization (a 1/f-scaled Fourier spectrum with
decorrelated colors, so a change spreads over natural image structure instead of pixel
noise), sees it through Lucid's random transforms (so only changes that survive small
shifts, scalings and rotations count), and is pulled back towards the photo at every
step: each image's objective gradient is scaled to unit RMS (as in the engine), and
`accent_weight` times the parameters' distance from the photo's, relative to the
photo's own size, is added to it. The pull wins once the change is as large as the
objective is worth, so a small weight lets the picture drift far, a large one keeps it
close.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import FeatureshiftError
from .maco import square_image
from .param import ImageParam
from .settings import RenderSettings
from .transforms import TransformDraws, draw_transforms

SATURATION = 0.01  # pixels are kept this far inside [0, 1]: the sigmoid cannot reach 0 or 1 exactly


def load_photo(path: str | os.PathLike, size: int) -> np.ndarray:
    """The central square of the image at PATH resized to SIZE px, (size, size, 3) float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return square_image(im, size)
    except (OSError, UnidentifiedImageError) as e:
        raise FeatureshiftError(f"Cannot read the image to accentuate, {path}: {e}") from e


def photo_params(images: np.ndarray | torch.Tensor, image_param: ImageParam) -> torch.Tensor:
    """The parameters for which IMAGE_PARAM draws (N, S, S, 3) IMAGES in [0, 1]: its inverse."""
    x = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2).double()
    x = torch.logit(x.clamp(SATURATION, 1 - SATURATION))
    if image_param.decorrelate:
        x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(image_param.color.cpu().double()), x)
    if image_param.kind == "fft":
        spectrum = torch.fft.rfft2(x * image_param.fft_divisor) / image_param.scale.cpu().double()
        x = torch.view_as_real(spectrum)
    return x.float()


class AccentPlan:
    """What an accentuation optimizes and shows the network, for the engine's method loop:
    Lucid's parameterization started at the photo, Lucid's transforms, a pull back to it."""

    def __init__(self, settings: RenderSettings, device: torch.device, count: int):
        s = settings
        if not s.image:
            raise FeatureshiftError("Feature accentuation starts from a photo: give one with --image PATH "
                                    "(RenderSettings(image=PATH)).")
        paths = [s.image] if isinstance(s.image, (str, os.PathLike)) else list(s.image)
        if len(paths) not in (1, count):
            raise FeatureshiftError(f"Give one image for all targets or one per target: {len(paths)} images "
                                    f"for {count} targets.")
        if not s.accent_weight >= 0:
            raise FeatureshiftError(f"accent_weight must be at least 0, not {s.accent_weight}.")
        photos = np.stack([load_photo(Path(p), s.size) for p in paths])
        self.image = ImageParam(s.param, s.size, s.decay_power, s.fft_divisor, s.decorrelate, device)
        self.start = photo_params(photos, self.image).to(device)
        flat = self.start.flatten(1)
        self.reach = flat.square().mean(1).sqrt().clamp_min(1e-12)  # each photo's parameter RMS
        self.weight = float(s.accent_weight)
        self.transforms = s.transforms
        self.views_per_image = 1
        self.input_size = s.transforms.output_size(s.size)
        self.param_numel = flat.shape[1]
        self.settings = ("image", "accent_weight", "param", "transforms", "decay_power", "fft_divisor",
                         "decorrelate")  # recorded with the result

    def _photos(self, index: Sequence[int]) -> torch.Tensor:
        rows = torch.tensor([i if len(self.start) > 1 else 0 for i in index], device=self.start.device)
        return self.start[rows]

    def init(self, generators: Sequence[torch.Generator], index: Sequence[int]) -> torch.Tensor:
        """The photo's parameters for each image (INDEX: the target each image renders)."""
        return self._photos(index).clone()

    def draw(self, generators: Sequence[torch.Generator], steps: int) -> TransformDraws:
        """Every step's transforms of each image, from its own generator (as Lucid's)."""
        return draw_transforms(self.transforms, generators, steps, self.image.size, self.start.device)

    def views(self, images: torch.Tensor, draws: TransformDraws, noise_generators) -> torch.Tensor:
        """This step's transformed images, one view each."""
        return draws.apply(self.transforms, images)

    def penalty_grad(self, params: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
        """accent_weight times the distance from the photo's parameters, in units of their RMS."""
        reach = self.reach[torch.tensor([i if len(self.start) > 1 else 0 for i in index], device=params.device)]
        return self.weight * (params - self._photos(index)) / reach.view(-1, *[1] * (params.dim() - 1))
