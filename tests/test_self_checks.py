"""Pictures that check themselves: every rendered tile checked against the probe images
(metrics/checks.py), written to RUN/metrics/checks.csv and shown as a badge in the report,
and a planted fooling circuit caught by the checks."""
import csv
import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch

from featureshift.metrics.checks import (AGREEMENT_FACTOR, DATA_HIGH, DATA_LOW, DATA_SPREAD, VIEWS_LOW, agree,
                                         failed_checks, ratio, render_activations)
from featureshift.optvis.transforms import VIEW_COUNT, fixed_views
from featureshift.report.site import channel_page, layer_page

from _fakerun import CHANNELS, LAYER, shared_report


def test_fixed_views_are_the_same_on_every_call_and_move_the_picture():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    first, again = fixed_views(x), fixed_views(x)
    assert len(first) == VIEW_COUNT and all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(v.shape == x.shape and not torch.allclose(v, x, atol=1e-3) for v in first)
    assert not torch.equal(fixed_views(x, seed=1)[0], first[0])
    flat = torch.full((1, 3, 32, 32), 0.3)  # reflected at the border: a flat picture stays flat
    assert all(torch.allclose(v, flat, atol=1e-6) for v in fixed_views(flat))


def test_the_thresholds_fail_weak_runaway_fragile_and_contradicting_pictures():
    assert failed_checks(5.0, 0.9, True) == ()
    assert failed_checks(0.8 * DATA_LOW, 0.9, True) == ("vs_data",)
    assert failed_checks(DATA_SPREAD * 10 * 1.01, 0.9, None, neighbours=10.0) == ("vs_data",)
    assert failed_checks(DATA_SPREAD * 10 * 0.99, 0.9, None, neighbours=10.0) == ()
    assert failed_checks(DATA_HIGH * 1.01, 0.9, None) == ("vs_data",)  # alone in its layer
    assert failed_checks(DATA_HIGH * 1.01, 0.9, None, neighbours=DATA_HIGH) == ("vs_data",)
    assert failed_checks(DATA_HIGH * 0.99, 0.9, None) == ()
    assert failed_checks(math.inf, 0.9, None) == ("vs_data",)  # no real image drives it, the picture does
    assert failed_checks(5.0, VIEWS_LOW * 0.9, False) == ("views", "agreement")
    assert failed_checks(math.nan, math.nan, None) == ()  # nothing measured: nothing to say
    assert ratio(3.0, 0.0) == math.inf and math.isnan(ratio(0.0, 0.0)) and ratio(3.0, 2.0) == 1.5
    assert agree(0.2, 0.2 * AGREEMENT_FACTOR * 0.99) and not agree(0.2, 0.2 * AGREEMENT_FACTOR * 1.01)
    assert agree(1.0, 0.9) and agree(0.0, 0.0) and not agree(0.0, 0.9) and agree(math.nan, 1.0) is None


def test_render_activations_batch_tiles_of_any_size_and_match_the_channel_objective(squeezenet, one_thread):
    from featureshift.metrics.drift import channel_activation

    rng = np.random.default_rng(0)
    images = [rng.random((s, s, 3), dtype=np.float32) for s in (40, 32, 40)]
    targets = [("features.4", 1), ("features.4", 7), ("features.3.squeeze_activation", 2)]
    plain, seen = render_activations(squeezenet, targets, images)
    assert plain == pytest.approx([channel_activation(squeezenet, [t], [im])[0] for t, im in zip(targets, images)],
                                  rel=1e-5)
    views = [[v[0].permute(1, 2, 0).numpy() for v in fixed_views(torch.as_tensor(im).permute(2, 0, 1)[None])]
             for im in images]
    expected = [np.mean([channel_activation(squeezenet, [t], [v])[0] for v in vs]) for t, vs in zip(targets, views)]
    assert seen == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def report(tmp_path_factory, photos):
    return shared_report(tmp_path_factory, photos)


def test_every_rendered_tile_gets_its_checks_in_checks_csv_and_the_summary(report):
    run, _ = report
    rows = list(csv.DictReader(open(run / "metrics" / "checks.csv")))
    summary = json.loads((run / "metrics" / "summary.json").read_text())["self_checks"]
    tiles = {p.stem: p for p in (run / "timeline" / "cache").glob("*.png")}
    assert {(r["layer"], int(r["epoch"]), int(r["channel"])) for r in rows} == \
        {(LAYER, e, c) for e in (0, 1, 2) for c in CHANNELS}
    assert all(r["key"] in tiles for r in rows)  # keyed by the cached tile it checks
    assert summary["tiles"] == len(rows) == summary["trustworthy"] + summary["doubtful"]
    assert summary["seconds"] >= 0 and summary["thresholds"]["vs_data_low"] == DATA_LOW
    by = {(int(r["epoch"]), int(r["channel"])): r for r in rows}
    assert all(by[(0, c)]["agreement"] == "" for c in CHANNELS)  # nothing to agree on at the reference
    # channel 2 never changes (its tiles differ by the snapshot's checksum only): both sides call it kept
    assert by[(2, 2)]["key"] != by[(0, 2)]["key"] and by[(2, 2)]["agreement"] == "1"
    assert float(by[(2, 2)]["render_kept"]) == pytest.approx(1.0, abs=0.05) and float(by[(2, 2)]["data_kept"]) == 1.0
    # the two kept scores are channels.csv's: B on A and the example retention, not numbers of their own
    channels = {(int(r["epoch"]), int(r["channel"])): r for r in csv.DictReader(open(run / "metrics" / "channels.csv"))
                if r["layer"] == LAYER}
    for (e, c), r in by.items():
        if e:
            assert float(r["render_kept"]) == pytest.approx(float(channels[(e, c)]["cross_b_on_a"]), rel=1e-4)
            assert float(r["data_kept"]) == pytest.approx(float(channels[(e, c)]["example_retention"]), rel=1e-4)
    assert all(float(r["best_real"]) > 0 and float(r["views"]) > 0 for r in rows)
    assert all(r["verdict"] == ("doubtful" if r["failed"] else "trustworthy") for r in rows)


def test_the_checks_leave_the_cached_tiles_as_they_were(report, tmp_path):
    from featureshift.metrics.driver import run_metrics

    from _fakerun import IMAGE_SIZE

    from _fakerun import copy_of_run

    shared, _ = report
    # a copy: measuring again rewrites RUN/metrics, which the other tests read from the shared run
    run = copy_of_run(shared, tmp_path / "run")
    tiles = sorted((run / "timeline" / "cache").glob("*.png"))
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in tiles}
    renders = {}
    for r in csv.DictReader(open(run / "metrics" / "checks.csv")):
        renders[(r["layer"], int(r["epoch"]), int(r["channel"]))] = run / "timeline" / "cache" / f"{r['key']}.png"
    m = run_metrics(run, [LAYER], {LAYER: CHANNELS}, renders=renders, image_size=IMAGE_SIZE, overview=[LAYER],
                    quiet=True, resamples=0)
    assert len(m.checks) == len(renders)
    assert {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in tiles} == before
    off = run_metrics(run, [LAYER], {LAYER: CHANNELS}, renders=renders, image_size=IMAGE_SIZE, overview=[LAYER],
                      quiet=True, resamples=0, self_checks=False)
    assert off.checks is None and "checks" not in off.files
    assert not (run / "metrics" / "checks.csv").exists()  # the earlier checks are not left to be read as these


def test_the_layer_and_channel_pages_show_a_badge_per_tile_with_its_values(report):
    run, index = report
    rows = {(int(r["epoch"]), int(r["channel"])): r for r in csv.DictReader(open(run / "metrics" / "checks.csv"))}
    layer_html = (index.parent / layer_page(LAYER)).read_text()
    badges = re.findall(r'<span class="badge (ok|warn)" title="([^"]*)">', layer_html)
    assert len(badges) == 2 * len(CHANNELS)  # before and after of each rendered channel
    assert all("vs. data" in t and "views" in t and "agreement" in t for _, t in badges)
    assert "Self-checks" in layer_html  # the legend
    for c in CHANNELS:
        html = (index.parent / channel_page(LAYER, c)).read_text()
        strip = html[html.index('class="strip"'):html.index('id="frames"')]
        marks = re.findall(r'<span class="badge (ok|warn)" title=', strip)
        assert marks == [("warn" if rows[(e, c)]["failed"] else "ok") for e in (0, 1, 2)]
        frames = json.loads(re.search(r'<script type="application/json" id="frames">(.*?)</script>', html, re.S)[1])
        assert [f["check"]["cls"] for f in frames] == marks


@pytest.mark.slow
def test_a_planted_fooling_circuit_is_flagged_and_an_ordinary_unit_of_the_same_network_is_not(tmp_path, one_thread):
    """Geirhos et al.'s case: a unit rewired to answer a pattern no natural image holds. Its pictures
    after the rewiring excite it a thousand times beyond any photograph; the checks must say so,
    while the picture of the same unit before, and of its ordinary neighbour, pass."""
    import featureshift
    from featureshift.metrics.driver import run_metrics

    from _fooling import FOOLED, LAYER as FOOLED_LAYER, ORDINARY, detector_peak, make_fooled_run

    run, planted = make_fooled_run(tmp_path)
    fooled_net = featureshift.open_network(run / "snapshots" / "001.safetensors").module
    # the premise: the planted path is silent on every natural probe image
    photos = sorted((tmp_path / "photos").rglob("*.png"))
    assert len(photos) == 85 and detector_peak(fooled_net, planted, photos, 64) == 0.0
    tl = featureshift.timeline(run, FOOLED_LAYER, [FOOLED, ORDINARY], steps=32, size=64, quiet=True)
    m = run_metrics(run, [FOOLED_LAYER], {FOOLED_LAYER: [FOOLED, ORDINARY]}, renders=tl.tiles, overview=[FOOLED_LAYER],
                    image_size=64, quiet=True, resamples=0)
    checks = {(t.epoch, t.channel): t for t in m.checks}
    fooled = checks[(1, FOOLED)]
    assert fooled.verdict == "doubtful" and "vs_data" in fooled.failed
    # past both bounds: the absolute one, and the one relative to the other render of its layer
    assert fooled.vs_data > DATA_SPREAD * checks[(1, ORDINARY)].vs_data and fooled.vs_data > DATA_HIGH
    assert [checks[k].verdict for k in ((0, FOOLED), (0, ORDINARY), (1, ORDINARY))] == ["trustworthy"] * 3
    rows = list(csv.DictReader(open(run / "metrics" / "checks.csv")))
    assert {(int(r["epoch"]), int(r["channel"])): r["verdict"] for r in rows}[(1, FOOLED)] == "doubtful"


def test_the_findings_count_the_pictures_that_failed_a_self_check():
    from featureshift.metrics.checks import TileCheck
    from featureshift.report.analysis import check_findings

    def tile(channel, failed=()):
        return TileCheck("L", 1, channel, f"k{channel}", 10.0, 1.0, 10.0, 0.9, 1.0, 1.0, True, tuple(failed))

    (ok,) = check_findings([tile(0), tile(1)], "L", "layer-L.html")
    assert ok["text"].startswith("L: all 2 rendered pictures pass their self-checks")
    (bad,) = check_findings([tile(0), tile(1, ["views"]), tile(2, ["vs_data", "views"])], "L", "layer-L.html")
    assert "2 of the 3 rendered pictures failed a self-check" in bad["text"]
    assert "against the best probe image: 1; under small transformations: 2" in bad["text"]
    assert check_findings([tile(0)], "other", "p.html") == []
