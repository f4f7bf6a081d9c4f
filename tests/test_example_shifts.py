"""The probe images whose activation rose and fell most between two snapshots, and the example
retention (with its bootstrap interval) that sums up what a channel's dataset examples say."""
import copy
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from featureshift.metrics.examples import crop_box, shifted_examples
from featureshift.metrics.probe import probe_stats
from featureshift.metrics.retention import TOP_SHARE, example_retention, retention_interval, retention_of
from featureshift.metrics.similarity import probe_bootstrap

FIRST = "features.1"  # the ReLU after SqueezeNet's first convolution: a channel is one 3x3 RGB filter
GAINS_RED, LOSES_RED, UNTOUCHED = 7, 9, 3


def _red_detector(model, channel: int) -> None:
    """Make `channel` of the first convolution fire on saturated red (red up, green and blue down),
    strongly enough to outdo the ImageNet filters on any photograph."""
    conv = model.features[0]
    with torch.no_grad():
        conv.weight[channel] = 5 * torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 3, 3)
        conv.bias[channel] = 0.0


@pytest.fixture(scope="module")
def red_pair(squeezenet, photos, tmp_path_factory):
    """(stats before, stats after, probe paths): channel 7 becomes a red detector, channel 9 stops being
    one, channel 3 is untouched; the probe set holds four photographs, a gray and a pure red image."""
    root = tmp_path_factory.mktemp("redprobe")
    for name, photo in photos.items():
        photo.resize((80, 64)).save(root / f"{name}.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "red.png")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(root / "gray.png")
    paths = sorted(root.iterdir())
    before, after = copy.deepcopy(squeezenet), copy.deepcopy(squeezenet)
    _red_detector(before, LOSES_RED)
    _red_detector(after, GAINS_RED)
    stats = [probe_stats(m, [FIRST], paths, image_size=64, quiet=True).layers[FIRST] for m in (before, after)]
    return stats[0], stats[1], paths


def test_rose_most_is_the_image_a_channel_was_made_to_detect_and_fell_most_the_one_it_stopped_detecting(red_pair):
    before, after, paths = red_pair
    gained = shifted_examples(before, after, GAINS_RED, 3, paths, 64, 3)
    assert gained.rose[0].path.name == "red.png"
    assert gained.rose[0].change > 2 * max(x.change for x in gained.rose[1:])  # by far the largest rise
    assert all(x.change > 0 for x in gained.rose) and all(x.change < 0 for x in gained.fell)
    lost = shifted_examples(before, after, LOSES_RED, 3, paths, 64, 3)
    assert lost.fell[0].path.name == "red.png" and "red.png" not in [x.path.name for x in lost.rose]
    assert [x.change for x in lost.fell] == sorted(x.change for x in lost.fell)  # largest fall first
    untouched = shifted_examples(before, after, UNTOUCHED, 3, paths, 64, 3)
    assert untouched.rose == [] and untouched.fell == []  # the same activation on every image
    # The crop is where the channel fires where it fires more: at the later snapshot for a rise.
    red = gained.rose[0]
    assert red.box == crop_box(after, red.index, GAINS_RED, 64, 3)
    assert lost.fell[0].box == crop_box(before, lost.fell[0].index, LOSES_RED, 64, 3)
    assert red.after == pytest.approx(float(after.peak[red.index, GAINS_RED]))


def test_example_retention_is_one_for_an_untouched_channel_and_low_for_one_that_stopped_detecting(red_pair):
    before, after, paths = red_pair
    value = example_retention(before.peak, after.peak)
    iv = retention_interval(before.peak, after.peak, probe_bootstrap(len(paths), 32))
    assert value[UNTOUCHED] == 1.0 and iv.low[UNTOUCHED] == iv.high[UNTOUCHED] == 1.0
    # Before, channel 9 fired most on the red image; after, hardly at all on it. On six images the
    # interval is wide (a resample without the red image tells another story), but it holds the estimate.
    assert value[LOSES_RED] < 0.1 and iv.low[LOSES_RED] <= value[LOSES_RED] <= iv.high[LOSES_RED]
    assert np.nanmax(value) <= 1.0 + 1e-12
    finite = np.isfinite(iv.low)
    assert (iv.low[finite] <= iv.high[finite]).all()


def test_a_top_share_that_ends_inside_an_image_counts_it_in_part():
    rng = np.random.default_rng(0)
    a, b = rng.random((28, 4)), rng.random((28, 4))
    got = example_retention(a, b)
    top = TOP_SHARE * 28  # 2.8 images: two whole and 0.8 of the third

    def share_sum(order, values):
        return values[order[:2]].sum() + (top - 2) * values[order[2]]

    for c in range(4):
        want = share_sum(np.argsort(-a[:, c]), b[:, c]) / share_sum(np.argsort(-b[:, c]), b[:, c])
        assert got[c] == pytest.approx(want)
    # A resample is the same computation with draw counts: every image drawn once is the estimate.
    assert retention_of(a, b, np.ones((3, 28))) == pytest.approx(np.tile(got, (3, 1)))
    # An image drawn twice counts as two images of the share.
    w = np.ones((1, 28))
    w[0, np.argmax(b[:, 0])] = 2
    w[0, np.argmin(b[:, 0])] = 0
    doubled = np.concatenate([b, b[[np.argmax(b[:, 0])]]])[np.arange(29) != np.argmin(b[:, 0])]
    doubled_a = np.concatenate([a, a[[np.argmax(b[:, 0])]]])[np.arange(29) != np.argmin(b[:, 0])]
    assert retention_of(a, b, w)[0, 0] == pytest.approx(example_retention(doubled_a, doubled)[0])
    # A resample that drew only images far down a channel's order is computed over all of them too.
    last = np.argsort(-a[:, 1])[-5:]
    w = np.zeros((1, 28))
    w[0, last] = 1
    assert retention_of(a, b, w)[0, 1] == pytest.approx(example_retention(a[last], b[last])[1])


def test_a_channel_that_fires_on_nothing_has_no_retention():
    a = np.zeros((12, 2))
    b = np.random.default_rng(1).random((12, 2))
    assert np.isnan(example_retention(a, b)).all()
    iv = retention_interval(a, b, probe_bootstrap(12, 32, resamples=50))
    assert np.isnan(iv.low).all() and np.isnan(iv.high).all()


def test_the_retention_interval_is_seeded_and_narrows_as_the_probe_set_grows():
    rng = np.random.default_rng(2)

    def features(n):
        x = np.maximum(rng.normal(size=(n, 8)), 0)
        return x, np.maximum(x + 0.7 * rng.normal(size=(n, 8)), 0)

    a, b = features(64)
    one = retention_interval(a, b, probe_bootstrap(64, 32, seed=0))
    again = retention_interval(a, b, probe_bootstrap(64, 32, seed=0))
    other = retention_interval(a, b, probe_bootstrap(64, 32, seed=1))
    assert np.array_equal(one.low, again.low) and not np.array_equal(one.low, other.low)
    big_a, big_b = features(1024)
    wide = np.nanmean(one.high - one.low)
    narrow = retention_interval(big_a, big_b, probe_bootstrap(1024, 32))
    assert np.nanmean(narrow.high - narrow.low) < wide / 2


def test_run_metrics_writes_the_shifts_and_the_retention_beside_what_was_there(tmp_path_factory, photos, tmp_path):
    import featureshift
    from _fakerun import CHANGED, IMAGE_SIZE, LAYER, copy_of_run, shared_run

    # (the probe statistics come along where the shared report has made them)
    run = copy_of_run(shared_run(tmp_path_factory, photos), tmp_path / "run")
    m = featureshift.run_metrics(run, [LAYER], {LAYER: [2, 3, 5]}, image_size=IMAGE_SIZE, quiet=True, resamples=50)
    assert (LAYER, 3, 0) not in m.shifts  # nothing to compare the reference with
    for epoch in (1, 2):
        assert m.shifts[(LAYER, 2, epoch)].rose == [] and m.shifts[(LAYER, 2, epoch)].fell == []  # never changed
    changed = m.shifts[(LAYER, 3, 1)]  # re-initialized at epoch 1
    assert changed.rose and changed.fell and len(changed.rose) <= 6
    examples = json.loads((run / "metrics" / "examples.json").read_text())
    assert set(examples["layers"][LAYER]["channels"]) == {"2", "3", "5"}  # the earlier key, as it was
    rows = examples["shifts"][LAYER]["3"]["1"]
    assert [r[0] for r in rows["rose"]] == [x.index for x in changed.rose]
    assert rows["rose"][0][2] - rows["rose"][0][1] == pytest.approx(changed.rose[0].change, abs=1e-5)
    assert examples["shifts"][LAYER]["2"]["2"] == {"rose": [], "fell": []}
    table = {(int(r["epoch"]), int(r["channel"])): r for r in csv.DictReader((run / "metrics" / "channels.csv").open())}
    header = list(next(iter(table.values())))
    assert header[-3:] == ["example_retention", "example_retention_low", "example_retention_high"]  # after the rest
    untouched = table[(2, 2)]
    assert float(untouched["example_retention"]) == float(untouched["example_retention_low"]) == 1.0
    assert 5 in CHANGED[2]
    assert float(table[(2, 5)]["example_retention"]) < 1.0  # re-initialized by epoch 2, not rendered: a column all the same
    summary = json.loads((run / "metrics" / "summary.json").read_text())["example_retention"]
    assert summary["top_share"] == TOP_SHARE and summary["level"] == 0.95
    value, low, high = summary["layers"][LAYER]["3"]["2"]
    assert value == pytest.approx(float(table[(2, 3)]["example_retention"]), rel=1e-5) and low <= high
