"""Differential renders: what a channel gained and lost between two networks (optvis.pair).

The networks are built by hand: a small random conv net A, and B equal to A except that one
channel of its layer "block" also carries a detector of a vertical grating. What B's channel
gained is exactly that detector, and nothing was lost, so the renders have a known answer.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from featureshift import FeatureshiftError, attach_info
from featureshift.models.info import ModelInfo
from featureshift.optvis import objectives
from featureshift.optvis.engine import render
from featureshift.optvis.pair import NetworkPair, render_difference

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CHANNEL = 2  # the channel of "block" that gains the detector
PERIOD = 6  # pixels per cycle of the detector's grating
KW = dict(steps=48, size=48, seed=1, quiet=True)
# Checks that hold at every step (equalities, what never has a gradient): fewer steps see the same.
FEW = dict(KW, steps=12)


class Block(nn.Module):
    """A random conv channel plus an extra path on the image, whose weights are zero before."""

    def __init__(self):
        super().__init__()
        self.main = nn.Conv2d(8, 4, 3, padding=1)
        self.extra = nn.Conv2d(3, 4, 2 * PERIOD + 1, padding=PERIOD, padding_mode="replicate")

    def forward(self, image, h):
        return torch.relu(self.main(h)) + torch.relu(self.extra(image))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU())
        self.block = Block()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.block(x, self.stem(x)))


def info(**changes):
    return ModelInfo(**{**dict(arch="tiny", num_classes=2, class_names=["a", "b"], input_size=48), **changes})


def grating() -> torch.Tensor:
    """A vertical grating of PERIOD pixels, zero mean, on the luminance of all three colors."""
    k = 2 * PERIOD + 1
    x = torch.arange(k, dtype=torch.float32) - PERIOD
    window = torch.hann_window(k + 2, periodic=False)[1:-1]
    wave = torch.cos(2 * math.pi * x / PERIOD) * window
    kernel = (wave - wave.mean())[None, :].expand(k, k) * window[:, None]
    return kernel.expand(3, k, k) / kernel.abs().sum()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    before = Net()
    with torch.no_grad():
        before.block.extra.weight.zero_()
        before.block.extra.bias.fill_(-1.0)  # off for every image
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.block.extra.weight[CHANNEL] = 20 * grating()
        after.block.extra.bias[CHANNEL] = -2.0
    return attach_info(before.eval(), info()), attach_info(after.eval(), info())


def detector(after: Net, images: np.ndarray) -> np.ndarray:
    """The added detector's response (spatial mean) to pictures in [0, 1], normalized as they were rendered."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (info().mean, info().std))
    with torch.no_grad():
        return torch.relu(after.block.extra((x - mean) / std))[:, CHANNEL].mean((1, 2)).numpy()


def test_the_gained_picture_shows_the_added_detector_and_nothing_is_lost(pair):
    before, after = pair
    diff = render_difference(before, after, [("block", CHANNEL)], **KW)
    plain = render(before, [("block", CHANNEL)], **KW)  # what A's channel responds to
    gained, plain_response = detector(after, diff.gained.images)[0], detector(after, plain.images)[0]
    assert gained > 4 * plain_response, (gained, plain_response)  # measured: 27.2 vs 4.9, 5.5x
    # on the gained picture the detector outweighs A's channel (measured: 27.2 vs 0.28, 96x)
    assert gained > 20 * diff.gained_responses.before[0], (gained, diff.gained_responses)
    # the gain is the detector's response: act_B - act_A on the picture, as the render scored it
    assert diff.gained.scores[0] == pytest.approx(gained, rel=1e-3)
    assert diff.gained_responses.after[0] - diff.gained_responses.before[0] == pytest.approx(gained, rel=1e-3)
    # the picture is the grating: its strongest horizontal frequency is the detector's
    profile = diff.gained.images[0].mean(axis=(0, 2)) - diff.gained.images[0].mean()
    assert np.argmax(np.abs(np.fft.rfft(profile))[1:]) + 1 == round(KW["size"] / PERIOD)
    # nothing was lost: act_A - act_B is at most 0 and stays 0, without a gradient (the starting noise)
    assert diff.lost.scores[0] == 0 and diff.lost.no_response == {0}
    assert diff.lost_responses.before[0] == diff.lost_responses.after[0]


class Recorded(objectives.Objective):
    """An objective that remembers the largest value it took at any step."""

    def __init__(self, inner):
        self.inner, self.largest = inner, 0.0

    def __call__(self, batch):
        values = self.inner(batch)
        self.largest = max(self.largest, values.detach().abs().max().item())
        return values

    def layers(self, own):
        return self.inner.layers(own)


def test_a_network_against_itself_gains_nothing_at_any_step(pair):
    before, _ = pair
    gained = Recorded(objectives.gained())
    result = render(NetworkPair(before, before), [("block", c) for c in range(4)], objective=gained, **FEW)
    assert gained.largest == 0 and (result.scores == 0).all()  # the two networks cancel exactly
    # where no ReLU blocks the start, there is no gradient at all: the picture is the starting noise
    # (a channel off on it is pushed on by Lucid's dead-ReLU fix in the network after only)
    assert {1, 2, 3} <= result.no_response


def test_one_network_of_a_pair_renders_as_that_network_alone(pair):
    # same seeds, transforms and settings: the pair only adds the second network
    before, after = pair
    alone = render(after, [("block", 1), ("stem.1", 3)], **FEW)
    paired = render(NetworkPair(before, after), [("block", 1), ("stem.1", 3)],
                    objective=objectives.channel(network="after"), **FEW)
    assert np.array_equal(alone.images, paired.images)


def test_gained_with_diversity_gives_several_different_pictures(pair):
    before, after = pair
    result = render(NetworkPair(before, after), [("block", CHANNEL)], objective="gained", diversity=2, **FEW)
    assert result.images.shape[0] == 2 and not np.array_equal(result.images[0], result.images[1])
    assert "diversity(network='after')" in result.settings["objective"]


def test_networks_of_two_architectures_are_refused_naming_the_difference(pair):
    before, _ = pair
    other = Net()
    other.block.main = nn.Conv2d(8, 4, 5, padding=2)
    attach_info(other, info())
    with pytest.raises(FeatureshiftError, match=r"differ in architecture: 'block.main' is Conv2d\(8, 4, "
                                                r"kernel_size=\(3, 3\).*kernel_size=\(5, 5\)") as e:
        NetworkPair(before, other)
    assert "\n" not in str(e.value)


def test_networks_with_other_preprocessing_are_refused_naming_it(pair):
    before, after = pair
    other = attach_info(copy.deepcopy(after), info(mean=(0.5, 0.5, 0.5)))
    with pytest.raises(FeatureshiftError, match=r"take their input differently \(mean \(0.485, 0.456, 0.406\) "
                                                r"before, \(0.5, 0.5, 0.5\) after\)") as e:
        render_difference(before, other, [("block", 0)], steps=1, size=32, quiet=True)
    assert "\n" not in str(e.value)


def test_a_gained_render_of_one_network_says_it_needs_two(pair):
    before, _ = pair
    with pytest.raises(FeatureshiftError, match=r"compares two networks, before and after: it reads after\.block, "
                                                r"before\.block"):
        render(before, [("block", 0)], objective="gained", steps=1, size=32, quiet=True)


@pytest.mark.slow
def test_a_pair_renders_in_chunks_and_in_bf16_as_any_network(pair):
    before, after = pair
    targets = [("block", CHANNEL), ("stem.1", 1), ("block", 0)]
    together = render(NetworkPair(before, after), targets, objective="gained", **KW)
    one_by_one = render(NetworkPair(before, after), targets, objective="gained", batch_size=1, **KW)
    assert np.array_equal(together.images, one_by_one.images) and together.targets == targets
    bf16 = render(NetworkPair(before, after), targets[:1], objective="gained", precision="bf16", **KW)
    assert bf16.settings["precision"] == "bf16" and bf16.scores[0] > 0.5 * together.scores[0]


def test_each_network_of_a_pair_runs_only_as_deep_as_the_objective_reads(pair):
    before, after = pair
    both = NetworkPair(before, after)
    modules = dict(both.named_modules())

    def calls_per_step(objective, target) -> dict[str, int]:
        """How often each network's modules run in one more step (listing the layers runs them all once)."""
        counts = []
        for steps in (2, 3):
            calls = dict.fromkeys(("before.stem.0", "before.block", "after.stem.0", "after.block", "after.head"), 0)
            handles = [modules[name].register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(
                name, calls[name] + 1)) for name in calls]
            try:
                render(both, [target], objective=objective, steps=steps, size=32, quiet=True)
            finally:
                for h in handles:
                    h.remove()
            counts.append(calls)
        return {name: counts[1][name] - counts[0][name] for name in counts[0]}

    assert calls_per_step("gained", ("stem.1", 0)) == {"before.stem.0": 1, "before.block": 0, "after.stem.0": 1,
                                                       "after.block": 0, "after.head": 0}
    assert calls_per_step(objectives.channel(network="after"), ("block", 0)) == {
        "before.stem.0": 0, "before.block": 0, "after.stem.0": 1, "after.block": 1, "after.head": 0}


def test_a_pair_names_the_layers_and_channels_of_its_networks_in_errors(pair):
    before, after = pair
    with pytest.raises(FeatureshiftError, match=r"Channel 9 is out of range for layer 'block', which has 4 channels"):
        render_difference(before, after, [("block", 9)], steps=1, size=32, quiet=True)
    with pytest.raises(FeatureshiftError, match=r"'after\.blok' is not a layer.*Did you mean: after\.block"):
        render_difference(before, after, [("blok", 0)], steps=1, size=32, quiet=True)
    with pytest.raises(FeatureshiftError, match="Only one of the two networks carries its preprocessing"):
        NetworkPair(before, copy.deepcopy(Net()))
