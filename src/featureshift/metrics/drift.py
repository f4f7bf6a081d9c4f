"""Render-based measures of a channel between two snapshots.

- visual drift: a texture distance between the channel's renders at the two snapshots;
- cross-activation: how strongly one snapshot's channel fires on the other snapshot's
  render, relative to its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..models.info import model_info
from ..models.layers import truncated
from .weights import check_same_arch

JUDGE_LAYERS = ("features.1", "features.4", "features.7", "features.10")
JUDGE_SIZE = 128
_JUDGE: dict[str, nn.Module] = {}


def _judge() -> nn.Module:
    if "net" not in _JUDGE:
        from ..network import open_network

        _JUDGE["net"] = open_network("squeezenet1_1", weights="imagenet").module
    return _JUDGE["net"]


def match_bands(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A (B, C, H, W) batch with CHANNELS bands: gray (one band) repeated, RGB averaged to gray,
    extra bands dropped; bands a render file lacks (the fourth and later, not kept in RGB tiles)
    filled with the average of the ones it has."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 1:
        return x[:, :3].mean(1, keepdim=True)
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if c > channels:
        return x[:, :channels]
    return torch.cat([x, x.mean(1, keepdim=True).expand(-1, channels - c, -1, -1)], 1)


def _as_batch(images, mean, std, size: int | None = None) -> torch.Tensor:
    x = torch.as_tensor(np.stack([np.asarray(i, np.float32) for i in images]))
    if x.dim() == 3:  # grayscale arrays (H, W)
        x = x[..., None]
    x = match_bands(x.permute(0, 3, 1, 2), len(mean))
    if x.max() > 1.5:  # uint8 images
        x = x / 255.0
    if size is not None and x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def read_image(path: str | Path) -> np.ndarray:
    """A render file as the measures take it: (H, W, 3) float32 RGB in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


def texture_descriptors(images) -> list[np.ndarray]:
    """Per image, per judge layer: channel means and standard deviations in a fixed ImageNet network."""
    net = _judge()
    info = net.featureshift_info
    x = _as_batch(images, info.mean, info.std, JUDGE_SIZE)
    with torch.no_grad(), truncated(net, JUDGE_LAYERS) as t:
        feats = t(x)
    out = []
    for l in JUDGE_LAYERS:
        f = feats[l].double().flatten(2)
        out.append(torch.cat([f.mean(2), f.std(2, correction=0)], 1).numpy())
    return out


def visual_drift(images_a, images_b) -> np.ndarray:
    """Per pair of renders: texture distance in [0, 1], 0 for identical images.

    The mean over four layers of a fixed ImageNet SqueezeNet (the judge, the same for
    every network studied) of the cosine distance between the images' style statistics
    (per-channel mean and standard deviation of the activation). Unlike a pixel
    difference it ignores where a pattern sits, which is seed noise, and keeps what the
    pattern is: its colors, textures and parts.
    """
    images_a = list(images_a)
    if not images_a:
        return np.zeros(0)
    return visual_drift_from(texture_descriptors(images_a), images_a, images_b)


def visual_drift_from(descriptors_a: Sequence[np.ndarray], images_a, images_b) -> np.ndarray:
    """visual_drift with IMAGES_A already described (their texture_descriptors): a caller
    that compares one set of renders with many describes it once."""
    images_a, images_b = list(images_a), list(images_b)
    db = texture_descriptors(images_b)
    out = np.zeros(len(images_a))
    for ua, ub in zip(descriptors_a, db):
        na = np.linalg.norm(ua, axis=1)
        nb = np.linalg.norm(ub, axis=1)
        cos = (ua * ub).sum(1) / np.maximum(na * nb, 1e-30)
        out += np.clip(1.0 - cos, 0.0, 1.0)
    out /= len(db)
    same = np.array([np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images_a, images_b)])
    out[same] = 0.0  # exact zero, not rounding noise, for an unchanged network
    return out


def channel_activation(model: nn.Module, targets: Sequence[tuple[str, int]], images) -> np.ndarray:
    """The channel objective (spatial mean of the channel) of each target on its image."""
    info = model_info(model)
    images = list(images)
    dev = next(model.parameters()).device
    x = _as_batch(images, info.mean, info.std).to(dev)
    layers = list(dict.fromkeys(l for l, _ in targets))
    with torch.no_grad(), truncated(model, layers) as net:
        feats = net(x)
    return np.array([float(feats[l][i, c].float().mean()) for i, (l, c) in enumerate(targets)])


def cross_activation(model_a: nn.Module, model_b: nn.Module, targets: Sequence[tuple[str, int]],
                     renders_a, renders_b, own_a: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(b_on_a, a_on_b) per target.

    b_on_a = act_B(render_A) / act_B(render_B): how strongly the later network's channel
    fires on the earlier snapshot's render, relative to its own render; a_on_b the
    reverse. Near 1: the feature was kept; low: re-purposed. NaN where the network's
    own render does not activate the channel (a failed render). own_a: act_A(render_A), where the
    caller has it already (one reference snapshot against many).
    """
    check_same_arch(model_a, model_b)
    renders_a, renders_b = list(renders_a), list(renders_b)
    if not targets:
        return np.zeros(0), np.zeros(0)
    b_a = channel_activation(model_b, targets, renders_a)
    b_b = channel_activation(model_b, targets, renders_b)
    a_b = channel_activation(model_a, targets, renders_b)
    a_a = channel_activation(model_a, targets, renders_a) if own_a is None else np.asarray(own_a)
    with np.errstate(invalid="ignore", divide="ignore"):
        b_on_a = np.where(b_b > 0, b_a / b_b, np.nan)
        a_on_b = np.where(a_a > 0, a_b / a_a, np.nan)
    return b_on_a, a_on_b
