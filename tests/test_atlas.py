"""The atlas and the measures it answers the paper's questions with: speed of adaptation,
reuse (kept / repurposed / died) and spatial scale, each on cases whose answer is known."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from featureshift.metrics.adaptation import (
    KEPT_THRESHOLD, adaptation_speed, channel_fate, channel_speeds, dead_channels, layer_fates, layer_speed, reuse)
from featureshift.metrics.spatial import coarsening, dominant_frequency, layer_coarsening, radial_power


# ---------------------------------------------------------------- speed of adaptation

def test_speed_of_a_change_made_all_in_the_first_epoch():
    s = adaptation_speed([(0, 0.0), (1, 1.0), (2, 1.0), (3, 1.0)])
    assert s.half_epoch == 1 and s.first_share == 1.0 and s.final == 1.0 and s.first_epoch == 1


def test_speed_of_a_steady_change():
    s = adaptation_speed([(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)])
    assert s.half_epoch == 2 and s.first_share == pytest.approx(0.25)


def test_speed_of_a_late_change_and_sparse_snapshots():
    s = adaptation_speed([(0, 0.0), (5, 0.1), (10, 0.2), (15, 2.0)])
    assert s.half_epoch == 15 and s.first_share == pytest.approx(0.05) and s.first_epoch == 5


def test_speed_of_no_change_is_empty_and_nan_is_skipped():
    assert adaptation_speed([(0, 0.0), (1, 0.0), (2, 0.0)]).half_epoch is None
    assert adaptation_speed([(0, 0.0)]).first_share is None
    s = adaptation_speed([(0, 0.0), (1, float("nan")), (2, 1.0)])
    assert s.half_epoch == 2 and s.first_epoch == 2


def test_overshoot_counts_as_all_in_the_first_epoch():
    s = adaptation_speed([(0, 0.0), (1, 2.0), (2, 1.0)])
    assert s.first_share == 1.0 and s.half_epoch == 1


def _metrics(channel_rows, layer_rows=(), epochs=(0, 1, 2)):
    m = SimpleNamespace(channel_rows=list(channel_rows), layer_rows=list(layer_rows), epochs=list(epochs), reference=0)
    m.layer_series = lambda l, col: [(r["epoch"], r[col]) for r in m.layer_rows if r["layer"] == l]
    m.channel_table = lambda l, e: [r for r in m.channel_rows if r["layer"] == l and r["epoch"] == e]
    return m


def test_speeds_from_run_metrics_rows():
    rows = [{"epoch": e, "layer": "L", "channel": c, "weight_change": v}
            for c, series in {0: (0, 1, 1), 1: (0, 0.2, 1)}.items() for e, v in enumerate(series)]
    m = _metrics(rows, [{"epoch": e, "layer": "L", "weight_change": v} for e, v in enumerate((0, 0.6, 1.0))])
    speeds = channel_speeds(m, "L")
    assert speeds[0].half_epoch == 1 and speeds[1].half_epoch == 2
    assert speeds[1].first_share == pytest.approx(0.2)
    assert layer_speed(m, "L").first_share == pytest.approx(0.6)


# ---------------------------------------------------------------- reuse

def test_dead_channels():
    peak = np.array([[0.0, 1.0, -1.0, 0.0], [0.0, 0.0, -2.0, 1e-3]])
    assert dead_channels(peak).tolist() == [True, False, True, False]


def test_fates_follow_the_stated_thresholds():
    assert channel_fate(0.9) == "kept"
    assert channel_fate(KEPT_THRESHOLD) == "kept"
    assert channel_fate(0.2) == "repurposed" and channel_fate(-0.5) == "repurposed"
    assert channel_fate(0.9, dead_after=True) == "died"
    assert channel_fate(float("nan")) is None and channel_fate(None) is None
    assert channel_fate(0.9, dead_before=True, dead_after=True) is None


def test_reuse_shares():
    fates = ["kept"] * 7 + ["repurposed"] * 2 + ["died"] + [None, None]
    r = reuse(fates, [False] * 11 + [True])
    assert r.counts == {"kept": 7, "repurposed": 2, "died": 1}
    assert r.share("kept") == pytest.approx(0.7) and r.dead_before == 1 and r.unmeasured == 1
    assert reuse([None]).share("kept") is None


def test_layer_fates_from_rows():
    rows = []
    cases = [(1.0, 0, 0, 0.1), (0.1, 0, 0, 0.3), (float("nan"), 0, 1, 0.5), (float("nan"), 1, 1, 0.5),
             (float("nan"), 0, 1, float("nan"))]  # the last died but was never rendered: no fate
    for c, (b_on_a, dead0, dead2, drift) in enumerate(cases):
        rows.append({"epoch": 0, "layer": "L", "channel": c, "cross_b_on_a": 1.0, "dead": dead0, "drift": 0.0})
        rows.append({"epoch": 2, "layer": "L", "channel": c, "cross_b_on_a": b_on_a, "dead": dead2, "drift": drift})
    assert layer_fates(_metrics(rows), "L") == {0: "kept", 1: "repurposed", 2: "died", 3: None, 4: None}


# ---------------------------------------------------------------- spatial scale

def _stripes(period: float, size: int = 64, angle: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    t = x * math.cos(angle) + y * math.sin(angle)
    return 128 + 100 * np.sin(2 * math.pi * t / period)


@pytest.mark.parametrize("period", [4, 8, 16])
def test_dominant_frequency_of_stripes(period):
    assert dominant_frequency(_stripes(period)) == pytest.approx(1 / period, rel=0.12)
    assert dominant_frequency(_stripes(period, angle=0.7)) == pytest.approx(1 / period, rel=0.15)


def test_coarser_features_give_a_ratio_above_one():
    assert coarsening(dominant_frequency(_stripes(4)), dominant_frequency(_stripes(8))) == pytest.approx(2, rel=0.15)
    assert coarsening(dominant_frequency(_stripes(8)), dominant_frequency(_stripes(8))) == pytest.approx(1)
    assert layer_coarsening([2.0, 0.5, float("nan")]) == pytest.approx(1.0)
    assert layer_coarsening([2.0, 2.0]) == pytest.approx(2.0)
    assert math.isnan(layer_coarsening([]))


def test_flat_images_and_rgb_inputs(tmp_path):
    assert math.isnan(dominant_frequency(np.full((32, 32), 7.0)))
    assert math.isnan(coarsening(float("nan"), 0.1))
    from PIL import Image

    rgb = np.repeat(_stripes(8)[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "s.png")
    assert dominant_frequency(tmp_path / "s.png") == pytest.approx(1 / 8, rel=0.12)
    assert len(radial_power(rgb)) == 33


# ---------------------------------------------------------------- the atlas command

from pathlib import Path  # noqa: E402

import featureshift.commands.timeline  # noqa: E402,F401  (imported before any test patches the executors)
from featureshift.commands.atlas import ATLAS_FILE, atlas, atlas_snapshots, atlas_tiles, read_atlas  # noqa: E402
from featureshift.errors import FeatureshiftError  # noqa: E402

from _fakerun import LAYER, make_run  # noqa: E402

TINY = dict(steps=2, size=32)


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos):
    return make_run(tmp_path_factory.mktemp("atlasrun"), photos)


def test_snapshot_choices():
    entries = [(e, Path(f"epoch_{e:03d}")) for e in (0, 1, 2, 5)]
    assert [e for e, _ in atlas_snapshots("first,last", entries)] == [0, 5]
    assert [e for e, _ in atlas_snapshots("all", entries)] == [0, 1, 2, 5]
    assert [e for e, _ in atlas_snapshots("0,2", entries)] == [0, 2]
    assert [e for e, _ in atlas_snapshots("first,1-2", entries)] == [0, 1, 2]
    assert [e for e, _ in atlas_snapshots([5], entries)] == [5]
    with pytest.raises(FeatureshiftError, match="no snapshot for epoch"):
        atlas_snapshots("3", entries)


def test_dry_run_says_what_it_would_render_and_renders_nothing(run, capsys, monkeypatch, one_thread):
    import featureshift.jobs.executors as executors

    monkeypatch.setattr(executors, "run_jobs", lambda *a, **k: pytest.fail("rendered in a dry run"))
    r = atlas(run, LAYER, channels="0-5", dry_run=True, **TINY)
    assert r.planned == 12 and r.cached == 0 and r.estimate_s is not None and r.estimate_s > 0
    assert r.epochs == [0, 2] and r.channels == {LAYER: list(range(6))}
    assert "12 to render" in r.summary() and "about" in r.summary() and "nothing rendered" in r.summary()
    assert "to render" not in capsys.readouterr().err  # the plan is the result: its caller prints it, once
    assert not (run / ATLAS_FILE).exists()


def test_atlas_renders_only_what_is_missing_and_shares_the_timeline_cache(run, monkeypatch, one_thread):
    from featureshift.commands.timeline import timeline

    tl = timeline(run, LAYER, [1, 2], snapshots="0,2", quiet=True, **TINY)
    assert tl.rendered == 4
    r = atlas(run, [LAYER], channels="0-3", quiet=True, **TINY)
    assert (r.planned, r.cached, r.rendered) == (4, 4, 4)  # channels 1 and 2 came from the timeline
    assert len(r.tiles) == 8 and all(p.is_file() for p in r.tiles.values())
    record = read_atlas(run)
    assert record["layers"][LAYER]["epochs"] == [0, 2] and record["layers"][LAYER]["channels"] == [0, 1, 2, 3]
    again = atlas(run, LAYER, channels="0-3", quiet=True, **TINY)
    assert again.rendered == 0 and again.cached == 8
    more = atlas(run, LAYER, snapshots="all", channels="0-3", quiet=True, **TINY)
    assert more.rendered == 4 and more.epochs == [0, 1, 2]  # only epoch 1 was new
    assert read_atlas(run)["layers"][LAYER]["epochs"] == [0, 1, 2]
    assert set(atlas_tiles(run)) == {(LAYER, e, c) for e in (0, 1, 2) for c in range(4)}
    tl = timeline(run, LAYER, [0, 3], quiet=True, **TINY)
    assert tl.rendered == 0  # and the other way round: a timeline after the atlas


def test_bad_requests_are_clear_errors(run):
    with pytest.raises(FeatureshiftError, match="at least one layer"):
        atlas(run, [], quiet=True)
    with pytest.raises(FeatureshiftError, match="not both"):
        atlas(run, LAYER, all_layers=True, quiet=True)
    with pytest.raises(FeatureshiftError):
        atlas(run, "features.99", quiet=True, dry_run=True)


# ---------------------------------------------------------------- the atlas in the report

@pytest.mark.slow
def test_the_report_shows_every_atlased_channel_and_the_findings(run, one_thread):
    import re

    from featureshift.commands.report import build_report
    from featureshift.report.site import channel_page, layer_page

    atlas(run, LAYER, channels="0-7", quiet=True, **TINY)
    index = build_report(run, image_size=64, examples=1, quiet=True)  # the atlas layer, no timeline rendered
    html = index.read_text()
    assert 'id="findings"' in html and html.index('id="findings"') < html.index('id="curves"')
    findings = re.findall(r"<li>(.*?) <a href=\"([^\"]+)\">evidence", html)
    texts = " ".join(t for t, _ in findings)
    # a ReLU: the speed is of the weights that make it, named as such
    assert f"{LAYER}: by epoch 1, the weights that make it (features.6.expand3x3) had moved" in texts
    assert "kept" in texts and "feature" in texts and "repurposed" in texts and "died" in texts
    assert "coarser" in texts or "finer" in texts or "kept their scale" in texts
    for _, href in findings:
        assert (index.parent / href.split("#")[0]).is_file()
    assert 'id="most-changed"' in html and channel_page(LAYER, 3) in html  # channel 3 was re-initialized
    layer_html = (index.parent / layer_page(LAYER)).read_text()
    assert layer_html.count('loading="lazy"') == 2 * 8  # a lazy before/after pair per atlased channel
    assert layer_html.count('data-channel="') == 128
    assert all((index.parent / channel_page(LAYER, c)).is_file() for c in range(8))
    channel_html = (index.parent / channel_page(LAYER, 3)).read_text()
    assert "its feature (kept / repurposed / died)" in channel_html and "coarsening" in channel_html


def test_a_dead_channel_is_shown_as_dead_and_left_out_of_rankings():
    from featureshift.report.site import measure_cells

    cells = measure_cells({"weight_change": 0.4, "correlation": 0.0, "dead": 1})
    assert cells["correlation"] == "dead" and cells["correlation_v"] == "" and cells["weight_change_v"] == ""
    alive = measure_cells({"weight_change": 0.4, "correlation": 0.0, "dead": 0})
    assert alive["correlation"] == "0.000" and alive["correlation_v"] == "0.0"


def test_the_timeline_title_is_a_whole_phrase():
    from featureshift.commands.timeline import timeline_title

    title = timeline_title("run", "features.7.expand3x3_activation", "channel", 5)
    assert title == "run: channels of features.7.expand3x3_activation over 5 snapshots (channel objective)"
    assert not title.rstrip(")").endswith(", channel")
    assert timeline_title("run", "logits", "channel", 1).startswith("run: classes of logits over 1 snapshot ")


# ---------------------------------------------------------------- runs side by side

def _measured_run(root: Path, name: str, per_class: int, b_on_a: list[float], dead_last: list[int]) -> Path:
    """A run folder with hand-written measures: layer L changes 0 -> 0.8 -> 1.0 (first-epoch share 0.8)."""
    import json

    run = root / name
    (run / "metrics").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "format": "featureshift.run/1", "status": "finished", "epochs_done": 2,
        "config": {"model": "squeezenet1_1", "epochs": 2, "lr": 0.001, "out": str(run)},
        "dataset": {"counts": {"a": {"train": per_class, "val": 4}, "b": {"train": per_class, "val": 4}}}}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"epoch": e, "val_acc": 0.5 + 0.1 * e + per_class / 1000})
                                                 for e in range(3)) + "\n")
    (run / "metrics" / "layers.csv").write_text("epoch,layer,weight_change,cka\n0,L,0,1\n1,L,0.8,0.9\n2,L,1.0,0.8\n")
    lines = ["epoch,layer,channel,weight_change,correlation,drift,cross_b_on_a,cross_a_on_b,dead"]
    for c, (x, d) in enumerate(zip(b_on_a, dead_last)):
        lines.append(f"0,L,{c},0,1,0,1,1,0")
        lines.append(f"2,L,{c},0.5,0.5,0.1,{x},{x},{d}")
    (run / "metrics" / "channels.csv").write_text("\n".join(lines) + "\n")
    return run


def test_compare_runs_sets_the_measures_side_by_side_and_names_the_setting(tmp_path):
    from featureshift.commands.compare_runs import compare_runs

    small = _measured_run(tmp_path, "small", 10, [0.9, 0.9, 0.1, 0.9], [0, 0, 0, 1])
    large = _measured_run(tmp_path, "large", 100, [0.9, 0.1, 0.1, 0.1], [0, 0, 0, 0])
    r = compare_runs([small, large], output=tmp_path / "cmp.json")
    assert list(r.differs) == ["training images per class"] and r.differs["training images per class"] == [10, 100]
    assert r.layers == ["L"]
    assert r.runs[0].reuse["L"].counts == {"kept": 2, "repurposed": 1, "died": 1}
    assert r.runs[1].reuse["L"].counts == {"kept": 1, "repurposed": 3, "died": 0}
    assert r.runs[0].speed["L"].first_share == pytest.approx(0.8) and r.runs[0].speed["L"].half_epoch == 1
    table = r.table()
    assert table.startswith("The runs differ in: training images per class.")
    assert "L: kept" in table and "50%" in table and "25%" in table
    assert (tmp_path / "cmp.json").is_file()


def test_compare_runs_names_a_run_with_nothing_to_measure(tmp_path):
    from featureshift.commands.compare_runs import compare_runs

    a = _measured_run(tmp_path, "a", 10, [1.0], [0])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text('{"config": {}}')
    # a run without a report is measured on the spot; one without snapshots cannot be, and says how to go on
    with pytest.raises(FeatureshiftError, match=r"(?s)b has no snapshots yet.*train --resume"):
        compare_runs([a, tmp_path / "b"], quiet=True)
    with pytest.raises(FeatureshiftError, match="at least two"):
        compare_runs([a])


def test_an_atlas_with_other_settings_does_not_change_the_timelines_settings(run, one_thread):
    from featureshift.commands.report import existing_timelines

    before = existing_timelines(run)[LAYER]["settings"]
    assert before.size == TINY["size"]
    atlas(run, LAYER, channels="0-1", quiet=True, steps=2, size=24)
    assert existing_timelines(run)[LAYER]["settings"] == before


def test_a_timeline_records_its_settings_as_given(tmp_path, photos, one_thread):
    # A default learning rate follows the steps (RenderSettings.resolved): recorded as "default",
    # a report that reuses the timeline's settings with more steps gets the rate of those steps.
    from featureshift.commands.report import existing_timelines
    from featureshift.commands.timeline import timeline

    run = make_run(tmp_path, photos, epochs=(0,))
    timeline(run, LAYER, 1, quiet=True, **TINY)
    recorded = existing_timelines(run)[LAYER]["settings"]
    assert recorded.steps == TINY["steps"] and recorded.lr is None
    longer = recorded.replace(steps=512).resolved()
    assert longer.lr == pytest.approx(28.8 / 512)
    assert recorded.precision == "auto"  # not what it resolved to on this machine
    timeline(run, LAYER, 1, quiet=True, lr=0.3, precision="fp32", **TINY)  # a rate and a precision given are kept
    assert existing_timelines(run)[LAYER]["settings"].lr == 0.3
    assert existing_timelines(run)[LAYER]["settings"].precision == "fp32"


def test_settings_recorded_by_earlier_versions_are_still_reused(tmp_path, photos, one_thread):
    # Earlier versions wrote a timeline's settings as a few fields, tile headers and atlas.json
    # as the cache key's fields (resolved, at the top level): the report and the atlas read them.
    import json as json_lib

    from PIL import Image

    from featureshift.commands.report import existing_timelines
    from featureshift.commands.timeline import timeline
    from featureshift.io import OUTPUT_TEXT_KEY, save_merged, write_json
    from featureshift.jobs.cache import read_tile, write_tile
    from featureshift.optvis.settings import DEFAULT_SETTINGS

    run = make_run(tmp_path, photos, epochs=(0,))
    tl = timeline(run, LAYER, 1, quiet=True, seed=4, **TINY)
    merged = tl.merged[LAYER]
    with Image.open(merged) as im:
        about, image = json_lib.loads(im.info[OUTPUT_TEXT_KEY]), im.convert("RGB")
    old = {"steps": 2, "size": 32, "seed": 4, "lr": None, "lr_hold": None, "lr_final": None, "param": "fft",
           "precision": "auto"}
    save_merged(merged, image, **{**about, "settings": old})
    assert existing_timelines(run)[LAYER]["settings"] == DEFAULT_SETTINGS.replace(seed=4, **TINY)
    # A timeline older still recorded none: the settings of one of its tiles, whose header held key fields.
    save_merged(merged, image, **{**about, "settings": None})
    [tile] = tl.tiles.values()
    picture, header = read_tile(tile)
    lucid = DEFAULT_SETTINGS.replace(seed=4, **TINY)
    old_header = {k: header[k] for k in ("layer", "channel", "epoch", "checksum", "score", "failed", "no_response")}
    write_tile(tile, picture, {**old_header, **json_lib.loads(json_lib.dumps(lucid.key_fields()))})
    assert existing_timelines(run)[LAYER]["settings"].key_fields() == lucid.key_fields()
    # atlas.json of an earlier version: the same pictures asked for again grow its atlas.
    first = atlas(run, LAYER, channels="0-1", quiet=True, seed=4, **TINY)
    record = read_atlas(run)
    record["layers"][LAYER]["settings"] = json_lib.loads(json_lib.dumps(lucid.key_fields()))
    write_json(run / ATLAS_FILE, record)
    atlas(run, LAYER, channels="2", quiet=True, seed=4, **TINY)
    assert read_atlas(run)["layers"][LAYER]["channels"] == [0, 1, 2] and first.rendered == 1  # 0: the timeline's
