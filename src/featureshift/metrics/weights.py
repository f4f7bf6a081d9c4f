"""Relative weight change per layer and per channel: ||W_b - W_a|| / ||W_a|| of the
parameter rows that produce each channel (see `sources.channel_sources`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import FeatureshiftError
from ..models.layers import layer_info
from .sources import ChannelSource, channel_sources_many


@dataclasses.dataclass
class WeightChange:
    layer: str
    value: float  # the whole layer
    channels: np.ndarray  # per channel; NaN where the two networks' parameters do not match in shape
    sources: list[str]


def check_same_arch(model_a: nn.Module, model_b: nn.Module) -> None:
    """An error unless the two networks have one architecture, so that layers and channels correspond."""
    ia = getattr(model_a, "featureshift_info", None)
    ib = getattr(model_b, "featureshift_info", None)
    if ia is not None and ib is not None and ia.arch != ib.arch:
        raise FeatureshiftError(
            f"The two networks have different architectures ({ia.arch} and {ib.arch}), so their layers and "
            "channels do not correspond. Compare two snapshots of the same network, e.g. two epochs of one run."
        )


def weight_change(model_a: nn.Module, model_b: nn.Module, layers: Iterable[str]) -> dict[str, WeightChange]:
    """Relative weight change ||W_b - W_a|| / ||W_a||, per layer and per output channel.

    W is the set of parameter rows that produce the channel (see `channel_sources`):
    conv filter and bias, batch-norm scale and shift, every branch that is summed or
    concatenated into it. 0 means untouched.
    """
    check_same_arch(model_a, model_b)
    layers = list(layers)
    all_sources = channel_sources_many(model_a, layers)
    out = {}
    for layer in layers:
        sources = all_sources[layer]
        info = layer_info(model_a, layer)
        ra = _channel_params(model_a, sources, info.channels)
        rb = _channel_params(model_b, sources, info.channels)
        per = np.full(info.channels, np.nan)
        num = den = 0.0
        for c in range(info.channels):
            if not ra[c] or len(ra[c]) != len(rb[c]) or any(x.shape != y.shape for x, y in zip(ra[c], rb[c])):
                continue
            a = torch.cat(ra[c]).double()
            b = torch.cat(rb[c]).double()
            d2 = float(((b - a) ** 2).sum())
            n2 = float((a ** 2).sum())
            num, den = num + d2, den + n2
            per[c] = _ratio(math.sqrt(d2), math.sqrt(n2))
        value = _ratio(math.sqrt(num), math.sqrt(den)) if den > 0 or num == 0 else float("nan")
        if np.isnan(per).all():
            value = float("nan")
        out[layer] = WeightChange(layer, value, per, [s.module for s in sources])
    return out


def _channel_params(model: nn.Module, sources: Sequence[ChannelSource], channels: int) -> list[list[torch.Tensor]]:
    """For each channel of the layer, the parameter rows that produce it."""
    modules = dict(model.named_modules())
    rows: list[list[torch.Tensor]] = [[] for _ in range(channels)]
    for src in sources:
        module = modules[src.module]
        width = int(src.index.max()) + 1
        for _, p in sorted(module.named_parameters(recurse=False)):
            if p.dim() == 0 or p.shape[0] < width:
                continue  # not indexed by output channel
            p = p.detach().cpu()
            for c in np.nonzero(src.index >= 0)[0]:
                rows[c].append(p[int(src.index[c])].reshape(-1))
    return rows


def _ratio(num: float, den: float) -> float:
    if num == 0:
        return 0.0
    return num / den if den > 0 else float("nan")
