"""Which parameters make each channel of a layer, found by tracing, for any architecture.

The weight-change measure (`weights.py`) compares exactly these parameter rows between
two snapshots, and the report names them for every layer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..models.layers import Capture, arch_key, blank_input, channel_axis, layer_info, layer_structure, truncated

_MAX_PROBE_ROWS = 512  # images per tracing pass: every module's NaN codes side by side in one batch


@dataclasses.dataclass(frozen=True)
class ChannelSource:
    """A parameter-holding module whose output channel index[c] feeds the layer's channel c (-1: none)."""
    module: str
    index: np.ndarray = dataclasses.field(compare=False)


_SOURCES_CACHE: dict[tuple, list[ChannelSource]] = {}


def channel_sources(model: nn.Module, layer: str) -> list[ChannelSource]:
    """The modules whose parameters produce each channel of `layer`, found by tracing.

    Walking back from `layer` in execution order, each parameter-holding module gets
    NaN written into a binary-coded subset of its output channels; where the NaNs land
    in the layer tells whether the module feeds each channel one-to-one (a conv and its
    batch norm; each branch of a concatenation; both paths of a residual sum) or mixes
    channels (an earlier conv), which ends the walk for that channel. So a ReLU gets the
    conv before it, a Fire or Inception block gets the last conv of every branch, a
    ResNet block gets conv2/bn2 and its downsample path, with no per-architecture rules.
    """
    return channel_sources_many(model, [layer])[layer]


def channel_sources_many(model: nn.Module, layers: Sequence[str]) -> dict[str, list[ChannelSource]]:
    """`channel_sources` of several layers, traced together in a few batched passes."""
    todo = [l for l in dict.fromkeys(layers) if (*arch_key(model), l) not in _SOURCES_CACHE]
    if todo:
        _trace_sources(model, todo)
    return {l: _SOURCES_CACHE[(*arch_key(model), l)] for l in layers}


def _trace_sources(model: nn.Module, layers: list[str]) -> None:
    size = layer_structure(model).size
    targets = [layer_info(model, l) for l in layers]
    modules = dict(model.named_modules())
    device = next(model.parameters()).device

    # One plain pass: the order of calls, and each parameter module's output width.
    events: list[str] = []
    widths: dict[str, int] = {}
    axes: dict[str, int] = {}  # where each module's output holds its channels: 1, or -1 (tokens, channels-last)
    candidates = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
    is_candidate, is_layer = set(candidates), set(layers)

    def record(name, module, out):
        axis = channel_axis(model, module, out)
        # batch 1: an output batched otherwise (swin's attention windows) has no rows per image to mark
        if axis is not None and out.shape[0] == 1:
            # a module can be both: its parameters' event comes first, as it happens before the layer's
            for event in ([name] if name in is_candidate else []) + (["@" + name] if name in is_layer else []):
                events.append(event)
                widths[name], axes[name] = out.shape[axis], axis

    x = torch.randn_like(blank_input(model, size, device=device))
    with torch.no_grad(), Capture(model, [*candidates, *layers], on_output=record, keep=False) as net:
        net(x)
    last = {l: max(i for i, n in enumerate(events) if n == "@" + l) for l in layers}
    # Per layer: the parameter modules run before it, nearest first (each at its last call).
    orders = {l: list(dict.fromkeys(n for n in reversed(events[:last[l]]) if not n.startswith("@"))) for l in layers}
    state = {l: {"pos": 0, "closed": np.zeros(info.channels, bool), "found": {}} for l, info in zip(layers, targets)}
    hits: dict[tuple[str, str], np.ndarray] = {}  # (module, layer) -> (2*bits, channels): where NaN arrived
    bits_of = {n: max(1, math.ceil(math.log2(widths[n]))) if widths[n] > 1 else 1 for n in widths}

    def open_layers():
        return [l for l in layers if not state[l]["closed"].all() and state[l]["pos"] < len(orders[l])]

    # Rounds: probe the next few modules of every layer still open, in batched passes, then
    # walk each layer as far as the probes go. Most layers close within a round or two.
    while open_layers():
        wanted = list(dict.fromkeys(n for l in open_layers() for n in orders[l][state[l]["pos"]:state[l]["pos"] + 6]
                                    if (n, l) not in hits))
        active = open_layers()
        for chunk in _row_chunks(wanted, bits_of):
            _probe_chunk(model, chunk, bits_of, widths, x, active, hits, device, axes)
        for l, info in zip(layers, targets):
            st = state[l]
            while st["pos"] < len(orders[l]) and not st["closed"].all() and (orders[l][st["pos"]], l) in hits:
                n = orders[l][st["pos"]]
                bits = bits_of[n]
                pairs = hits[(n, l)].reshape(bits, 2, info.channels)
                depends = pairs.any((0, 1))
                one_to_one = depends & (pairs.sum(1) == 1).all(0)
                take = one_to_one & ~st["closed"]
                if take.any():
                    index = np.full(info.channels, -1, np.int64)
                    src = (pairs[:, 0, :].astype(np.int64) << np.arange(bits)[:, None]).sum(0)
                    index[take] = src[take]
                    st["found"][n] = index
                st["closed"] |= depends & ~one_to_one
                st["pos"] += 1
    for l in layers:
        found = state[l]["found"]
        _SOURCES_CACHE[(*arch_key(model), l)] = [ChannelSource(n, found[n]) for n in orders[l] if n in found]


def _row_chunks(names: list[str], bits_of: dict[str, int]) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    rows = 0
    for n in names:
        if rows + 2 * bits_of[n] > _MAX_PROBE_ROWS and chunks[-1]:
            chunks.append([])
            rows = 0
        chunks[-1].append(n)
        rows += 2 * bits_of[n]
    return [c for c in chunks if c]


def _probe_chunk(model, chunk, bits_of, widths, x, layers, hits, device, axes=None) -> None:
    """One pass with every module of `chunk` writing NaN codes into its own rows of the batch.

    Rows 2b and 2b+1 of a module hold NaN in the channels whose index has bit b set, and
    in those where it is clear: a channel fed one-to-one sees exactly one of each pair.
    """
    offsets, rows, masks = {}, 0, {}
    for n in chunk:
        offsets[n] = rows
        rows += 2 * bits_of[n]
        k, bits = widths[n], bits_of[n]
        on = (np.arange(k)[None, :] >> np.arange(bits)[:, None]) & 1
        mask = torch.tensor(np.stack([on, 1 - on], 1).reshape(2 * bits, k).astype(bool), device=device)
        masks[n] = mask[:, :, None, None] if (axes or {}).get(n, 1) == 1 else mask[:, None, :]

    def inject(name, module, out):
        mask = masks[name]
        if mask.dim() < out.dim():  # channels last: (rows, 1, ..., 1, channels)
            mask = mask.view(mask.shape[0], *[1] * (out.dim() - 2), mask.shape[-1])
        first, count = offsets[name], 2 * bits_of[name]
        out = out.clone()
        part = out[first:first + count]
        out[first:first + count] = torch.where(mask, torch.full_like(part, float("nan")), part)
        return out

    # The injecting hooks go in first, so a layer that is itself one of the modules is read with its NaNs.
    with torch.no_grad(), Capture(model, chunk, on_output=inject, keep=False), truncated(model, layers) as net:
        outs = net(x.expand(rows, -1, -1, -1).contiguous())
    for l in layers:
        nan = torch.isnan(outs[l]).flatten(2).any(2).cpu().numpy()
        for n in chunk:
            hits[(n, l)] = nan[offsets[n]:offsets[n] + 2 * bits_of[n]]
