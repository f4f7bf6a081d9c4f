"""Representation measures on the probe set: linear CKA per layer (minibatch, unbiased
HSIC) and, per channel, the correlation across probe images of its pooled activation."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .probe import ProbeStats


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
    """Linear CKA of `layer` between two snapshots on the same probe set."""
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
