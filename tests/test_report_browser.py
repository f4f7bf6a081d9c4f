"""The report in a real browser: headless Chromium driven by Playwright, from disk, offline.

Skipped when Chromium or Playwright is missing, unless FEATURESHIFT_REQUIRE_BROWSER=1 (CI).
"""
import os
import shutil

import pytest

from featureshift.report.site import channel_page, layer_page

from _fakerun import CHANNELS, EVIL, LAYER, shared_report

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or ""):
        if path and os.path.isfile(path):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    required = os.environ.get("FEATURESHIFT_REQUIRE_BROWSER") == "1"
    exe = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if exe is None or sync_playwright is None:
        what = "chromium" if exe is None else "the playwright package"
        if required:
            pytest.fail(f"FEATURESHIFT_REQUIRE_BROWSER=1 but {what} is missing")
        pytest.skip(f"{what} is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory, photos):
    return shared_report(tmp_path_factory, photos)[1]


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900}, offline=True)
    pg = context.new_page()
    pg.problems = []
    pg.on("console", lambda m: pg.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    pg.on("pageerror", lambda e: pg.problems.append(f"page error: {e}"))
    pg.on("dialog", lambda d: (pg.problems.append(f"dialog: {d.message}"), d.dismiss()))
    # A lazy image still loading when the test moves to the next page is aborted: not a broken image.
    pg.on("requestfailed", lambda r: pg.problems.append(f"request failed: {r.url} ({r.failure})")
          if "ERR_ABORTED" not in (r.failure or "") else None)
    yield pg
    context.close()


# An image in view; lazy images out of view (or in hidden rows) are not fetched yet, and do not count.
IN_VIEW = ("i => { const r = i.getBoundingClientRect(); "
           "return r.width > 0 && r.bottom > 0 && r.top < window.innerHeight; }")


def _settle(page, timeout: float = 15.0):
    """Wait until every image that should be loaded by now (eager ones, lazy ones in view) is.
    Polled from here: the report's content policy forbids the eval that wait_for_function uses."""
    import time

    check = (f"() => {{ const inView = {IN_VIEW}; return Array.from(document.images)"
             ".every(i => i.complete || (i.loading === 'lazy' && !inView(i))); }")
    end = time.monotonic() + timeout
    while not page.evaluate(check):
        if time.monotonic() > end:
            raise AssertionError("images in view did not finish loading")
        page.wait_for_timeout(50)


def _broken(page):
    return page.evaluate(f"() => {{ const inView = {IN_VIEW}; return Array.from(document.images)"
                         ".filter(i => (i.loading !== 'lazy' || i.complete || inView(i)) && "
                         "!(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')); }")


def _open(page, path):
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    _settle(page)
    return _broken(page)


@pytest.mark.slow
def test_every_page_loads_cleanly(report, page):
    pages = sorted(report.parent.glob("*.html"))
    assert len(pages) == 2 + len(CHANNELS)
    for path in pages:
        broken = _open(page, path)
        assert broken == [], f"{path.name}: broken images {broken}"
        assert page.evaluate("document.images.length") > 0
    assert page.problems == []


@pytest.mark.slow
def test_the_slider_changes_the_snapshot(report, page):
    _open(page, report.parent / channel_page(LAYER, 3))
    image = page.locator("#snapshot")
    last_src = image.get_attribute("src")
    assert "epoch 2" in page.locator("#snapshot-caption").inner_text()
    page.locator("#slider").focus()
    page.keyboard.press("Home")
    assert image.get_attribute("src") != last_src
    assert page.locator("#snapshot-caption").inner_text().startswith("epoch 0")
    assert page.evaluate("document.getElementById('snapshot').naturalWidth") > 0
    page.locator(".strip button").nth(1).click()  # the filmstrip drives it too
    assert page.locator("#slider").input_value() == "1"
    assert page.problems == []


@pytest.mark.slow
def test_the_self_check_under_the_picture_follows_the_snapshot_shown(report, page):
    import csv

    run = report.parent.parent
    checks = {int(r["epoch"]): r for r in csv.DictReader(open(run / "metrics" / "checks.csv"))
              if r["layer"] == LAYER and int(r["channel"]) == 3}
    _open(page, report.parent / channel_page(LAYER, 3))
    line = page.locator("#snapshot-check")
    for epoch in (2, 0, 1):
        if epoch != 2:
            page.locator(".strip button").nth(epoch).click()
        text = line.inner_text()
        assert text.startswith(("⚠ doubtful" if checks[epoch]["failed"] else "✓ trustworthy"))
        assert f"vs. data {float(checks[epoch]['vs_data']):.2f}x" in text
        assert line.locator(".badge").get_attribute("title") in text
    assert page.problems == []


@pytest.mark.slow
def test_sorting_changes_the_order(report, page):
    _open(page, report.parent / layer_page(LAYER))
    first = lambda: page.locator("#channels tbody tr").first.get_attribute("data-channel")  # noqa: E731
    assert first() == str(CHANNELS[0])  # rendered channels first
    header = page.locator("#channels thead th", has_text="weight change").locator("button")
    header.click()  # the first click shows the most changed: the re-initialized channels first
    assert first() in ("3", "5")
    assert page.locator("#channels thead th", has_text="weight change").get_attribute("aria-sort") == "descending"
    header.click()  # again: the least changed first
    assert first() not in ("3", "5")
    correlation = page.locator("#channels thead th", has_text="correlation").locator("button")
    correlation.click()  # for a similarity the most changed is the lowest
    assert first() in ("3", "5")
    assert page.locator("#channels thead th", has_text="correlation").get_attribute("aria-sort") == "ascending"
    assert page.problems == []


@pytest.mark.slow
def test_a_script_in_a_class_name_is_only_text(report, page):
    _open(page, report)
    cells = page.locator("#class-table td", has_text="alert(1)")
    assert cells.count() == 1 and cells.first.inner_text() == EVIL
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # only the report's own
    assert page.problems == []  # no dialog fired


# ---------------------------------------------------------------- a report with a large atlas

ATLAS_LAYER = "features.11"  # SqueezeNet 1.1: 512 channels


def _synthetic_tile(channel: int, epoch: int, size: int = 32):
    """A small striped picture, different for every channel, coarser after training for some."""
    import numpy as np
    from PIL import Image

    period = 3 + channel % 7 + (channel % 3 == 0) * (epoch > 0) * 3
    y, x = np.mgrid[:size, :size]
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (x + (channel % 5) * y) / period)
    colour = np.array([(channel * 37) % 256, (channel * 91) % 256, (channel * 53 + 40 * epoch) % 256]) / 255
    return Image.fromarray((255 * wave[..., None] * colour).astype("uint8"))


@pytest.fixture(scope="module")
def atlas_report(tmp_path_factory, photos):
    """A run with an atlas of all 512 channels of a layer. The tiles are synthetic, written straight
    into the tile cache by a stand-in for the executor: the browser checks need pictures, not renders."""
    import featureshift.commands.atlas as atlas_module
    import featureshift.jobs.executors as executors
    from featureshift.commands.report import build_report

    from _fakerun import make_run

    def fake_run_jobs(plan, cache, executor, *, quiet=False, on_tile=None, desc=""):
        report = executors.JobReport(cached=plan.cached)
        for job in plan.jobs:
            for (layer, c), key in zip(job.targets, job.keys):
                report.written[key] = cache.write(key, _synthetic_tile(c, job.epoch or 0),
                                                  {"layer": layer, "channel": c, "epoch": job.epoch})
                report.rendered += 1
        return report

    run = make_run(tmp_path_factory.mktemp("atlasreport"), photos)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(executors, "run_jobs", fake_run_jobs)
        mp.setattr(atlas_module, "estimate_seconds", lambda *a, **k: 1.0)
        result = atlas_module.atlas(run, ATLAS_LAYER, quiet=True, steps=8, size=32)
    assert result.rendered == 2 * 512
    return build_report(run, image_size=64, examples=0, quiet=True)


@pytest.mark.slow
def test_a_large_atlas_loads_lazily_sorts_and_filters(atlas_report, page):
    from featureshift.report.site import layer_page as page_of

    path = atlas_report.parent / page_of(ATLAS_LAYER)
    assert _open(page, path) == []
    rows = page.locator("#channels tbody tr")
    assert rows.count() == 512
    loaded = ("Array.from(document.querySelectorAll('#channels img'))"
              ".filter(i => i.complete && i.naturalWidth > 0).length")
    total = page.evaluate("document.querySelectorAll('#channels img').length")
    assert total == 2 * 512
    at_first = page.evaluate(loaded)
    assert 0 < at_first < total  # only the thumbnails near the view are fetched
    page.locator("#channels tbody tr").last.scroll_into_view_if_needed()
    _settle(page)
    assert page.evaluate(loaded) > at_first  # the ones scrolled into view load
    assert _broken(page) == []

    page.evaluate("window.scrollTo(0, 0)")
    page.locator("#channels thead th", has_text="drift").locator("button").click()
    values = page.evaluate("Array.from(document.querySelectorAll('#channels tbody tr')).map(r => r.cells[4]"
                           ".getAttribute('data-value')).filter(v => v !== '').map(parseFloat)")
    assert len(values) > 400 and values == sorted(values, reverse=True)  # most drifted first

    page.locator("#filter-channel").fill("10-19, 300")
    visible = "Array.from(document.querySelectorAll('#channels tbody tr')).filter(r => !r.hidden)"
    assert sorted(page.evaluate(f"{visible}.map(r => +r.dataset.channel)")) == [*range(10, 20), 300]
    page.locator("#filter-channel").fill("")
    fates = page.evaluate("Array.from(new Set(Array.from(document.querySelectorAll('#channels tbody tr'))"
                          ".map(r => r.dataset.fate)))")
    for fate in [f for f in fates if f in ("kept", "repurposed", "died")]:
        page.locator("#filter-fate").select_option(fate)
        shown = page.evaluate(f"{visible}.map(r => r.dataset.fate)")
        assert shown and set(shown) == {fate}
    assert "channels shown" in page.locator("#filter-count").inner_text()
    assert page.problems == []


@pytest.mark.slow
def test_the_overview_of_a_large_atlas(atlas_report, page):
    from featureshift.report.site import channel_page as page_of

    assert _open(page, atlas_report) == []
    assert page.locator("#findings li").count() >= 3
    top = page.locator(".top-channels:not([hidden]) a.top")
    assert top.count() == 12
    options = page.locator("#most-changed-by option")
    page.locator("#most-changed-by").select_option(index=options.count() - 1)
    assert page.locator(".top-channels:not([hidden])").count() == 1
    href = page.locator(".top-channels:not([hidden]) a.top").first.get_attribute("href")
    assert href.startswith("channel-")
    assert _open(page, atlas_report.parent / href) == []
    assert _open(page, atlas_report.parent / page_of(ATLAS_LAYER, 511)) == []
    assert page.problems == []


@pytest.mark.slow
def test_a_link_ranked_by_change_and_the_rows_without_renders(report, page):
    _open(page, report)
    page.get_by_text("Channels of this layer, ranked by change").first.click()
    page.wait_for_load_state("load")
    assert page.url.endswith(layer_page(LAYER) + "#sort=weight_change")
    assert page.locator("#channels thead th", has_text="weight change").get_attribute("aria-sort") == "descending"
    visible = ("Array.from(document.querySelectorAll('#channels tbody tr')).filter(r => !r.hidden)"
               ".map(r => +r.dataset.channel)")
    assert page.evaluate(visible)[0] == 3  # the most changed rendered channel first
    assert sorted(page.evaluate(visible)) == CHANNELS  # the rows without renders are collapsed
    page.locator("#filter-unrendered").check()
    assert len(page.evaluate(visible)) == 128 and page.evaluate(visible)[0] in (3, 5)
    assert page.problems == []
