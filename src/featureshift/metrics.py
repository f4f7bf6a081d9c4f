"""How much each layer and each channel changed between two snapshots.

Four families of measures, all defined in docs/metrics.md:

- weights: relative change ||W_b - W_a|| / ||W_a|| of the parameters that produce a
  layer's channels (`channel_sources` finds them for any architecture);
- representations on a fixed probe set: linear CKA per layer (minibatch, unbiased
  HSIC) and, per channel, the correlation across probe images of its spatially
  pooled activation;
- visual drift: a texture distance between a channel's renders at the two snapshots;
- cross-activation: how strongly one snapshot's channel fires on the other
  snapshot's render, relative to its own.

Probe statistics are computed once per snapshot (`probe_stats`, cached on disk keyed
by the snapshot checksum and the settings); every pairwise measure is then cheap.
`run_metrics` computes everything for a training run and writes RUN/metrics/.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import FeatureshiftError
from .io import atomic_path, write_json, write_text
from .models.layers import LayerInfo, Truncated, resolve_layers, trace_layers
from .run import trained_image_size

METRICS_VERSION = "1"
PROBE_BATCH = 32  # images per forward pass, and per CKA minibatch (fixed so CKA never depends on memory settings)
DEFAULT_PROBE_LIMIT = 256
# Larger = more changed, for ranking channels (`--most-changed N --by METRIC`).
CHANGE_METRICS = ("weight", "correlation", "drift", "cross")
CHANNEL_COLUMNS = ("weight_change", "correlation", "drift", "cross_b_on_a", "cross_a_on_b")


# ---------------------------------------------------------------- which parameters make a channel

@dataclasses.dataclass(frozen=True)
class ChannelSource:
    """A parameter-holding module whose output channel index[c] feeds the layer's channel c (-1: none)."""
    module: str
    index: np.ndarray = dataclasses.field(compare=False)


_SOURCES_CACHE: dict[tuple, list[ChannelSource]] = {}
_SMALL: dict[tuple, tuple[int, dict[str, LayerInfo]]] = {}


def _arch_key(model: nn.Module) -> tuple:
    info = getattr(model, "featureshift_info", None)
    return (info.arch, info.num_classes) if info is not None else (id(model),)


def _small_trace(model: nn.Module) -> tuple[int, dict[str, LayerInfo]]:
    """The smallest input the network accepts (tracing is only about structure), and its layers there."""
    key = _arch_key(model)
    if key not in _SMALL:
        info = getattr(model, "featureshift_info", None)
        full = info.input_size if info is not None else 224
        for size in (32, 80, full):
            try:
                _SMALL[key] = size, {l.name: l for l in trace_layers(model, size)}
                break
            except FeatureshiftError:
                if size == full:
                    raise
    return _SMALL[key]


def _layer_info(model: nn.Module, layer: str) -> LayerInfo:
    size, layers = _small_trace(model)
    return layers[layer] if layer in layers else resolve_layers(model, [layer], size)[0]


def truncated(model: nn.Module, layers: Sequence[str]) -> Truncated:
    """`Truncated` with the layer structure traced once per architecture, not on every call."""
    return Truncated(model, list(layers), layer_infos=[_layer_info(model, l) for l in layers])


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


_MAX_PROBE_ROWS = 512  # images per tracing pass: every module's NaN codes side by side in one batch


def channel_sources_many(model: nn.Module, layers: Sequence[str]) -> dict[str, list[ChannelSource]]:
    """`channel_sources` of several layers, traced together in a few batched passes."""
    todo = [l for l in dict.fromkeys(layers) if (*_arch_key(model), l) not in _SOURCES_CACHE]
    if todo:
        _trace_sources(model, todo)
    return {l: _SOURCES_CACHE[(*_arch_key(model), l)] for l in layers}


def _trace_sources(model: nn.Module, layers: list[str]) -> None:
    size = _small_trace(model)[0]
    targets = [_layer_info(model, l) for l in layers]
    modules = dict(model.named_modules())
    device = next(model.parameters()).device

    # One plain pass: the order of calls, and each parameter module's output width.
    events: list[str] = []
    widths: dict[str, int] = {}
    handles = []

    def record(name):
        def fn(module, args, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                events.append(name)
                widths[name.lstrip("@")] = out.shape[1]
        return fn

    candidates = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
    for n in candidates:
        handles.append(modules[n].register_forward_hook(record(n)))
    for l in layers:
        handles.append(modules[l].register_forward_hook(record("@" + l)))
    x = torch.randn(1, 3, size, size, device=device)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
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
            _probe_chunk(model, modules, chunk, bits_of, widths, x, active, targets, hits, device)
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
        _SOURCES_CACHE[(*_arch_key(model), l)] = [ChannelSource(n, found[n]) for n in orders[l] if n in found]


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


def _probe_chunk(model, modules, chunk, bits_of, widths, x, layers, targets, hits, device) -> None:
    """One pass with every module of `chunk` writing NaN codes into its own rows of the batch.

    Rows 2b and 2b+1 of a module hold NaN in the channels whose index has bit b set, and
    in those where it is clear: a channel fed one-to-one sees exactly one of each pair.
    """
    offsets, rows = {}, 0
    for n in chunk:
        offsets[n] = rows
        rows += 2 * bits_of[n]

    def inject(name):
        k, bits, first = widths[name], bits_of[name], offsets[name]
        on = (np.arange(k)[None, :] >> np.arange(bits)[:, None]) & 1
        mask = torch.tensor(np.stack([on, 1 - on], 1).reshape(2 * bits, k).astype(bool), device=device)[:, :, None, None]

        def fn(module, args, out):
            out = out.clone()
            part = out[first:first + 2 * bits]
            out[first:first + 2 * bits] = torch.where(mask, torch.full_like(part, float("nan")), part)
            return out
        return fn

    infos = [t for t in targets if t.name in layers]
    handles = [modules[n].register_forward_hook(inject(n)) for n in chunk]
    try:
        with torch.no_grad(), Truncated(model, layers, layer_infos=infos) as net:
            outs = net(x.expand(rows, -1, -1, -1).contiguous())
    finally:
        for h in handles:
            h.remove()
    for l in layers:
        nan = torch.isnan(outs[l]).flatten(2).any(2).cpu().numpy()
        for n in chunk:
            hits[(n, l)] = nan[offsets[n]:offsets[n] + 2 * bits_of[n]]


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


@dataclasses.dataclass
class WeightChange:
    layer: str
    value: float  # the whole layer
    channels: np.ndarray  # per channel; NaN where the two networks' parameters do not match in shape
    sources: list[str]


def weight_change(model_a: nn.Module, model_b: nn.Module, layers: Iterable[str]) -> dict[str, WeightChange]:
    """Relative weight change ||W_b - W_a|| / ||W_a||, per layer and per output channel.

    W is the set of parameter rows that produce the channel (see `channel_sources`):
    conv filter and bias, batch-norm scale and shift, every branch that is summed or
    concatenated into it. 0 means untouched.
    """
    _check_same_arch(model_a, model_b)
    layers = list(layers)
    all_sources = channel_sources_many(model_a, layers)
    out = {}
    for layer in layers:
        sources = all_sources[layer]
        info = _layer_info(model_a, layer)
        ra = _channel_params(model_a, sources, info.channels)
        rb = _channel_params(model_b, sources, info.channels)
        per = np.full(info.channels, np.nan)
        num = den = 0.0
        comparable = True
        for c in range(info.channels):
            if not ra[c] or len(ra[c]) != len(rb[c]) or any(x.shape != y.shape for x, y in zip(ra[c], rb[c])):
                comparable = comparable and bool(ra[c])
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


def _ratio(num: float, den: float) -> float:
    if num == 0:
        return 0.0
    return num / den if den > 0 else float("nan")


def _check_same_arch(model_a: nn.Module, model_b: nn.Module) -> None:
    ia = getattr(model_a, "featureshift_info", None)
    ib = getattr(model_b, "featureshift_info", None)
    if ia is not None and ib is not None and ia.arch != ib.arch:
        raise FeatureshiftError(
            f"The two networks have different architectures ({ia.arch} and {ib.arch}), so their layers and "
            "channels do not correspond. Compare two snapshots of the same network, e.g. two epochs of one run."
        )


# ---------------------------------------------------------------- probe statistics

@dataclasses.dataclass
class LayerStats:
    """What one snapshot's layer does on the probe set."""
    grams: list[np.ndarray]  # per minibatch of PROBE_BATCH images: the (B, B) Gram matrix of flattened activations
    pooled: np.ndarray  # (n, C) spatial mean per image and channel
    peak: np.ndarray  # (n, C) spatial maximum
    peak_pos: np.ndarray  # (n, C) flat index of the maximum in the (H, W) map
    height: int
    width: int


@dataclasses.dataclass
class ProbeStats:
    checksum: str
    key: str
    layers: dict[str, LayerStats]
    count: int


def probe_key(paths: Sequence[Path], image_size: int, layers: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(f"v{METRICS_VERSION}|{image_size}|{PROBE_BATCH}|{','.join(layers)}|".encode())
    for p in paths:
        h.update(str(Path(p).resolve()).encode() + b"\n")
    return h.hexdigest()[:16]


def model_checksum(model: nn.Module, meta=None) -> str:
    if meta is not None and getattr(meta, "checksum", ""):
        return meta.checksum
    from .snapshot import _state, weights_checksum

    return weights_checksum(_state(model))


def probe_stats(model: nn.Module, layers: Sequence[str], paths: Sequence[Path], *, image_size: int | None = None,
                meta=None, cache_dir: str | Path | None = None, device: str = "auto", quiet: bool = False,
                desc: str = "probe") -> ProbeStats:
    """Run the probe images through `model` once, in batches, and keep what every metric needs.

    Cached in `cache_dir` (if given) under the snapshot checksum and the settings.
    """
    from .models.zoo import model_info

    info = model_info(model)
    image_size = image_size or info.input_size
    layers = list(dict.fromkeys(layers))
    paths = [Path(p) for p in paths]
    if len(paths) < 4:
        raise FeatureshiftError(
            f"The probe set has {len(paths)} image(s); the representation metrics need at least 4. "
            "Use a run with more validation images or pass --probe DIR with more images."
        )
    checksum = model_checksum(model, meta)
    key = probe_key(paths, image_size, layers)
    cache = Path(cache_dir) / f"probe-{checksum[:16]}-{key}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return _load_stats(cache, checksum, key, layers)
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    dev = _device(device)
    model = model.to(dev)
    loader = probe_loader(paths, info, image_size)
    grams: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {l: [] for l in layers}
    hw: dict[str, tuple[int, int]] = {}
    from tqdm import tqdm

    with truncated(model, layers) as net, torch.no_grad():
        for x in tqdm(loader, desc=desc, unit="batch", disable=quiet, leave=False):
            feats = net(x.to(dev))
            for l in layers:
                f = feats[l].float()
                hw[l] = tuple(f.shape[2:])
                flat = f.flatten(1)
                grams[l].append((flat @ flat.T).double().cpu().numpy())
                m = f.flatten(2)
                peak, pos = m.max(2)
                parts[l].append((m.mean(2).cpu().numpy(), peak.cpu().numpy(), pos.cpu().numpy().astype(np.int32)))
    stats = ProbeStats(checksum, key, {
        l: LayerStats(grams[l], np.concatenate([p[0] for p in parts[l]]), np.concatenate([p[1] for p in parts[l]]),
                      np.concatenate([p[2] for p in parts[l]]), *hw[l]) for l in layers}, len(paths))
    if cache is not None:
        _save_stats(cache, stats)
    return stats


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def probe_loader(paths: Sequence[Path], info, image_size: int):
    from .data import ImageDataset, eval_transform

    ds = ImageDataset([(Path(p), 0) for p in paths], eval_transform(info, image_size))

    class _Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            item = ds[i]
            return item[0] if isinstance(item, (tuple, list)) else item

    return torch.utils.data.DataLoader(_Images(), batch_size=PROBE_BATCH, shuffle=False, num_workers=0)


def _save_stats(path: Path, s: ProbeStats) -> None:
    arrays = {"meta": np.frombuffer(json.dumps({"checksum": s.checksum, "key": s.key, "count": s.count,
                                                 "layers": list(s.layers)}).encode(), np.uint8)}
    for i, (l, st) in enumerate(s.layers.items()):
        arrays[f"{i}_pooled"], arrays[f"{i}_peak"], arrays[f"{i}_pos"] = st.pooled, st.peak, st.peak_pos
        arrays[f"{i}_hw"] = np.array([st.height, st.width])
        for j, g in enumerate(st.grams):
            arrays[f"{i}_gram_{j}"] = g
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _load_stats(path: Path, checksum: str, key: str, layers: Sequence[str]) -> ProbeStats:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if meta["checksum"] != checksum or meta["key"] != key or meta["layers"] != list(layers):
            raise ValueError("stale cache")
        out = {}
        for i, l in enumerate(meta["layers"]):
            grams, j = [], 0
            while f"{i}_gram_{j}" in z:
                grams.append(z[f"{i}_gram_{j}"])
                j += 1
            h, w = (int(v) for v in z[f"{i}_hw"])
            out[l] = LayerStats(grams, z[f"{i}_pooled"], z[f"{i}_peak"], z[f"{i}_pos"], h, w)
    return ProbeStats(checksum, key, out, meta["count"])


# ---------------------------------------------------------------- representation metrics

def _hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012), as used by minibatch CKA (Nguyen et al. 2021)."""
    n = k.shape[0]
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones = np.ones(n)
    kl = k @ l
    return float((np.trace(kl) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (ones @ kl @ ones)) / (n * (n - 3)))


def cka_from_grams(grams_a: Sequence[np.ndarray], grams_b: Sequence[np.ndarray]) -> float:
    """Linear CKA from per-minibatch Gram matrices: 1 for the same representation, near 0 for unrelated."""
    if len(grams_a) != len(grams_b):
        raise ValueError("the two Gram lists come from different probe sets")
    ab = aa = bb = 0.0
    for ka, kb in zip(grams_a, grams_b):
        if ka.shape[0] < 4:
            continue
        ab += _hsic1(ka, kb)
        aa += _hsic1(ka, ka)
        bb += _hsic1(kb, kb)
    if aa <= 0 or bb <= 0:
        return 1.0 if aa == bb == 0 else 0.0  # both constant: nothing distinguishes them
    return float(np.clip(ab / math.sqrt(aa * bb), -1.0, 1.0))


def cka(stats_a: ProbeStats, stats_b: ProbeStats, layer: str) -> float:
    _same_probe(stats_a, stats_b)
    return cka_from_grams(stats_a.layers[layer].grams, stats_b.layers[layer].grams)


def channel_correlation(stats_a: ProbeStats, stats_b: ProbeStats, layer: str) -> np.ndarray:
    """Per channel: Pearson correlation across probe images of the spatially pooled activation.

    1: it responds to the same images in the same proportions. A channel constant on
    the probe set in both snapshots counts as unchanged (1), in only one as 0.
    """
    _same_probe(stats_a, stats_b)
    a = stats_a.layers[layer].pooled.astype(np.float64)
    b = stats_b.layers[layer].pooled.astype(np.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    na = np.sqrt((a ** 2).sum(0))
    nb = np.sqrt((b ** 2).sum(0))
    scale_a = np.abs(stats_a.layers[layer].pooled).max(0) + 1e-12
    scale_b = np.abs(stats_b.layers[layer].pooled).max(0) + 1e-12
    flat_a = na <= 1e-6 * scale_a * math.sqrt(len(a))
    flat_b = nb <= 1e-6 * scale_b * math.sqrt(len(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / (na * nb)
    r = np.where(flat_a & flat_b, 1.0, np.where(flat_a | flat_b, 0.0, r))
    return np.clip(r, -1.0, 1.0)


def _same_probe(a: ProbeStats, b: ProbeStats) -> None:
    if a.key != b.key:
        raise ValueError("probe statistics computed on different probe sets or settings")


# ---------------------------------------------------------------- render-based metrics

_JUDGE: dict[str, nn.Module] = {}
JUDGE_LAYERS = ("features.1", "features.4", "features.7", "features.10")
JUDGE_SIZE = 128


def _judge() -> nn.Module:
    if "net" not in _JUDGE:
        from .models.zoo import create_model

        _JUDGE["net"] = create_model("squeezenet1_1", weights="imagenet")
    return _JUDGE["net"]


def _as_batch(images, mean, std, size: int | None = None) -> torch.Tensor:
    x = torch.as_tensor(np.stack([np.asarray(i, np.float32) for i in images])).permute(0, 3, 1, 2)
    if x.max() > 1.5:  # uint8 images
        x = x / 255.0
    if size is not None and x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


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
    images_a, images_b = list(images_a), list(images_b)
    if not images_a:
        return np.zeros(0)
    da, db = texture_descriptors(images_a), texture_descriptors(images_b)
    out = np.zeros(len(images_a))
    for ua, ub in zip(da, db):
        na = np.linalg.norm(ua, axis=1)
        nb = np.linalg.norm(ub, axis=1)
        cos = (ua * ub).sum(1) / np.maximum(na * nb, 1e-30)
        out += np.clip(1.0 - cos, 0.0, 1.0)
    out /= len(da)
    same = np.array([np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images_a, images_b)])
    out[same] = 0.0  # exact zero, not rounding noise, for an unchanged network
    return out


def channel_activation(model: nn.Module, targets: Sequence[tuple[str, int]], images) -> np.ndarray:
    """The channel objective (spatial mean of the channel) of each target on its image."""
    from .models.zoo import model_info

    info = model_info(model)
    images = list(images)
    dev = next(model.parameters()).device
    x = _as_batch(images, info.mean, info.std).to(dev)
    layers = list(dict.fromkeys(l for l, _ in targets))
    with torch.no_grad(), truncated(model, layers) as net:
        feats = net(x)
    return np.array([float(feats[l][i, c].float().mean()) for i, (l, c) in enumerate(targets)])


def cross_activation(model_a: nn.Module, model_b: nn.Module, targets: Sequence[tuple[str, int]],
                     renders_a, renders_b) -> tuple[np.ndarray, np.ndarray]:
    """(b_on_a, a_on_b) per target.

    b_on_a = act_B(render_A) / act_B(render_B): how strongly the later network's channel
    fires on the earlier snapshot's render, relative to its own render; a_on_b the
    reverse. Near 1: the feature was kept; low: re-purposed. NaN where the network's
    own render does not activate the channel (a failed render).
    """
    _check_same_arch(model_a, model_b)
    renders_a, renders_b = list(renders_a), list(renders_b)
    if not targets:
        return np.zeros(0), np.zeros(0)
    b_a = channel_activation(model_b, targets, renders_a)
    b_b = channel_activation(model_b, targets, renders_b)
    a_b = channel_activation(model_a, targets, renders_b)
    a_a = channel_activation(model_a, targets, renders_a)
    with np.errstate(invalid="ignore", divide="ignore"):
        b_on_a = np.where(b_b > 0, b_a / b_b, np.nan)
        a_on_b = np.where(a_a > 0, a_b / a_a, np.nan)
    return b_on_a, a_on_b


# ---------------------------------------------------------------- probe set and layers

def resolve_probe(run_dir: str | Path | None = None, probe: str | Path | None = None,
                  limit: int | None = DEFAULT_PROBE_LIMIT) -> list[Path]:
    """The probe images: every readable image under `probe` (any layout), else the run's validation images.

    More than `limit` images are thinned to `limit` evenly spaced ones (the validation
    list is ordered by class, so every class keeps its share); the choice is fixed.
    """
    if probe is not None:
        from .data import _class_files, check_image

        root = Path(probe)
        if not root.exists():
            raise FeatureshiftError(
                f"The probe folder {root} does not exist. Give a folder of images with --probe (sub-folders are "
                "searched too), or leave --probe out to use the run's validation images.")
        if not root.is_dir():
            raise FeatureshiftError(f"The probe {root} is a file; give a folder of images with --probe.")
        paths = [p for p in _class_files(root) if check_image(p) is None]
        if not paths:
            raise FeatureshiftError(f"The probe folder {root} holds no readable images; add some or use another folder.")
    elif run_dir is not None:
        from .run import probe_samples

        paths = [Path(p) for p, _ in probe_samples(run_dir)]
        gone = [p for p in paths if not p.is_file()]
        if gone:
            raise FeatureshiftError(
                f"{len(gone)} of the run's {len(paths)} validation images are no longer where the run found them "
                f"(e.g. {gone[0]}); the dataset was moved or deleted. Restore it, or give another folder of "
                "images with --probe DIR.")
    else:
        raise FeatureshiftError("The representation metrics need probe images: give a folder with --probe DIR.")
    if limit is not None and limit < 4:
        raise FeatureshiftError(f"The probe limit must be at least 4 images, not {limit}.")
    if limit is not None and len(paths) > limit:
        keep = np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))
        paths = [paths[i] for i in keep]
    return paths


def overview_layers(model: nn.Module) -> list[str]:
    """A layer per stage of the network, for the per-layer summary: the shallowest module depth
    with at least six 4-D layers (squeezenet's features.N, googlenet's inception blocks, ...)."""
    layers = [l for l in _small_trace(model)[1].values() if l.type not in ("Dropout", "Dropout2d", "Identity")]
    for depth in range(1, 1 + max((l.name.count(".") + 1 for l in layers), default=0)):
        chosen = [l.name for l in layers if l.name.count(".") + 1 == depth]
        if len(chosen) >= 6:
            return chosen
    return [l.name for l in layers]


# ---------------------------------------------------------------- a whole run

@dataclasses.dataclass
class RunMetrics:
    """Every measure of a run, each later snapshot against the reference (the first)."""
    run_dir: Path
    epochs: list[int]  # the snapshots measured, in training order
    reference: int
    layers: list[str]  # layers with layer-level measures
    channels: dict[str, list[int]]  # layers with channel-level measures -> the rendered channels
    layer_rows: list[dict]  # epoch, layer, weight_change, cka
    channel_rows: list[dict]  # epoch, layer, channel, weight_change, correlation, drift, cross_b_on_a, cross_a_on_b
    probe: list[Path]
    image_size: int
    examples: dict[tuple[str, int, int], list]  # (layer, channel, epoch) -> [examples.Example]
    receptive_field: dict[str, int]
    layer_info: dict[str, LayerInfo]  # type and channel count of every measured layer
    sources: dict[str, list[str]]  # layer -> the modules whose weights make its channels
    missing: dict[int, str] = dataclasses.field(default_factory=dict)
    files: dict[str, Path] = dataclasses.field(default_factory=dict)

    def layer_series(self, layer: str, column: str) -> list[tuple[int, float]]:
        return [(r["epoch"], r[column]) for r in self.layer_rows if r["layer"] == layer]

    def channel_series(self, layer: str, channel: int, column: str) -> list[tuple[int, float]]:
        return [(r["epoch"], r[column]) for r in self.channel_rows if r["layer"] == layer and r["channel"] == channel]

    def channel_table(self, layer: str, epoch: int) -> list[dict]:
        return [r for r in self.channel_rows if r["layer"] == layer and r["epoch"] == epoch]


def _nan_to_none(v):
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    return v


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if _nan_to_none(r.get(k)) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in columns})
    write_text(path, buf.getvalue())


def run_metrics(run_dir: str | Path, layers: Sequence[str] = (), channels: dict[str, Sequence[int]] | None = None,
                *, renders: dict[tuple[str, int, int], Path] | None = None, probe: str | Path | None = None,
                probe_limit: int | None = DEFAULT_PROBE_LIMIT, image_size: int | None = None,
                overview: Sequence[str] | None = None, examples: int = 6, device: str = "auto",
                quiet: bool = False) -> RunMetrics:
    """Measure every snapshot of the run against the first one and write RUN/metrics/.

    layers: layers with per-channel measures (all their channels); `channels` names the
    rendered ones, whose renders (`renders`, (layer, epoch, channel) -> image file, e.g.
    a TimelineResult's tiles) give visual drift and cross-activation, and which get
    dataset examples (top `examples` probe images). overview: layers with layer-level
    measures (default: one per stage, see `overview_layers`). Probe statistics are
    cached in RUN/metrics/cache under each snapshot's checksum and the settings.

    Writes layers.csv, channels.csv, examples.json and summary.json.
    """
    from tqdm.auto import tqdm

    from .examples import find_examples, receptive_field
    from .run import list_snapshots
    from .snapshot import load_snapshot, read_meta

    run_dir = Path(run_dir)
    entries = list_snapshots(run_dir)
    out_dir = run_dir / "metrics"
    missing: dict[int, str] = {}
    readable = []
    for epoch, path in entries:
        try:
            readable.append((epoch, path, read_meta(path)))
        except FeatureshiftError as e:
            missing[epoch] = str(e)
    if not readable:
        raise FeatureshiftError(f"None of the snapshots in {run_dir / 'snapshots'} can be read; "
                                "train the run again or restore its snapshots.")
    ref_epoch, ref_path, _ = readable[0]
    ref_model, ref_meta = load_snapshot(ref_path)
    layers = [l for l in dict.fromkeys(layers) if l != "logits"]
    for l in layers:
        _layer_info(ref_model, l)  # an unknown layer fails here, naming the closest ones
    overview = list(overview) if overview is not None else overview_layers(ref_model)
    all_layers = sorted(dict.fromkeys([*overview, *layers]), key=lambda l: _layer_info(ref_model, l).first)
    channels = {l: list((channels or {}).get(l, [])) for l in layers}
    renders = renders or {}
    image_size = image_size or trained_image_size(run_dir) or ref_meta.info.input_size
    paths = resolve_probe(run_dir, probe, probe_limit)
    cache = out_dir / "cache"
    rf = {l: receptive_field(ref_model, l, image_size) for l in layers}

    layer_rows, channel_rows, found = [], [], {}
    ref_stats = None
    bar = tqdm(readable, desc="metrics", unit="snapshot", disable=quiet, dynamic_ncols=True)
    for epoch, path, meta in bar:
        bar.set_postfix_str(f"epoch {epoch}")
        try:
            model, meta = (ref_model, ref_meta) if epoch == ref_epoch else load_snapshot(path)
        except FeatureshiftError as e:
            missing[epoch] = str(e)
            continue
        stats = probe_stats(model, all_layers, paths, image_size=image_size, meta=meta, cache_dir=cache,
                            device=device, quiet=quiet, desc=f"probe, epoch {epoch}")
        if ref_stats is None:
            ref_stats = stats
        wc = weight_change(ref_model, model, all_layers)
        for l in all_layers:
            layer_rows.append({"epoch": epoch, "layer": l, "weight_change": wc[l].value,
                               "cka": cka(ref_stats, stats, l)})
        for l in layers:
            corr = channel_correlation(ref_stats, stats, l)
            per = {c: {"drift": np.nan, "cross_b_on_a": np.nan, "cross_a_on_b": np.nan} for c in range(len(corr))}
            have = [c for c in channels[l] if (l, ref_epoch, c) in renders and (l, epoch, c) in renders]
            if have:
                ra = [_read_image(renders[(l, ref_epoch, c)]) for c in have]
                rb = [_read_image(renders[(l, epoch, c)]) for c in have]
                drift = visual_drift(ra, rb)
                b_on_a, a_on_b = cross_activation(ref_model, model, [(l, c) for c in have], ra, rb)
                for i, c in enumerate(have):
                    per[c] = {"drift": drift[i], "cross_b_on_a": b_on_a[i], "cross_a_on_b": a_on_b[i]}
            for c in range(len(corr)):
                channel_rows.append({"epoch": epoch, "layer": l, "channel": c,
                                     "weight_change": wc[l].channels[c], "correlation": corr[c], **per[c]})
            for c in channels[l]:
                found[(l, c, epoch)] = find_examples(stats.layers[l], c, examples, paths, image_size, rf[l])
        if model is not ref_model:
            del model
    bar.close()
    measured = sorted({r["epoch"] for r in layer_rows})
    result = RunMetrics(run_dir, measured, ref_epoch, all_layers, channels, layer_rows, channel_rows, paths,
                        image_size, found, rf, {l: _layer_info(ref_model, l) for l in all_layers},
                        {l: [s.module for s in channel_sources(ref_model, l)] for l in all_layers}, missing)
    _write_run_metrics(out_dir, result)
    return result


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


def _write_run_metrics(out_dir: Path, m: RunMetrics) -> None:
    files = {"layers": out_dir / "layers.csv", "channels": out_dir / "channels.csv",
             "examples": out_dir / "examples.json", "summary": out_dir / "summary.json"}
    _write_csv(files["layers"], m.layer_rows, ("epoch", "layer", "weight_change", "cka"))
    _write_csv(files["channels"], m.channel_rows, ("epoch", "layer", "channel", *CHANNEL_COLUMNS))
    write_json(files["examples"], {
        "probe": [str(p) for p in m.probe], "image_size": m.image_size,
        "about": "per layer, channel and epoch: the probe images that activate the channel most (spatial "
                 "maximum), as [probe index, activation, crop box x0, y0, x1, y1 in the resized image]",
        "layers": {l: {"receptive_field": m.receptive_field[l], "channels": {
            str(c): {str(e): [[x.index, round(x.value, 6), *x.box] for x in m.examples[(l, c, e)]]
                     for e in m.epochs if (l, c, e) in m.examples} for c in m.channels[l]}} for l in m.channels},
    })
    write_json(files["summary"], {
        "metrics_version": METRICS_VERSION, "reference_epoch": m.reference, "epochs": m.epochs,
        "layers": m.layers, "channel_layers": {l: m.channels[l] for l in m.channels},
        "probe_images": len(m.probe), "image_size": m.image_size, "probe_batch": PROBE_BATCH,
        "unreadable_snapshots": {str(k): v for k, v in m.missing.items()},
        "weight_sources": m.sources,
        "definitions": "docs/metrics.md",
    })
    m.files = files
