"""Representation measures on the probe set: linear CKA per layer (minibatch, unbiased
HSIC) and, per channel, the correlation across probe images of its pooled activation,
each with a bootstrap interval over the probe images (docs/metrics.md, "Intervals")."""
from __future__ import annotations

import dataclasses
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
    r = _flat_rule((a * b).sum(0), na, nb, stats_a.layers[layer].pooled, stats_b.layers[layer].pooled)
    return np.clip(r, -1.0, 1.0)


def _flat_rule(ab: np.ndarray, na: np.ndarray, nb: np.ndarray, pooled_a: np.ndarray,
               pooled_b: np.ndarray) -> np.ndarray:
    """ab / (na nb), except 1 where both are constant on the images and 0 where only one is;
    "constant" relative to the channel's largest activation on the whole probe set."""
    scale_a = np.abs(pooled_a).max(0) + 1e-12
    scale_b = np.abs(pooled_b).max(0) + 1e-12
    flat_a = na <= 1e-6 * scale_a * math.sqrt(len(pooled_a))
    flat_b = nb <= 1e-6 * scale_b * math.sqrt(len(pooled_b))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = ab / (na * nb)
    return np.where(flat_a & flat_b, 1.0, np.where(flat_a | flat_b, 0.0, r))


DEFAULT_RESAMPLES = 200
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """How the probe images are resampled: `weights[r, i]` is how often probe image i is drawn
    in resample r (each minibatch of the CKA resampled on its own, to its own size)."""
    weights: np.ndarray  # (resamples, images) draw counts
    level: float
    seed: int

    @property
    def resamples(self) -> int:
        return int(self.weights.shape[0])


@dataclasses.dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval; NaN at both ends where it could not be computed."""
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class ChannelIntervals:
    """Per channel, the low and high ends of the correlation's bootstrap interval."""
    low: np.ndarray
    high: np.ndarray


def probe_bootstrap(count: int, batch: int, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                    seed: int = DEFAULT_SEED) -> Bootstrap:
    """Seeded resamples of `count` probe images taken in minibatches of `batch`: each minibatch
    drawn with replacement to its own size, so a resample keeps the estimator's minibatches."""
    if not 0 < level < 1:
        raise ValueError(f"the interval level must be between 0 and 1, not {level}")
    rng = np.random.default_rng(seed)
    weights = np.zeros((max(0, resamples), count))
    for start in range(0, count, batch):
        size = min(batch, count - start)
        weights[:, start:start + size] = rng.multinomial(size, np.full(size, 1.0 / size), size=max(0, resamples))
    return Bootstrap(weights, level, seed)


def _weighted_hsic(k: np.ndarray, l: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unbiased HSIC of each resample whose image i is drawn w[r, i] times, as the U-statistic
    over tuples of *different* images weighted by their draw counts: a drawn-twice image is never
    paired with itself, which would put its squared norm where a cross term belongs.

    With every weight 1 this is `_hsic1` exactly. Returns (values, valid); valid is False where
    a resample holds fewer than 4 different images and the U-statistic is undefined."""
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    w2, w3 = w * w, w * w * w
    p = k * l

    def triples(g, g1, g2):  # sum over distinct i, j, q of g_i g1_j g2_q k_ij l_iq
        return (g * (g1 @ k) * (g2 @ l)).sum(1) - (g * ((g1 * g2) @ p)).sum(1)

    s1, s2, s3, s4 = (np.sum(w ** e, 1) for e in (1, 2, 3, 4))
    # The three terms of Song et al.'s kernel, each summed over 4-tuples of different images:
    # k_ij l_ij, k_ij l_qr and k_ij l_iq, the free indices' weights summed out exactly.
    same_pair = ((s1 ** 2 - s2) * (w * (w @ p)).sum(1) - 4 * s1 * (w2 * (w @ p)).sum(1)
                 + 4 * (w3 * (w @ p)).sum(1) + 2 * (w2 * (w2 @ p)).sum(1))
    two_pairs = ((w * (w @ k)).sum(1) * (w * (w @ l)).sum(1) - 4 * triples(w2, w, w)
                 - 2 * (w2 * (w2 @ p)).sum(1))
    shared = s1 * triples(w, w, w) - triples(w2, w, w) - triples(w, w2, w) - triples(w, w, w2)
    n4 = s1 ** 4 - 6 * s1 ** 2 * s2 + 3 * s2 ** 2 + 8 * s1 * s3 - 6 * s4  # weighted count of such 4-tuples
    valid = (w > 0).sum(1) >= 4
    with np.errstate(invalid="ignore", divide="ignore"):
        value = (same_pair + two_pairs - 2 * shared) / n4
    return np.where(valid, value, np.nan), valid


def _percentile(values: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail], axis=axis)
    return low, high


def cka_interval(grams_a: Sequence[np.ndarray], grams_b: Sequence[np.ndarray], boot: Bootstrap) -> Interval:
    """The bootstrap interval of `cka_from_grams` over the probe images (resamples of `boot`)."""
    if len(grams_a) != len(grams_b):
        raise ValueError("the two Gram lists come from different probe sets")
    if boot.resamples == 0:
        return Interval(math.nan, math.nan)
    ab = np.zeros(boot.resamples)
    aa = np.zeros(boot.resamples)
    bb = np.zeros(boot.resamples)
    counted = np.zeros(boot.resamples, bool)  # at least one minibatch of the resample has a value
    start = 0
    for ka, kb in zip(grams_a, grams_b):
        size = ka.shape[0]
        w = boot.weights[:, start:start + size]
        start += size
        if size < 4:
            continue  # as in cka_from_grams: too few images for the unbiased estimator
        # A minibatch whose resample holds fewer than 4 different images adds nothing, as a
        # minibatch of fewer than 4 images adds nothing to the point estimate: a last, small
        # minibatch (4 to 7 images) often has too few, and dropping whole resamples would keep
        # only those in which it happened to draw well.
        for total, (x, y) in ((ab, (ka, kb)), (aa, (ka, ka)), (bb, (kb, kb))):
            value, valid = _weighted_hsic(x, y, w)
            total += np.where(valid, value, 0.0)
        counted |= valid
    if start != boot.weights.shape[1]:
        raise ValueError(f"the resamples are of {boot.weights.shape[1]} probe images, the Gram matrices of {start}")
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where((aa <= 0) | (bb <= 0), np.where((aa == 0) & (bb == 0), 1.0, 0.0),
                          ab / np.sqrt(np.abs(aa * bb)))
    values = np.clip(values[counted], -1.0, 1.0)
    # Only a probe set of a single minibatch of 4 or 5 images leaves most resamples without a value;
    # the few left would say more about which resamples happened to work than about the data.
    if len(values) < boot.resamples / 2:
        return Interval(math.nan, math.nan)
    low, high = _percentile(values, boot.level)
    return Interval(float(low), float(high))


def correlation_interval(pooled_a: np.ndarray, pooled_b: np.ndarray, boot: Bootstrap) -> ChannelIntervals:
    """Per channel, the bootstrap interval of `channel_correlation` over the probe images."""
    n, channels = pooled_a.shape
    if boot.resamples == 0:
        return ChannelIntervals(np.full(channels, np.nan), np.full(channels, np.nan))
    a = pooled_a.astype(np.float64)
    b = pooled_b.astype(np.float64)
    # Centred on the whole probe set first, so that the weighted sums below do not cancel.
    a = a - a.mean(0)
    b = b - b.mean(0)
    w = boot.weights
    total = w.sum(1, keepdims=True)
    ma, mb = (w @ a) / total, (w @ b) / total
    saa = np.maximum(w @ (a * a) - total * ma * ma, 0.0)
    sbb = np.maximum(w @ (b * b) - total * mb * mb, 0.0)
    sab = w @ (a * b) - total * ma * mb
    # The flat-channel rule of channel_correlation, for the resample's n draws.
    r = _flat_rule(sab, np.sqrt(saa), np.sqrt(sbb), pooled_a, pooled_b)
    low, high = _percentile(np.clip(r, -1.0, 1.0), boot.level)
    return ChannelIntervals(low, high)


def _same_probe(a: ProbeStats, b: ProbeStats) -> None:
    if a.key != b.key:
        raise ValueError("probe statistics computed on different probe sets or settings")
