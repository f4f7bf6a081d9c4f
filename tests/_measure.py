"""Measuring renders with the network itself: the channel activations of images in [0, 1]."""
from __future__ import annotations

import numpy as np
import torch

from featureshift.models.info import model_info
from featureshift.models.layers import truncated


def normalized(model, images: np.ndarray) -> torch.Tensor:
    info = model_info(model)
    x = torch.tensor(images).permute(0, 3, 1, 2)
    return (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)


def channel_means(model, images: np.ndarray, layer: str) -> torch.Tensor:
    with truncated(model, [layer]) as net, torch.no_grad():
        return net(normalized(model, images))[layer].mean((2, 3))
