"""report.html in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

Rendered at 1280 and 420 CSS pixels wide, the report must show its summary card on the first
screen, keep every table inside the page (wide tables scroll inside their own wrapper), and sort
the memorized-prompt table when a header is clicked. Without a browser the test skips, except
when $CI is set: there a missing browser is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cxrmem.stages import report as report_stage
from tests.test_report import _known_run, _write_attribution_and_mitigation

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# No network on test machines: keep Chromium from reaching for Google's services (see .ci/run).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0"]


def find_browser() -> str | None:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None and os.environ.get("CI"):
        pytest.fail(f"no headless browser ({', '.join(BROWSERS)}) on PATH in CI: .ci/run installs Debian's chromium")
    return found


class Chromium:
    """One headless Chromium page, driven over the DevTools protocol (websocket-client)."""

    def __init__(self, binary: str):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="cxrmem-chromium-")
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = Path(self.profile) / "DevToolsActivePort", time.monotonic() + 30
        # Chromium writes "<port>\n<browser target path>" once its DevTools endpoint listens.
        while len(port_file.read_text().split() if port_file.exists() else []) < 2:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"{binary} did not open its DevTools port within 30 s")
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        # No Origin header: Chromium rejects websocket origins it was not told to allow.
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=30, suppress_origin=True)
        self.next_id, self.session = 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, path: str, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=width < 600)
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        for _ in range(200):
            if self.js("document.readyState") == "complete":
                return
            time.sleep(0.05)
        raise RuntimeError(f"{path} did not finish loading")

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: str) -> None:
        Path(path).write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


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
