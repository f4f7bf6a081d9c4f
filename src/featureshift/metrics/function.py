"""Function change per layer: how differently a layer computes after fine-tuning, on the
very inputs it received before. Per output channel c of layer L,

    r_c = ||L_B(x)_c - L_A(x)_c|| / ||L_A(x)_c||,   x: snapshot A's input to L

over the probe images (every image and position), and the layer's function change is the
median of r_c over its channels. It depends on what the layer computes, not on how its
weights are written: a channel's weights scaled by 100 and undone by the next layer, or
preprocessing folded into the first convolution, leave it unchanged. The median keeps a
channel that barely fires (whose ratio can be huge) from standing for the layer. A layer
without parameters of its own (ReLU, pooling, dropout in eval mode) scores 0. See
docs/metrics.md.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..io import write_json
from ..models.layers import channel_axis
from .probe import METRICS_VERSION, probe_key

MEASURE = "median over channels of the relative change of the output"  # in each cache file: another measure recomputes


def function_change(model_a: nn.Module, model_b: nn.Module, layers: Sequence[str],
                    batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Per layer: the median over its channels of ||L_B(x)_c - L_A(x)_c|| / ||L_A(x)_c||, x being
    A's input to the layer on each batch.

    Both networks must be in eval mode and on one device (that of the batches). Channels that
    are 0 on every batch at A have no ratio and are left out. A layer called several times in a
    forward pass counts every call; one whose output is not a tensor (or a tuple of them) gets NaN.
    """
    layers = list(dict.fromkeys(layers))
    if model_a is model_b:
        return {l: 0.0 for l in layers}
    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    sums: dict[str, list[tuple[np.ndarray, np.ndarray]] | None] = {l: [] for l in layers}  # per output: (num, den)
    pending: dict[str, list] = {l: [] for l in layers}

    def before(name):
        def hook(module, args, kwargs):
            # A copy: an in-place module (ReLU(inplace=True)) overwrites its input as it runs.
            pending[name].append((_clone(args), _clone(kwargs)))
        return hook

    def after(name):
        def hook(module, args, kwargs, out):
            x_args, x_kwargs = pending[name].pop()
            if sums[name] is None:
                return
            a = _tensors(out)
            try:
                b = _tensors(modules_b[name](*x_args, **x_kwargs))
            except (RuntimeError, TypeError, ValueError):
                # a module that cannot run on its own outside its parent's forward: no value, not a failed report
                sums[name] = None
                return
            if a is None or b is None or len(a) != len(b) or any(p.shape != q.shape for p, q in zip(a, b)) \
                    or (sums[name] and len(sums[name]) != len(a)):
                sums[name] = None
                return
            parts = [_channel_sums(model_a, module, p, q) for p, q in zip(a, b)]
            if any(p[0].shape != q[0].shape for p, q in zip(parts, sums[name])):
                sums[name] = None
                return
            sums[name] = [(n0 + n1, d0 + d1) for (n0, d0), (n1, d1) in zip(sums[name], parts)] if sums[name] else parts
        return hook

    handles = []
    try:
        for l in layers:
            handles.append(modules_a[l].register_forward_pre_hook(before(l), with_kwargs=True))
            handles.append(modules_a[l].register_forward_hook(after(l), with_kwargs=True))
        with torch.no_grad():
            for x in batches:
                model_a(x)
    finally:
        for h in handles:
            h.remove()
    return {l: _median_ratio(sums[l]) for l in layers}


def _channel_sums(model: nn.Module, module: nn.Module, a: torch.Tensor, b: torch.Tensor
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per channel of one output: (sum of squared change, sum of squares at A)."""
    a, b = a.float(), b.float()
    axis = 1 if a.dim() == 2 else channel_axis(model, module, a)
    if axis is None:  # no channels to tell apart: the output as one
        a, b, axis = a.reshape(1, -1), b.reshape(1, -1), 0
    axis %= a.dim()
    rest = [d for d in range(a.dim()) if d != axis]
    num = (b - a).pow(2).sum(rest, dtype=torch.float64)
    den = a.pow(2).sum(rest, dtype=torch.float64)
    return num.cpu().numpy(), den.cpu().numpy()


def _median_ratio(sums: list[tuple[np.ndarray, np.ndarray]] | None) -> float:
    if sums is None:
        return math.nan
    if not sums:
        return math.nan  # never called
    num = np.concatenate([n for n, _ in sums])
    den = np.concatenate([d for _, d in sums])
    alive = den > 0
    if not alive.any():
        return 0.0 if not num.any() else math.nan
    return float(np.median(np.sqrt(num[alive] / den[alive])))


def cached_function_change(model_a: nn.Module, model_b: nn.Module, layers: Sequence[str],
                           batches: Iterable[torch.Tensor], *, checksums: tuple[str, str],
                           probe: tuple[Sequence[Path], int], cache_dir: Path | None) -> dict[str, float]:
    """`function_change`, kept in CACHE_DIR under both snapshots' checksums and the probe
    (its image paths and size), so a rebuilt report does not run the probe images again."""
    import json

    layers = list(dict.fromkeys(layers))
    key = probe_key(probe[0], probe[1], layers)
    path = None if cache_dir is None else \
        Path(cache_dir) / f"function-{checksums[0][:16]}-{checksums[1][:16]}-{key}.json"
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("version") == METRICS_VERSION and saved.get("measure") == MEASURE \
                    and saved.get("snapshots") == list(checksums) \
                    and saved.get("key") == key and list(saved.get("layers", {})) == layers:
                return {l: math.nan if v is None else float(v) for l, v in saved["layers"].items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # a damaged cache file is measured again, never trusted
    out = function_change(model_a, model_b, layers, batches)
    if path is not None:
        write_json(path, {"version": METRICS_VERSION, "measure": MEASURE, "snapshots": list(checksums), "key": key,
                          "layers": {l: None if not math.isfinite(v) else v for l, v in out.items()}})
    return out


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _tensors(out) -> list[torch.Tensor] | None:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    return None
