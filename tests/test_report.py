"""featureshift report: the static HTML report of a run."""
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from featureshift.cli import main
from featureshift.errors import FeatureshiftError
from featureshift.commands.report import build_report
from featureshift.report.site import channel_page, layer_page

from _fakerun import CHANNELS, EVIL, IMAGE_SIZE, LAYER, RENDER, copy_of_run, make_run, shared_report


@pytest.fixture(scope="module")
def report(tmp_path_factory, photos):
    return shared_report(tmp_path_factory, photos)


def _refs(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', html)


def test_every_page_exists_and_every_link_and_image_resolves(report):
    run, index = report
    assert index == run / "report" / "index.html"
    pages = sorted(index.parent.glob("*.html"))
    expected = {"index.html", layer_page(LAYER), *(channel_page(LAYER, c) for c in CHANNELS)}
    assert {p.name for p in pages} == expected
    from featureshift.io import current_umask

    # readable by others where the umask allows: the folder is made to be shared or served
    assert index.parent.stat().st_mode & 0o777 == 0o777 & ~current_umask()
    assert index.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    for page in pages:
        html = page.read_text()
        for ref in _refs(html):
            assert not ref.startswith(("http:", "https:", "//")), f"{page.name} reaches the network: {ref}"
            assert (page.parent / ref.split("#")[0]).is_file(), f"{page.name}: broken reference {ref}"
    index_html = index.read_text()
    assert layer_page(LAYER) in index_html and "img/plots/curves.svg" in index_html
    assert "img/plots/change.svg" in index_html  # per-layer change over epochs
    layer_html = (index.parent / layer_page(LAYER)).read_text()
    assert all(channel_page(LAYER, c) in layer_html for c in CHANNELS)
    assert layer_html.count('data-channel="') == 128  # every channel listed, sortable
    channel_html = (index.parent / channel_page(LAYER, 3)).read_text()
    assert 'type="range"' in channel_html and channel_html.count("img/renders/") >= 3  # a render per snapshot
    assert channel_html.count("img/examples/") >= 2  # dataset examples before and after
    assert "img/plots/channel-" in channel_html


def test_names_are_escaped(report):
    run, index = report
    html = index.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for page in index.parent.glob("*.html"):
        assert EVIL not in page.read_text()


@pytest.mark.slow
def test_rebuild_reuses_the_cached_renders_and_probe_pass(report, monkeypatch):
    run, index = report
    import featureshift.metrics.driver as driver
    import featureshift.metrics.probe as probe
    import featureshift.optvis.engine as render_module

    def no_render(*a, **k):
        raise AssertionError("rendered again although the timeline cache has every tile")

    monkeypatch.setattr(render_module, "render", no_render)
    real = driver.probe_stats
    ran = []

    def counting(*a, **k):
        ran.append(1)
        return real(*a, **k)

    monkeypatch.setattr(driver, "probe_stats", counting)
    monkeypatch.setattr(probe, "probe_loader", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probe pass ran")))
    tiles = sorted((run / "timeline" / "cache").glob("*.png"))
    again = build_report(run, [LAYER], CHANNELS, image_size=IMAGE_SIZE, quiet=True, **RENDER)
    assert again == index and index.is_file() and ran
    assert all('id="accentuation"' in (index.parent / channel_page(LAYER, c)).read_text() for c in CHANNELS)
    assert all('id="gained-lost"' in (index.parent / channel_page(LAYER, c)).read_text() for c in CHANNELS)
    assert sorted((run / "timeline" / "cache").glob("*.png")) == tiles  # no new tile, gained and lost included


def _accent_section(html: str) -> str:
    start = html.index('id="accentuation"')
    return html[start:html.index("</div>", start)]


def test_channel_pages_show_the_top_example_accentuated_at_each_snapshot(report):
    from featureshift.jobs.cache import read_tile_about

    run, index = report
    for c in CHANNELS:
        html = (index.parent / channel_page(LAYER, c)).read_text()
        section = _accent_section(html)
        assert "The top dataset example, accentuated at each snapshot" in html
        images = re.findall(r'<img src="([^"]*)"', section)
        assert len(images) == 1 + 3 and images[0].startswith("img/accent/")  # the example, then each snapshot
        assert all((index.parent / src).is_file() for src in images)
        assert f"accent, channel, {RENDER['steps']} steps, {RENDER['size']} px" in section  # settings.describe()
        abouts = [read_tile_about(index.parent / src) for src in images[1:]]
        assert [a["epoch"] for a in abouts] == [0, 1, 2]
        assert all(a["method"] == "accent" and a["layer"] == LAYER and a["channel"] == c for a in abouts)
        assert all((run / "timeline" / "cache" / Path(src).name).is_file() for src in images[1:])  # the run's cache
    assert "accentuations of " + LAYER in index.read_text()


def _section(html: str, start: str, end: str) -> str:
    return html[html.index(start):html.index(end, html.index(start))]


def test_channel_pages_show_what_each_channel_gained_and_lost_and_the_images_that_rose_and_fell(report):
    from featureshift.jobs.cache import read_tile_about
    from featureshift.snapshot import read_meta

    run, index = report
    checksums = [read_meta(run / "snapshots" / f"00{e}.safetensors").checksum for e in (0, 2)]
    for c in CHANNELS:
        html = (index.parent / channel_page(LAYER, c)).read_text()
        pictures = _section(html, 'id="gained-lost-pictures"', "</div>")
        images = re.findall(r'<img src="([^"]*)" alt="([^"]*)"', pictures)
        assert [alt for _, alt in images] == ["before: epoch 0", "after: epoch 2", "gained: fires more at epoch 2",
                                              "lost: fired more at epoch 0"]
        assert all((index.parent / src).is_file() for src, _ in images)
        abouts = [read_tile_about(run / "timeline" / "cache" / Path(src).name) for src, _ in images[2:]]
        assert [a["objective"] for a in abouts] == ["gained", "lost"]  # from the run's tile cache
        assert all([a["before_checksum"], a["after_checksum"]] == checksums for a in abouts)
        assert all(a["steps"] == RENDER["steps"] and a["size"] == RENDER["size"] for a in abouts)  # the timeline's
        assert f"gained, {RENDER['steps']} steps, {RENDER['size']} px" in html
        assert 'id="rose-fell"' in html
    # Channel 3 was re-initialized: its gained picture is a real render, and some probe images rose and
    # some fell, each cropped and captioned with both activations. Channel 2 never changed: nothing
    # to gain, its picture marked, and no image rose or fell.
    changed = (index.parent / channel_page(LAYER, 3)).read_text()
    for side in ("rose", "fell"):
        crops = re.findall(r'<img src="(img/examples/[^"]*-{0}-\d+\.png)"'.format(side),
                           _section(changed, f'id="{side}"', "</section>"))
        assert crops and all((index.parent / src).is_file() for src in crops)
    assert re.search(r"<br>[\d.e+]+ → [\d.e+]+ \(\+[\d.e+]+\)</figcaption>", _section(changed, 'id="rose"', "</section>"))
    gained_3 = re.findall(r'<img src="([^"]*)" alt="gained', changed)[0]
    assert not read_tile_about(run / "timeline" / "cache" / Path(gained_3).name).get("no_response")
    same = (index.parent / channel_page(LAYER, 2)).read_text()
    gained_2 = re.findall(r'<img src="([^"]*)" alt="gained', same)[0]
    assert read_tile_about(run / "timeline" / "cache" / Path(gained_2).name)["no_response"]
    assert "On no probe image did its activation rise." in same and "On no probe image did its activation fall." in same


@pytest.mark.slow
def test_without_gained_and_lost(report, tmp_path, monkeypatch):
    import featureshift.optvis.engine as render_module

    run, _ = report
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report", "cache"))  # no tile cache: nothing to reuse
    shutil.copytree(run / "timeline" / "cache", copy / "timeline" / "cache",
                    ignore=lambda d, names: [n for n in names if n.endswith(".png") and _is_pair_tile(Path(d) / n)])
    monkeypatch.setattr(render_module, "render", lambda *a, **k: pytest.fail("rendered: every other tile is cached"))
    index = build_report(copy, [LAYER], CHANNELS, image_size=IMAGE_SIZE, quiet=True, diff=False, **RENDER)
    for c in CHANNELS:
        html = (index.parent / channel_page(LAYER, c)).read_text()
        assert 'id="gained-lost"' not in html and 'id="rose-fell"' in html  # the examples cost no render


def _is_pair_tile(path: Path) -> bool:
    from featureshift.jobs.cache import read_tile_about

    return read_tile_about(path).get("objective") in ("gained", "lost")


def test_the_report_help_offers_to_leave_the_gained_and_lost_renders_out():
    r = CliRunner().invoke(main, ["report", "--help"])
    assert r.exit_code == 0 and "--diff / --no-diff" in r.output


def test_the_report_names_the_precision_the_network_ran_in(report):
    from featureshift.jobs.cache import read_tile_about

    run, index = report
    tile = next(p for p in (run / "timeline" / "cache").glob("*.png") if read_tile_about(p).get("layer") == LAYER
                and read_tile_about(p).get("method", "lucid") == "lucid")
    about = read_tile_about(tile)
    assert about["precision"] == "auto"  # as given: the cache key's
    used = about["precision_used"]  # what auto resolved to on this machine
    assert used in ("fp32", "bf16")
    row = re.search(rf"renders of {re.escape(LAYER)}.*?</tr>", index.read_text(), re.S)
    assert row and f"network in {used}" in row.group(0)


@pytest.mark.slow
def test_without_accentuation(report, tmp_path, monkeypatch):
    import featureshift.optvis.engine as render_module

    run, _ = report
    copy = copy_of_run(run, tmp_path / "run")
    monkeypatch.setattr(render_module, "render", lambda *a, **k: pytest.fail("rendered: every tile is cached"))
    index = build_report(copy, [LAYER], CHANNELS, image_size=IMAGE_SIZE, quiet=True, accent=False, **RENDER)
    assert not any('id="accentuation"' in (index.parent / channel_page(LAYER, c)).read_text() for c in CHANNELS)
    assert not (index.parent / "img" / "accent").exists() and "accentuations of" not in index.read_text()


@pytest.mark.slow  # test-fast stays under a minute; a cheaper test covers the same path
def test_a_run_with_only_the_first_snapshot(tmp_path, photos):
    run = make_run(tmp_path, photos, only_first=True)
    r = CliRunner().invoke(main, ["report", str(run), "--layer", LAYER, "--channels", "2", "--steps", str(RENDER["steps"]),
                                  "--size", str(RENDER["size"]), "--image-size", str(IMAGE_SIZE), "-q"])
    assert r.exit_code == 0, r.output
    index = Path(r.output.strip())
    html = index.read_text()
    assert "Nothing to compare yet" in html
    assert "img/timeline-" in html and "img/plots/curves.svg" in html  # what exists is still shown
    channel = (index.parent / channel_page(LAYER, 2)).read_text()
    assert channel.count("img/renders/") >= 1 and "img/examples/" in channel


def test_missing_probe_folder_is_a_clear_error_before_any_work(report, tmp_path, monkeypatch):
    run, index = report
    import featureshift.commands.timeline as timeline

    monkeypatch.setattr(timeline, "timeline", lambda *a, **k: pytest.fail("rendered before checking the probe"))
    with pytest.raises(FeatureshiftError, match="probe folder .* does not exist"):
        build_report(run, [LAYER], probe=tmp_path / "nowhere", quiet=True)
    r = CliRunner().invoke(main, ["report", str(run), "--probe", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    assert index.is_file()  # the previous report is untouched


def test_not_a_run_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not a featureshift run" in r.output


def test_rows_without_renders_are_collapsed_but_kept(report):
    run, index = report
    html = (index.parent / layer_page(LAYER)).read_text()
    rows = re.findall(r"<tr class=\"([^\"]*)\" data-channel=\"(\d+)\"[^>]*?( hidden)?>", html)
    assert len(rows) == 128
    assert {int(c) for cls, c, hidden in rows if not hidden} == set(CHANNELS)  # only rendered rows show at first
    assert all(cls == "unrendered" for cls, c, hidden in rows if hidden)
    assert 'id="filter-unrendered"' in html and "the 126 channels without renders" in html


def test_the_channel_chart_gives_cross_activation_its_own_axis(report):
    run, index = report
    svg = next((index.parent / "img" / "plots").glob("channel-*.svg")).read_text()
    assert "cross-activation (1 = kept)" in svg and "correlation (1 = unchanged)" in svg
    assert "similarity (1 = unchanged)" not in svg


def test_the_ranked_link_opens_the_layer_ranked_by_change(report):
    run, index = report
    assert f'href="{layer_page(LAYER)}#sort=weight_change"' in index.read_text()
    html = (index.parent / layer_page(LAYER)).read_text()
    assert 'data-key="weight_change" data-first="descending"' in html
    assert 'data-key="correlation" data-first="ascending"' in html


def test_a_tile_of_a_channel_that_does_not_respond_is_marked_in_the_report(tmp_path, photos):
    import numpy as np
    from PIL import Image

    from featureshift.grid import NO_RESPONSE_FILL
    from featureshift.jobs.cache import read_tile, write_tile

    run = make_run(tmp_path, photos, only_first=True)
    lean = dict(examples=0, accent=False)  # the timeline's tile is what is checked: no photos needed
    build_report(run, [LAYER], "2", image_size=IMAGE_SIZE, quiet=True, **lean, **RENDER)
    from featureshift.jobs.cache import read_tile_about

    # a tile of the timeline (the cache also holds the accentuations of the channel pages)
    tile = next(t for t in sorted((run / "timeline" / "cache").glob("*.png"))
                if read_tile_about(t).get("method", "lucid") == "lucid")
    image, about = read_tile(tile)
    write_tile(tile, image, {**about, "no_response": True})  # as a render whose channel never responded
    shutil.rmtree(run / "report")
    index = build_report(run, [LAYER], "2", image_size=IMAGE_SIZE, quiet=True, **lean, **RENDER)
    shown = np.asarray(Image.open(index.parent / "img" / "renders" / tile.name).convert("RGB"))
    assert (shown == NO_RESPONSE_FILL).all(-1).mean() > 0.5


def _findings(index: Path) -> list[str]:
    import html as html_lib

    page = index.read_text()
    section = page[page.index('id="findings"'):page.index("</section>")]
    return [html_lib.unescape(t).strip() for t in re.findall(r"<li>(.*?)<a href", section, re.S)]


@pytest.mark.slow
def test_the_findings_of_a_real_run_rank_only_layers_with_weights_and_set_the_new_head_apart(tmp_path, one_thread):
    # Real fine-tuning on real data: its new head moves most, and SqueezeNet's ReLU and pooling
    # layers after it would repeat its number; none of them may be named "changed most".
    import featureshift
    from _digits import export_digits
    from featureshift.metrics.driver import parameter_modules

    data = export_digits(tmp_path / "digits", per_class=12)
    run = featureshift.train(data=str(data), model="squeezenet1_1", weights="imagenet", epochs=1, batch_size=16,
                             image_size=32, workers=0, quiet=True, out=str(tmp_path / "run"))
    index = build_report(run, layers=["features.12"], channels=[0, 1, 2], image_size=32, examples=0, accent=False,
                         quiet=True, steps=2, size=32)
    texts = _findings(index)
    # Most of fire9's 512 channels fire on no 32 px digit before training: the fates sentence counts
    # among the three rendered channels, never the layer's hundreds.
    (fates,) = [t for t in texts if t.startswith("features.12: ") and "rendered channel" in t]
    counts = [int(n) for n in re.findall(r"\b\d+\b", fates.removeprefix("features.12: "))]
    assert "of the 3 rendered channels" in fates and max(counts) <= 3, fates
    assert not any("100% of the distance" in t for t in texts)  # one epoch: no speed to tell
    ranked = [t for t in texts if "changed most" in t]
    assert len(ranked) == 1, texts
    most, least = re.search(r"own, (\S+) changed most and (\S+) least", ranked[0]).groups()
    model = featureshift.open_network(run / "snapshots" / "000.safetensors").module
    for layer in (most, least):
        assert parameter_modules(model, layer), f"{layer} has no weights of its own: {ranked[0]}"
        assert not layer.startswith("classifier"), ranked[0]
    head = [t for t in texts if "head" in t]
    assert len(head) == 1 and head[0].startswith("The new 10-class head classifier.1 is not ranked"), texts
    # The ranking is the one in RUN/metrics: the largest and the smallest function change of those layers.
    import csv

    rows = {r["layer"]: float(r["function_change"]) for r in csv.DictReader((run / "metrics" / "layers.csv").open())
            if r["epoch"] == "1" and r["function_change"]}
    weighted = {l: v for l, v in rows.items() if parameter_modules(model, l) and not l.startswith("classifier")}
    assert most == max(weighted, key=weighted.get) and least == min(weighted, key=weighted.get)
    assert rows["classifier.3"] == rows["classifier.2"] == 0  # pooling and ReLU compute as before


@pytest.mark.slow
def test_the_timeline_caption_names_the_timelines_channels_when_an_atlas_of_the_layer_adds_more(tmp_path, photos,
                                                                                              one_thread):
    import featureshift
    from featureshift.commands.atlas import atlas

    run = make_run(tmp_path, photos, epochs=(0, 1))
    tiny = dict(steps=2, size=32)
    featureshift.timeline(run, [LAYER], [2, 3], quiet=True, **tiny)
    atlas(run, LAYER, channels="0-7", quiet=True, **tiny)
    index = build_report(run, image_size=IMAGE_SIZE, examples=0, accent=False, quiet=True)
    page = index.read_text()
    timelines = page[page.index('id="timelines"'):page.index('id="layers"')]
    assert "Columns: channels 2, 3." in timelines
    layer_html = (index.parent / layer_page(LAYER)).read_text()
    assert all(channel_page(LAYER, c) in layer_html for c in range(8))  # the atlas's channels are all in the report


@pytest.mark.slow
def test_the_most_changed_channels_of_an_atlas_get_their_gained_and_lost_too(tmp_path, photos, one_thread):
    import featureshift
    from featureshift.commands.atlas import atlas
    from featureshift.jobs.cache import read_tile_about

    run = make_run(tmp_path, photos, epochs=(0, 1))
    featureshift.timeline(run, [LAYER], [2], quiet=True, steps=2, size=32)
    atlas(run, LAYER, channels="0-15", quiet=True, steps=3, size=32)
    index = build_report(run, image_size=IMAGE_SIZE, examples=2, accent=False, quiet=True)
    from featureshift.commands.report import DIFF_MOST_CHANGED

    # The first channels of each ranking the overview lists, and the timeline's channel.
    groups = re.findall(r'<div class="top-channels"(.*?)</div>', index.read_text(), re.S)
    firsts = {p for g in groups for p in re.findall(r'href="(channel-[^"]*)"', g)[:DIFF_MOST_CHANGED]}
    assert len(groups) == 4 and len(firsts) > DIFF_MOST_CHANGED
    shown = {p.name for p in (index.parent / channel_page(LAYER, c) for c in range(16))
             if 'id="gained-lost"' in p.read_text()}
    assert firsts | {channel_page(LAYER, 2)} == shown
    # Each with the settings of the channel's own renders: the atlas's for its channels.
    html = (index.parent / channel_page(LAYER, 3)).read_text()
    gained = re.findall(r'<img src="([^"]*)" alt="gained', html)[0]
    assert read_tile_about(run / "timeline" / "cache" / Path(gained).name)["steps"] == 3
