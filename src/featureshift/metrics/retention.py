"""Example retention: does a channel still fire most on the probe images it fired most on at the
reference? One number per channel that sums up its dataset examples at two snapshots, with a
bootstrap interval over the probe images (docs/metrics.md, "Example retention").

retention = the later snapshot's mean peak activation on the reference's top share of the probe
images / its mean peak activation on its own top share. 1: the reference's strongest images are
still (as strong as) the strongest; near 0: the channel no longer fires on them. It is never above
1: no set of that size has a larger sum than the top share itself.

The top share is a share of the probe set (TOP_SHARE), not a count of images, so that the
number estimates a property of the image distribution the probe set is drawn from, which the
bootstrap interval is of; a share that ends inside an image counts that image in part.
"""
from __future__ import annotations

import numpy as np

from .similarity import Bootstrap, ChannelIntervals

TOP_SHARE = 0.1  # the strongest tenth of the probe images
_CHUNK = 64  # channels at a time: (resamples, chunk, images) floats in memory


def _top_sums(order: np.ndarray, values: np.ndarray, weights: np.ndarray, share: float) -> np.ndarray:
    """For each row of `weights` (draw counts of the images, (R, n)) and each channel (columns of
    `order` and `values`, (n, C)): the weighted sum of `values` over the images in the first
    `share` of the total weight, taken in the channel's `order` (an image at the boundary in
    part). Returns (R, C)."""
    total = weights.sum(1)[:, None, None]
    n = len(order)
    # Only the first images of each order can be in the share: a resample rarely needs more than
    # twice the share's count to fill it, and one that does is computed over every image.
    depth = min(n, int(np.ceil(2 * share * n)) + 8)
    while True:
        head = order[:depth]
        w = weights[:, head.T]  # (R, C, depth): each channel's draw counts in its own order
        before = np.cumsum(w, axis=2) - w
        taken = np.clip(share * total - before, 0.0, w)
        if depth == n or np.allclose(taken.sum(2), share * total[:, :, 0]):
            break
        depth = n
    ordered = np.take_along_axis(values, head, axis=0).T  # (C, depth)
    return np.einsum("rcn,cn->rc", taken, ordered)


def retention_of(peak_a: np.ndarray, peak_b: np.ndarray, weights: np.ndarray,
                 share: float = TOP_SHARE) -> np.ndarray:
    """Example retention per channel for each row of draw counts `weights` ((R, n)): (R, C), NaN
    where the channel fires on none of its top share at either snapshot (a dead channel has no
    top examples to keep)."""
    a = peak_a.astype(np.float64)
    b = peak_b.astype(np.float64)
    out = np.empty((weights.shape[0], a.shape[1]))
    for start in range(0, a.shape[1], _CHUNK):
        part = slice(start, start + _CHUNK)
        # a stable order, as find_examples ranks the images: ties keep the probe order
        order_a = np.argsort(-a[:, part], axis=0, kind="stable")
        order_b = np.argsort(-b[:, part], axis=0, kind="stable")
        kept = _top_sums(order_a, b[:, part], weights, share)
        own_b = _top_sums(order_b, b[:, part], weights, share)
        own_a = _top_sums(order_a, a[:, part], weights, share)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, part] = np.where((own_a > 0) & (own_b > 0), kept / own_b, np.nan)
    return out


def example_retention(peak_a: np.ndarray, peak_b: np.ndarray, share: float = TOP_SHARE) -> np.ndarray:
    """Per channel, the example retention from the reference's peaks `peak_a` to a later
    snapshot's `peak_b` ((images, channels) each, `LayerStats.peak`)."""
    return retention_of(peak_a, peak_b, np.ones((1, len(peak_a))), share)[0]


def retention_interval(peak_a: np.ndarray, peak_b: np.ndarray, boot: Bootstrap,
                       share: float = TOP_SHARE) -> ChannelIntervals:
    """Per channel, the percentile bootstrap interval of `example_retention` over the probe
    images, with the resamples of `boot` (`similarity.probe_bootstrap`); NaN where more than
    half of the resamples have no value (a channel that fires on almost no image)."""
    channels = peak_a.shape[1]
    if boot.resamples == 0:
        return ChannelIntervals(np.full(channels, np.nan), np.full(channels, np.nan))
    values = retention_of(peak_a, peak_b, boot.weights, share)
    enough = np.isfinite(values).sum(0) >= boot.resamples / 2
    low, high = np.full(channels, np.nan), np.full(channels, np.nan)
    if enough.any():
        filled = values[:, enough]
        tail = 100 * (1 - boot.level) / 2
        low[enough], high[enough] = np.nanpercentile(filled, [tail, 100 - tail], axis=0)
    return ChannelIntervals(low, high)
