"""The report in a real browser: headless Chromium driven by Playwright, from disk, offline.

Skipped when Chromium or Playwright is missing, unless FEATURESHIFT_REQUIRE_BROWSER=1 (CI).
"""
import os
import shutil

import pytest

from featureshift.commands.report.builder import channel_page, layer_page

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
    pg.on("requestfailed", lambda r: pg.problems.append(f"request failed: {r.url}"))
    yield pg
    context.close()


def _open(page, path):
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                           ".map(i => i.getAttribute('src'))")
    return broken


def test_every_page_loads_cleanly(report, page):
    pages = sorted(report.parent.glob("*.html"))
    assert len(pages) == 2 + len(CHANNELS)
    for path in pages:
        broken = _open(page, path)
        assert broken == [], f"{path.name}: broken images {broken}"
        assert page.evaluate("document.images.length") > 0
    assert page.problems == []


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


def test_sorting_changes_the_order(report, page):
    _open(page, report.parent / layer_page(LAYER))
    first = lambda: page.locator("#channels tbody tr").first.get_attribute("data-channel")  # noqa: E731
    assert first() == str(CHANNELS[0])  # rendered channels first
    header = page.locator("#channels thead th", has_text="weight change").locator("button")
    header.click()  # ascending: an unchanged channel first
    assert first() not in ("3", "5")
    header.click()  # descending: the re-initialized channels first
    assert first() in ("3", "5")
    assert page.locator("#channels thead th", has_text="weight change").get_attribute("aria-sort") == "descending"
    assert page.problems == []


def test_a_script_in_a_class_name_is_only_text(report, page):
    _open(page, report)
    cells = page.locator("#class-table td", has_text="alert(1)")
    assert cells.count() == 1 and cells.first.inner_text() == EVIL
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # only the report's own
    assert page.problems == []  # no dialog fired
