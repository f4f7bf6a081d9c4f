"""Spatial scale of a channel's render: its dominant spatial frequency, from the radially
averaged power spectrum, and how it changed ("the features got coarser" as a number).
Definitions in docs/metrics.md."""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np


def _gray(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            image = im.convert("RGB")
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3:
        if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):  # CHW
            a = np.moveaxis(a, 0, -1)
        a = a[..., :3].mean(-1) if a.shape[-1] >= 3 else a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"an image must be HxW, HxWxC or CxHxW, not shape {a.shape}")
    return a


def radial_power(image) -> np.ndarray:
    """The radially averaged power spectrum of an image (PIL image, array or file path).

    Gray levels, mean removed, Hann window (so the image's edges add no false high
    frequencies); entry k is the mean power at radius k cycles per image (on the
    shorter side), for k = 0 .. min(H, W) // 2.
    """
    a = _gray(image)
    h, w = a.shape
    a = (a - a.mean()) * np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2(a)) ** 2
    fy = np.fft.fftfreq(h) * min(h, w)
    fx = np.fft.fftfreq(w) * min(h, w)
    radius = np.rint(np.hypot(*np.meshgrid(fy, fx, indexing="ij"))).astype(int)
    n = min(h, w) // 2 + 1
    inside = radius < n
    sums = np.bincount(radius[inside], weights=power[inside], minlength=n)
    counts = np.bincount(radius[inside], minlength=n)
    return sums / np.maximum(counts, 1)


def dominant_frequency(image) -> float:
    """The dominant spatial frequency of an image, in cycles per pixel (0 .. 0.5).

    The power-weighted mean frequency of the radially averaged power spectrum (DC left
    out): a stripe pattern of period P pixels gives 1 / P. NaN for a flat image.
    """
    p = radial_power(image)
    size = 2 * (len(p) - 1)
    k = np.arange(len(p))[1:]
    p = p[1:]
    total = p.sum()
    if not total > 1e-12 * max(1.0, float(np.abs(p).max(initial=0.0))) or size == 0:
        return math.nan
    return float((k * p).sum() / total / size)


def coarsening(before: float, after: float) -> float:
    """How many times coarser the after picture is: dominant frequency before / after (1: same
    scale, 2: features twice as large, 0.5: twice as fine). NaN where either is unknown."""
    if not (math.isfinite(before) and math.isfinite(after)) or before <= 0 or after <= 0:
        return math.nan
    return before / after


def layer_coarsening(ratios: Iterable[float]) -> float:
    """A layer's coarsening: the geometric mean of its channels' (finite, positive) ratios; NaN if none."""
    logs = [math.log(r) for r in ratios if r is not None and math.isfinite(r) and r > 0]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def channel_coarsening(before: Sequence, after: Sequence) -> list[float]:
    """Per channel, the coarsening between paired renders (images or paths) before and after."""
    return [coarsening(dominant_frequency(a), dominant_frequency(b)) for a, b in zip(before, after)]
