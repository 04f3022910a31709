"""One headless Chromium page, driven over the DevTools protocol (websocket-client).

The report's browser test (tests/test_report_browser.py) renders report.html with it, and
bench/scale.py times how long report.html takes to load and sort.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# No network on test machines: keep Chromium from reaching for Google's services (see .ci/run).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0"]


def which_browser() -> str | None:
    """The first of BROWSERS on PATH, or None."""
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


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
