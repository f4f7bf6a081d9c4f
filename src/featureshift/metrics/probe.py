"""What a snapshot's layers do on a fixed probe set of images.

Probe statistics are computed once per snapshot (`probe_stats`, cached on disk keyed by
the snapshot checksum and the settings); every representation measure and the dataset
examples are then cheap.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..device import resolve_device
from ..errors import FeatureshiftError
from ..io import atomic_path
from ..models.info import model_info
from ..models.layers import truncated

METRICS_VERSION = "1"  # part of every probe cache key and of RUN/metrics/summary.json
PROBE_BATCH = 32  # images per forward pass, and per CKA minibatch (fixed so CKA never depends on memory settings)
DEFAULT_PROBE_LIMIT = 256


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
    """What probe statistics depend on besides the weights: the images, their size, the layers."""
    h = hashlib.sha256()
    h.update(f"v{METRICS_VERSION}|{image_size}|{PROBE_BATCH}|{','.join(layers)}|".encode())
    for p in paths:
        h.update(str(Path(p).resolve()).encode() + b"\n")
    return h.hexdigest()[:16]


def probe_stats(model: nn.Module, layers: Sequence[str], paths: Sequence[Path], *, image_size: int | None = None,
                meta=None, cache_dir: str | Path | None = None, device: str = "auto", quiet: bool = False,
                desc: str = "probe") -> ProbeStats:
    """Run the probe images through `model` once, in batches, and keep what every metric needs.

    Cached in `cache_dir` (if given) under the snapshot checksum and the settings.
    """
    info = model_info(model)
    image_size = image_size or info.input_size
    layers = list(dict.fromkeys(layers))
    paths = [Path(p) for p in paths]
    if len(paths) < 4:
        raise FeatureshiftError(
            f"The probe set has {len(paths)} image(s); the representation metrics need at least 4. "
            "Use a run with more validation images or pass --probe DIR with more images."
        )
    from ..snapshot import network_checksum

    checksum = network_checksum(model, meta.checksum if meta is not None else None)
    key = probe_key(paths, image_size, layers)
    cache = Path(cache_dir) / f"probe-{checksum[:16]}-{key}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return load_stats(cache, checksum, key, layers)
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    dev = resolve_device(str(device))
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
        save_stats(cache, stats)
    return stats


def probe_loader(paths: Sequence[Path], info, image_size: int):
    """Batches of PROBE_BATCH probe images, in order, as the network sees them (no labels)."""
    from ..data import ImageDataset, eval_transform

    ds = ImageDataset([(Path(p), 0) for p in paths], eval_transform(info, image_size), channels=info.in_chans)

    class _Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            item = ds[i]
            return item[0] if isinstance(item, (tuple, list)) else item

    return torch.utils.data.DataLoader(_Images(), batch_size=PROBE_BATCH, shuffle=False, num_workers=0)


def save_stats(path: Path, s: ProbeStats) -> None:
    """Write probe statistics to one compressed .npz file, atomically."""
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


def load_stats(path: Path, checksum: str, key: str, layers: Sequence[str]) -> ProbeStats:
    """Probe statistics saved by `save_stats`; ValueError unless they are for this checksum, key and layers."""
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


def resolve_probe(run_dir: str | Path | None = None, probe: str | Path | None = None,
                  limit: int | None = DEFAULT_PROBE_LIMIT) -> list[Path]:
    """The probe images: every readable image under `probe` (any layout), else the run's validation images.

    More than `limit` images are thinned to `limit` evenly spaced ones (the validation
    list is ordered by class, so every class keeps its share); the choice is fixed.
    """
    if probe is not None:
        from ..data import check_image, class_files

        root = Path(probe)
        if not root.exists():
            raise FeatureshiftError(
                f"The probe folder {root} does not exist. Give a folder of images with --probe (sub-folders are "
                "searched too), or leave --probe out to use the run's validation images.")
        if not root.is_dir():
            raise FeatureshiftError(f"The probe {root} is a file; give a folder of images with --probe.")
        paths = [p for p in class_files(root) if check_image(p) is None]
        if not paths:
            raise FeatureshiftError(f"The probe folder {root} holds no readable images; add some or use another folder.")
    elif run_dir is not None:
        from ..run import probe_samples

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
