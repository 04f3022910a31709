"""report.html in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

Rendered at 1280 and 420 CSS pixels wide, the report must show its summary card on the first
screen, keep every table inside the page (wide tables scroll inside their own wrapper), and sort
the memorized-prompt table when a header is clicked. Without a browser the test skips, except
when $CI is set: there a missing browser is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os

import pytest

from bench.chromium import BROWSERS, Chromium, which_browser
from cxrmem.stages import report as report_stage
from tests.test_report import _known_run, _write_attribution_and_mitigation


def find_browser() -> str | None:
    found = which_browser()
    if found is None and os.environ.get("CI"):
        pytest.fail(f"no headless browser ({', '.join(BROWSERS)}) on PATH in CI: .ci/run installs Debian's chromium")
    return found


@pytest.fixture(scope="module")
def browser():
    binary = find_browser()
    if binary is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}) on PATH: apt-get install chromium")
    try:
        import websocket  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("websocket-client is not installed in CI (it is in the test extras)")
        pytest.skip("websocket-client is not installed (pip install -e '.[test]')")
    page = Chromium(binary)
    yield page
    page.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser_run")
    cfg, layout = _known_run(out)
    _write_attribution_and_mitigation(layout)
    report_stage.run(cfg)
    return layout.report


TABLE_OVERFLOW = """[...document.querySelectorAll('table')].map(t => {
  const r = t.getBoundingClientRect(), box = (t.closest('.scroll') || t).getBoundingClientRect();
  return {right: Math.round(box.right), clipped: t.closest('.scroll') ? 0 : Math.round(r.right)};
})"""


@pytest.mark.parametrize("width", [1280, 420])
def test_report_reads_at_desktop_and_phone_width(browser, report, width):
    browser.open(report, width, 800)
    card = browser.js("(() => { const r = document.querySelector('#summary').getBoundingClientRect();"
                      " return {top: r.top, bottom: r.bottom, h: innerHeight}; })()")
    assert 0 <= card["top"] < card["h"] / 2, f"summary card starts at {card['top']}px of {card['h']}"
    headline = browser.js("document.querySelector('#summary .finding').getBoundingClientRect().bottom")
    assert headline <= card["h"], "the memorized count is below the first screen"
    page_width = browser.js("document.documentElement.clientWidth")
    assert browser.js("document.documentElement.scrollWidth") <= page_width, "the page scrolls sideways"
    for box in browser.js(TABLE_OVERFLOW):
        assert box["right"] <= page_width and box["clipped"] <= page_width, box
    widths = browser.js("[...document.images].map(i => i.getBoundingClientRect().right)")
    assert widths and max(widths) <= page_width


def test_memorized_table_sorts_and_filters(browser, report):
    browser.open(report, 1280, 800)
    column = "[...document.querySelectorAll('#memorized-table tbody tr')].filter(r => !r.hidden).map(r => r.cells[{i}].dataset.value)"
    headers = browser.js("[...document.querySelectorAll('#memorized-table th')].map(h => h.textContent.trim())")
    d_mem = headers.index(next(h for h in headers if h.startswith("d_mem")))
    n_reports = headers.index(next(h for h in headers if h.startswith("n_reports")))
    by_dmem = [float(v) for v in browser.js(column.format(i=d_mem))]
    assert by_dmem == sorted(by_dmem, reverse=True) and len(by_dmem) >= 3
    browser.js(f"document.querySelectorAll('#memorized-table th')[{n_reports}].click()")
    ascending = [float(v) for v in browser.js(column.format(i=n_reports))]
    assert ascending == sorted(ascending)
    browser.js(f"document.querySelectorAll('#memorized-table th')[{n_reports}].click()")
    assert [float(v) for v in browser.js(column.format(i=n_reports))] == sorted(ascending, reverse=True)
    assert browser.js("document.querySelector('#memorized-table th[aria-sort]').getAttribute('aria-sort')") == "descending"
    browser.js("const f = document.querySelector('#memorized-filter'); f.value = 'Finding 1,';"
               " f.dispatchEvent(new Event('input'))")
    shown = browser.js("[...document.querySelectorAll('#memorized-table tbody tr')].filter(r => !r.hidden).map(r => r.textContent)")
    assert shown and all("Finding 1," in text for text in shown)
