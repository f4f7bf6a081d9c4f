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


def recognized(model, classes: list[int], seeds: range, **settings) -> int:
    """How many class-logit renders (one per class and seed) the network classifies as their
    class. One render's verdict is a coin with good odds: a rounding difference (thread count,
    bf16 or fp32) can turn a lion into a tiger, so the quality proof counts over seeds."""
    from featureshift import render

    hits = 0
    for seed in seeds:
        result = render(model, [("logits", c) for c in classes], seed=seed, quiet=True, **settings)
        with torch.no_grad():
            predicted = model(normalized(model, result.images)).argmax(1).tolist()
        hits += sum(p == c for p, c in zip(predicted, classes))
    return hits
