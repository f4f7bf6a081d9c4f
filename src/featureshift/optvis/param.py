"""Image parameterizations: what the optimizer actually changes.

Lucid's recipe: a Fourier spectrum scaled by 1/frequency (so every frequency band
starts with equal energy and low frequencies learn as fast as high ones), colors
decorrelated with ImageNet's color-correlation square root, and a sigmoid to [0, 1].
Everything here stays fp32, whatever precision the network runs in.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .settings import PARAMS

# Square root of ImageNet's color correlation matrix (Lucid); normalized by its largest
# column norm so a unit step in the decorrelated space is at most a unit step in RGB.
COLOR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]])
COLOR_CORRELATION = COLOR_CORRELATION_SQRT / COLOR_CORRELATION_SQRT.norm(dim=0).max()



def rfft2d_freqs(h: int, w: int) -> torch.Tensor:
    """Frequency magnitude of each bin of a real 2-D FFT of an h x w image, shape (h, w//2+1)."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """1/f^decay with the DC term clamped at 1/max(h, w), times sqrt(h*w) (Lucid's unitary scaling)."""
    freqs = rfft2d_freqs(h, w).clamp_min(1.0 / max(h, w))
    return (freqs.pow(-decay_power) * math.sqrt(h * w)).float()


def param_shape(kind: str, size: int, channels: int = 3) -> tuple[int, ...]:
    """The shape of one image's parameters (no batch dimension); CHANNELS: the network's input bands."""
    if kind == "fft":
        return (channels, size, size // 2 + 1, 2)  # real and imaginary parts
    if kind == "pixel":
        return (channels, size, size)
    raise ValueError(f"unknown parameterization {kind!r}; use one of {', '.join(PARAMS)}")


def init_params(kind: str, size: int, generators: Sequence[torch.Generator], sd: float = 0.01,
                channels: int = 3) -> torch.Tensor:
    """N(0, sd) initial parameters, one row per generator, so each image's start depends
    only on its own generator (never on what else is in the batch)."""
    shape = param_shape(kind, size, channels)
    return torch.stack([torch.randn(shape, generator=g) for g in generators]) * sd


class ImageParam:
    """Callable turning a (B, *param_shape) tensor into (B, channels, size, size) images in [0, 1].

    channels: the network's input bands. Colour decorrelation (ImageNet's RGB statistics) applies
    to 3 channels only; grayscale and multi-band images are parameterized band by band."""

    def __init__(self, kind: str = "fft", size: int = 128, decay_power: float = 1.0, fft_divisor: float = 4.0,
                 decorrelate: bool = True, device: torch.device | str = "cpu", channels: int = 3):
        param_shape(kind, size, channels)  # validates kind
        self.kind, self.size, self.fft_divisor, self.channels = kind, size, fft_divisor, channels
        self.decorrelate = decorrelate and channels == 3
        self.scale = spectrum_scale(size, size, decay_power).to(device) if kind == "fft" else None
        # the divisor folded into the spectrum's scale: irfft2 is linear, and one pass less per step
        self.step_scale = self.scale / fft_divisor if kind == "fft" else None
        self.color = COLOR_CORRELATION.to(device)

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        params = params.float()
        if self.kind == "fft":
            spectrum = torch.view_as_complex(params) * self.step_scale
            # "backward" normalization (1/(h*w)) as in TF's irfft2d; sqrt(h*w) is in self.scale
            x = torch.fft.irfft2(spectrum, s=(self.size, self.size))
        else:
            x = params
        if self.decorrelate:
            x = (self.color @ x.flatten(2)).view(x.shape)  # a plain matmul: ~2x faster than einsum here
        return torch.sigmoid(x)
