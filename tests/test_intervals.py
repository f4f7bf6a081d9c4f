"""Bootstrap intervals of CKA and of the channel correlation over the probe images, on
constructed features whose answer is known, and as run_metrics writes them."""
import csv
import json

import numpy as np
import pytest

from featureshift.metrics.similarity import Bootstrap, cka_from_grams, cka_interval, correlation_interval, \
    probe_bootstrap

BATCH = 32


def features(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative (post-ReLU-like) features of n images at A, and B = A plus noise."""
    rng = np.random.default_rng(seed)
    a = np.maximum(rng.normal(size=(n, 24)) / np.arange(1, 25) ** 0.7, 0)
    b = np.maximum(a + noise * rng.normal(size=a.shape) / np.arange(1, 25) ** 0.7, 0)
    return a, b


def grams(f: np.ndarray) -> list[np.ndarray]:
    return [f[i:i + BATCH] @ f[i:i + BATCH].T for i in range(0, len(f), BATCH)]


def test_with_every_image_drawn_once_the_resample_is_the_point_estimate():
    a, b = features(70, 0.5)  # minibatches of 32, 32 and 6
    once = Bootstrap(np.ones((1, 70)), 0.95, 0)
    iv = cka_interval(grams(a), grams(b), once)
    assert iv.low == pytest.approx(cka_from_grams(grams(a), grams(b)), abs=1e-12) == iv.high
    corr = correlation_interval(a, b, once)
    expected = [np.corrcoef(a[:, c], b[:, c])[0, 1] for c in range(a.shape[1])]
    assert np.allclose(corr.low, expected) and np.allclose(corr.high, expected)


def test_an_image_drawn_twice_is_never_paired_with_itself():
    # Every image of the first half drawn twice, the rest never: the unbiased estimator must
    # see the first half's 16 different images, not 32 images with 16 exact duplicates.
    a, b = features(32, 0.5)
    twice = np.zeros((1, 32))
    twice[0, :16] = 2
    iv = cka_interval(grams(a), grams(b), Bootstrap(twice, 0.95, 0))
    assert iv.low == pytest.approx(cka_from_grams(grams(a[:16]), grams(b[:16])), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_the_interval_contains_the_point_estimate(seed):
    a, b = features(64, 0.4, seed)
    boot = probe_bootstrap(64, BATCH, seed=seed)
    iv = cka_interval(grams(a), grams(b), boot)
    assert iv.low <= cka_from_grams(grams(a), grams(b)) <= iv.high
    corr = correlation_interval(a, b, boot)
    point = np.array([np.corrcoef(a[:, c], b[:, c])[0, 1] for c in range(a.shape[1])])
    assert np.mean((corr.low <= point) & (point <= corr.high)) >= 0.9
    assert np.all(corr.low <= corr.high)


def test_identical_snapshots_give_one_with_a_zero_width_interval():
    a, _ = features(40, 0.0)
    a[:, 5] = 0.0  # a dead channel stays "unchanged" in every resample
    boot = probe_bootstrap(40, BATCH)
    iv = cka_interval(grams(a), grams(a), boot)
    assert iv.low == pytest.approx(1.0, abs=1e-12) and iv.high == pytest.approx(1.0, abs=1e-12)
    corr = correlation_interval(a, a, boot)
    assert np.allclose(corr.low, 1.0, atol=1e-12) and np.allclose(corr.high, 1.0, atol=1e-12)


def test_the_interval_narrows_as_the_probe_set_grows():
    widths = []
    for n in (32, 256):
        a, b = features(n, 0.5, seed=1)
        boot = probe_bootstrap(n, BATCH, seed=1)
        iv = cka_interval(grams(a), grams(b), boot)
        corr = correlation_interval(a, b, boot)
        widths.append((iv.high - iv.low, np.median(corr.high - corr.low)))
    (cka_small, corr_small), (cka_large, corr_large) = widths
    # Eight times the images: about sqrt(8) ~ 2.8 times narrower.
    assert cka_large < cka_small / 2 and corr_large < corr_small / 2


def test_a_seeded_bootstrap_is_reproducible_and_another_seed_differs():
    a, b = features(48, 0.5)
    first = cka_interval(grams(a), grams(b), probe_bootstrap(48, BATCH, seed=3))
    again = cka_interval(grams(a), grams(b), probe_bootstrap(48, BATCH, seed=3))
    other = cka_interval(grams(a), grams(b), probe_bootstrap(48, BATCH, seed=4))
    assert first == again and first != other
    ca = correlation_interval(a, b, probe_bootstrap(48, BATCH, seed=3))
    cb = correlation_interval(a, b, probe_bootstrap(48, BATCH, seed=3))
    assert np.array_equal(ca.low, cb.low) and np.array_equal(ca.high, cb.high)


def test_resamples_keep_each_minibatch_at_its_size():
    boot = probe_bootstrap(70, BATCH, resamples=50)
    sums = [boot.weights[:, s:s + BATCH].sum(1) for s in (0, 32, 64)]
    assert np.all(sums[0] == 32) and np.all(sums[1] == 32) and np.all(sums[2] == 6)


def test_too_few_different_images_give_no_interval_rather_than_a_wrong_one():
    a, b = features(4, 0.5)
    # Four images resampled to four draws rarely holds four different ones (4!/4^4 = 9%).
    iv = cka_interval(grams(a), grams(b), probe_bootstrap(4, BATCH))
    assert np.isnan(iv.low) and np.isnan(iv.high)


@pytest.mark.slow  # test-fast stays under a minute; a cheaper test covers the same path
def test_run_metrics_writes_the_intervals_beside_the_unchanged_columns(tmp_path, photos):
    from _fakerun import LAYER, make_run

    from featureshift.metrics.driver import run_metrics

    run = make_run(tmp_path, photos, epochs=(0, 1))
    run_metrics(run, [LAYER], quiet=True, resamples=50)
    layers = list(csv.DictReader((run / "metrics" / "layers.csv").open()))
    assert list(layers[0])[:5] == ["epoch", "layer", "weight_change", "function_change", "cka"]
    assert list(layers[0])[5:] == ["cka_low", "cka_high"]
    for r in layers:
        assert float(r["cka_low"]) <= float(r["cka"]) + 1e-9 and float(r["cka"]) <= float(r["cka_high"]) + 1e-9
    stem = [r for r in layers if r["layer"] == "features.0"]
    assert all(float(r["cka_low"]) == pytest.approx(1.0) == float(r["cka_high"]) for r in stem)
    channels = list(csv.DictReader((run / "metrics" / "channels.csv").open()))
    # The earlier columns first, in their order; later additions (the example retention) come after them.
    assert list(channels[0])[:11] == ["epoch", "layer", "channel", "weight_change", "correlation", "drift",
                                      "cross_b_on_a", "cross_a_on_b", "dead", "correlation_low", "correlation_high"]
    changed = {int(r["channel"]): r for r in channels if r["epoch"] == "1"}
    assert float(changed[2]["correlation_low"]) == pytest.approx(1.0)  # untouched channel: exactly unchanged
    assert float(changed[3]["correlation_low"]) < float(changed[3]["correlation_high"])  # re-initialized
    summary = json.loads((run / "metrics" / "summary.json").read_text())["intervals"]
    assert summary["resamples"] == 50 and summary["level"] == 0.95 and summary["seconds"] >= 0
    assert summary["cka"]["features.0"]["1"] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_the_plots_draw_the_intervals_as_error_bars_in_valid_svg(tmp_path):
    import xml.etree.ElementTree as ET

    from featureshift.report import plots

    epochs, nan = [0, 1, 2], float("nan")
    plots.layer_history(epochs, [0, 0.2, 0.3], [1.0, 0.9, 0.8], tmp_path / "bare.svg")
    plots.layer_history(epochs, [0, 0.2, 0.3], [1.0, 0.9, 0.8], tmp_path / "bars.svg", [1.0, 0.85, nan],
                        [1.0, 0.95, nan])
    series = {"weight change": [0, 0.1, 0.2], "correlation": [1.0, 0.7, 0.5]}
    plots.channel_history(epochs, series, tmp_path / "channel.svg", {"correlation": ([1.0, 0.6, 0.3], [1.0, 0.8, 0.6])})
    for name in ("bare", "bars", "channel"):
        ET.parse(tmp_path / f"{name}.svg")  # well-formed XML
    assert "LineCollection" not in (tmp_path / "bare.svg").read_text()
    assert "LineCollection" in (tmp_path / "bars.svg").read_text()
    assert "LineCollection" in (tmp_path / "channel.svg").read_text()


def test_the_layer_table_shows_the_interval_or_a_dash():
    from featureshift.report.site import interval_text

    assert interval_text({"cka_low": 0.88149, "cka_high": 0.94}, "cka") == "0.881–0.940"
    assert interval_text({"cka_low": float("nan"), "cka_high": float("nan")}, "cka") == "–"
    assert interval_text({}, "cka") == "–"


def test_a_small_last_minibatch_does_not_empty_the_interval():
    # 37 images: a last minibatch of 5, whose resamples mostly hold fewer than 4 different images.
    a, b = features(37, 0.5)
    iv = cka_interval(grams(a), grams(b), probe_bootstrap(37, BATCH))
    assert iv.low <= cka_from_grams(grams(a), grams(b)) <= iv.high


def test_compare_gives_the_cka_and_each_correlation_with_their_intervals(tmp_path, photos):
    from _fakerun import IMAGE_SIZE, LAYER, make_run

    import featureshift

    run = make_run(tmp_path, photos, epochs=(0, 1))
    snaps = run / "snapshots"
    result = featureshift.compare(snaps / "000.safetensors", snaps / "001.safetensors", LAYER, channels="2,3",
                                  image_size=IMAGE_SIZE, quiet=True, steps=2, size=32, floor=False)
    iv = result.cka_interval
    assert iv.low <= result.cka + 1e-9 and result.cka <= iv.high + 1e-9
    assert result.rows[2]["correlation_low"] == pytest.approx(1.0)  # untouched channel: exactly unchanged
    assert result.rows[3]["correlation_low"] < result.rows[3]["correlation_high"]  # re-initialized
    table = result.table()
    assert f"(95% interval {iv.low:.3f}-{iv.high:.3f})" in table and "interval" in table.splitlines()[3]
