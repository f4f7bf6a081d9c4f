"""Render-noise floors: a channel is called changed only beyond what a second render of the
same snapshot, with another seed, gives an unchanged channel."""
import copy
import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featureshift.cli import main
from featureshift.metrics.adaptation import both_measured, called_repurposed, channel_fate, layer_fates
from featureshift.metrics.floors import FLOOR_CHANNELS, count_beyond_noise, floor_channels, floors_from

from _fakerun import CHANNELS, IMAGE_SIZE, LAYER, RENDER, copy_of_run, shared_report
from test_atlas import _metrics


def test_the_floors_are_percentiles_of_the_seed_to_seed_values_with_both_directions_of_the_kept_score():
    drifts = {c: 0.01 * (c + 1) for c in range(20)}  # 0.01 .. 0.20
    kept = {c: (1.0 + 0.01 * c, 1 / (1.0 + 0.01 * c)) for c in range(20)}
    floor = floors_from("L", drifts, kept)
    assert floor.drift == pytest.approx(np.percentile(list(drifts.values()), 95))
    both = [k for pair in kept.values() for k in pair]
    assert floor.kept == pytest.approx(np.percentile(both, 5)) and floor.kept < 1.0
    assert floor.repurposed_share == 0.0  # no unchanged channel scores under 0.5
    assert floor.drift_beyond(0.5) and not floor.drift_beyond(0.05) and not floor.drift_beyond(float("nan"))
    assert math.isnan(floors_from("L", {}, {}).drift)


def test_a_channel_is_repurposed_only_below_both_the_threshold_and_the_floor():
    assert called_repurposed(0.4) and not called_repurposed(0.6)
    assert not called_repurposed(0.4, floor=0.3) and called_repurposed(0.2, floor=0.3)
    assert called_repurposed(0.4, floor=0.8)  # a lenient floor does not loosen the rule
    assert not called_repurposed(float("nan"), floor=0.3)
    assert channel_fate(0.4, floor=0.3) == "kept" and channel_fate(0.2, floor=0.3) == "repurposed"
    # the floor travels with the rows: a CSV's empty cell is no floor
    rows = []
    for c, (b_on_a, floor) in enumerate([(0.4, 0.3), (0.4, ""), (0.1, 0.3)]):
        rows.append({"epoch": 0, "layer": "L", "channel": c, "cross_b_on_a": 1.0, "dead": 0, "drift": 0.0})
        rows.append({"epoch": 2, "layer": "L", "channel": c, "cross_b_on_a": b_on_a, "dead": 0, "drift": 0.1,
                     "kept_floor": floor})
    assert layer_fates(_metrics(rows), "L") == {0: "kept", 1: "repurposed", 2: "repurposed"}


def test_how_many_called_channels_noise_alone_explains_is_a_binomial_tail():
    assert not count_beyond_noise(4, 64, 0.05)  # about what 5% of 64 gives by chance
    assert count_beyond_noise(12, 64, 0.05)
    assert count_beyond_noise(1, 64, 0.0)  # noise never calls a channel: any call is beyond it
    assert not count_beyond_noise(0, 64, 0.0)


def test_the_floor_sample_keeps_the_shown_channels_and_spreads_the_rest():
    chosen = floor_channels([5, 2], range(100), limit=6)
    assert {2, 5} <= set(chosen) and len(chosen) == 6 and chosen == sorted(chosen)
    assert floor_channels([], range(10)) == list(range(10))  # fewer than the limit: all of them
    assert len(floor_channels([], range(1000))) == FLOOR_CHANNELS


@pytest.fixture(scope="module")
def report(tmp_path_factory, photos):
    return shared_report(tmp_path_factory, photos)


def test_the_report_measures_floors_writes_them_beside_the_measures_and_its_findings_state_them(report):
    run, index = report
    summary = json.loads((run / "metrics" / "summary.json").read_text())
    floor = summary["floors"]["layers"][LAYER]
    assert floor["channels"] == CHANNELS and 0 < floor["drift"] < 1 and floor["kept"] > 0
    rows = list(csv.DictReader((run / "metrics" / "channels.csv").open()))
    assert {r["drift_floor"] for r in rows if r["layer"] == LAYER} == {f"{floor['drift']:.6g}"}
    text = re.sub(r"<[^>]+>", "", index.read_text())
    assert "noise floor" in text and "rendered twice before training" in text
    layer_html = (index.parent / f"layer-{LAYER}.html").read_text()
    assert "rendered twice" in layer_html


@pytest.mark.slow
def test_a_rebuilt_report_finds_its_floors_cached_and_without_floors_states_none(report, tmp_path, monkeypatch):
    import featureshift.optvis.engine as render_module
    from featureshift.commands.report import build_report

    run, _ = report
    copy_ = copy_of_run(run, tmp_path / "run")
    monkeypatch.setattr(render_module, "render", lambda *a, **k: pytest.fail("rendered: every tile is cached"))
    build_report(copy_, [LAYER], CHANNELS, image_size=IMAGE_SIZE, quiet=True, accent=False, **RENDER)
    assert json.loads((copy_ / "metrics" / "summary.json").read_text())["floors"]["layers"][LAYER]
    assert (copy_ / "metrics" / "checks.csv").is_file()
    index = build_report(copy_, [LAYER], CHANNELS, image_size=IMAGE_SIZE, quiet=True, accent=False, floor=False,
                         checks=False, **RENDER)
    summary = json.loads((copy_ / "metrics" / "summary.json").read_text())
    assert summary["floors"] == {} and summary["self_checks"] == {}
    text = index.read_text()
    assert "noise floor" not in text and "pass their self-checks" not in text and "failed a self-check" not in text
    assert not (copy_ / "metrics" / "checks.csv").exists()  # no earlier build's checks left to be read as these
    rows = list(csv.DictReader((copy_ / "metrics" / "channels.csv").open()))
    assert {r["kept_floor"] for r in rows} == {""}


def test_atlas_dry_run_counts_the_floor_renders_and_no_floor_leaves_them_out(report, tmp_path):
    run, _ = report
    copy_ = copy_of_run(run, tmp_path / "run")
    with_floor = CliRunner().invoke(main, ["atlas", str(copy_), "--layer", "features.3.expand1x1_activation",
                                           "--steps", "4", "--size", "32", "--dry-run"])
    assert with_floor.exit_code == 0, with_floor.output
    assert "32 second renders of epoch 0 for the noise floors, 32 to render" in with_floor.output
    without = CliRunner().invoke(main, ["atlas", str(copy_), "--layer", "features.3.expand1x1_activation",
                                        "--steps", "4", "--size", "32", "--dry-run", "--no-floor"])
    assert without.exit_code == 0 and "noise floor" not in without.output


@pytest.mark.parametrize("command", ["atlas", "report", "compare"])
def test_every_command_that_judges_change_offers_no_floor(command):
    out = CliRunner().invoke(main, [command, "--help"]).output
    assert "--no-floor" in out and ("--no-checks" in out) == (command == "report")


# ---------------------------------------------------------------- calibration on a real network

SMALL = dict(steps=32, size=48)
CLAYER, CONV = "features.11.squeeze_activation", "features.11.squeeze"


@pytest.mark.slow
def test_a_snapshot_compared_with_itself_has_no_channel_changed_even_across_render_seeds(squeezenet):
    import featureshift
    from featureshift.metrics.drift import cross_activation

    same = featureshift.compare(squeezenet, squeezenet, CLAYER, channels="0-11", quiet=True, **SMALL)
    # (a channel whose render at one seed does not excite it at all is a failed render: out of the floor)
    assert same.changed == [] and same.floor is not None and 10 <= len(same.floor.channels) <= 12
    # Other render seeds on one side: the measure is then pure render noise, which the floor (seeds 0
    # and 1) must not call a change.
    other = featureshift.compare(squeezenet, squeezenet, CLAYER, channels="0-11", quiet=True, seed=2, floor=False,
                                 **SMALL)
    b_on_a, a_on_b = cross_activation(squeezenet, squeezenet, [(CLAYER, c) for c in range(12)], same.renders_a,
                                      other.renders_a)
    calls = [both_measured(x, y) and called_repurposed(x, same.floor.kept) for x, y in zip(b_on_a, a_on_b)]
    assert not any(calls), (b_on_a, a_on_b, same.floor.kept)
    assert np.nanmin(b_on_a) < 1.0  # the two seeds did make other pictures


@pytest.mark.slow
def test_compare_finds_a_planted_set_of_replaced_channels(squeezenet):
    import featureshift

    planted = [1, 4, 7, 10]
    changed = copy.deepcopy(squeezenet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in changed.parameters():  # every weight moved a little, as fine-tuning moves them
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=g))
        conv = changed.get_submodule(CONV)
        for c in planted:  # and these channels replaced by others of the layer: a new feature each
            conv.weight[c] = conv.weight[c + 32].clone()
            conv.bias[c] = conv.bias[c + 32].clone()
    result = featureshift.compare(squeezenet, changed, CLAYER, channels="0-11", quiet=True, **SMALL)
    found = set(result.changed)
    precision = len(found & set(planted)) / max(1, len(found))
    recall = len(found & set(planted)) / len(planted)
    assert precision >= 0.9 and recall >= 0.9, (sorted(found), [round(r["cross_b_on_a"], 2) for r in result.rows[:12]],
                                                result.floor.kept)
