"""Lucid's method as a plan for the engine's render loop: a 1/f Fourier (or pixel)
parameterization with decorrelated colour (optvis.param) and Lucid's random transforms
every step (optvis.transforms). MACO (optvis.maco) and feature accentuation
(optvis.accent) are plans with the same parts."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .param import ImageParam, init_params, param_shape
from .settings import RenderSettings
from .transforms import TransformDraws, draw_transforms


class LucidPlan:
    """What a Lucid render optimizes and shows the network: each image's own parameters,
    one randomly transformed view of it per step."""

    def __init__(self, settings: RenderSettings, device: torch.device, channels: int = 3):
        s = settings
        self.kind, self.size, self.init_sd = s.param, int(s.size), s.init_sd
        self.channels, self.device = channels, device
        self.image = ImageParam(s.param, self.size, s.decay_power, s.fft_divisor, s.decorrelate, device,
                                channels=channels)
        self.transforms = s.transforms
        self.views_per_image = 1
        self.input_size = s.transforms.output_size(self.size)
        self.param_numel = math.prod(param_shape(s.param, self.size, channels))
        self.settings = ("param", "transforms", "decay_power", "init_sd", "fft_divisor", "decorrelate")

    def init(self, generators: Sequence[torch.Generator], index: Sequence[int]) -> torch.Tensor:
        """N(0, init_sd) parameters, one row per generator (each image's start is its own)."""
        return init_params(self.kind, self.size, generators, self.init_sd, channels=self.channels).to(self.device)

    def draw(self, generators: Sequence[torch.Generator], steps: int) -> TransformDraws:
        """Every step's transforms of each image, from its own generator."""
        return draw_transforms(self.transforms, generators, steps, self.size, self.device)

    def views(self, images: torch.Tensor, draws: TransformDraws, noise_generators) -> torch.Tensor:
        """This step's transformed images, one view each."""
        return draws.apply(self.transforms, images)

    def penalty_grad(self, params: torch.Tensor, index: Sequence[int]) -> None:
        """Lucid has no penalty: only the objective moves the image."""
        return None
