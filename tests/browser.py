"""A real browser for the tests: headless Chromium driven over the DevTools protocol (a WebSocket).

Only what the tests need: open a page, evaluate JavaScript in it, list the URLs
it requested, take a screenshot. Chromium comes from the system (Debian's
``chromium`` package); ``find_chromium()`` returns None where there is none.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for name in NAMES if (path := shutil.which(name))), None)


class Page:
    """One tab, attached through a flat DevTools session on the browser's WebSocket."""

    def __init__(self, socket: Any, session: str) -> None:
        self.socket, self.session = socket, session
        self.ids = itertools.count(1)
        self.requests: list[str] = []  # every URL the page asked for (Network.requestWillBeSent)

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict:
        """Send one command and wait for its answer, recording network events on the way."""
        number = next(self.ids) + 1000
        self.socket.send(json.dumps({"id": number, "sessionId": self.session, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s")
            time.sleep(0.1)

    def screenshot(self, width: int = 1280, height: int = 800) -> bytes:
        """A PNG of the page at ``width`` x ``height``."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


@contextlib.contextmanager
def open_page(url: str, chromium: str | None = None) -> Iterator[Page]:
    """Start headless Chromium, open ``url`` in a fresh profile, yield the page; stop the browser after."""
    from websockets.sync.client import connect

    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium on this machine (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-port=0", "--remote-allow-origins=*",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own process group: the renderers and helpers are stopped with it
        )
        try:
            endpoint = None
            for line in process.stderr:  # Chromium prints its DevTools endpoint once it listens
                if line.startswith("DevTools listening on "):
                    endpoint = line.split(" on ", 1)[1].strip()
                    break
            if endpoint is None:
                raise RuntimeError(f"Chromium exited ({process.wait()}) without a DevTools endpoint")
            # Keep reading its log, so that a full pipe never blocks the browser.
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            with connect(endpoint, max_size=2**26) as socket:
                socket.send(json.dumps({"id": 1, "method": "Target.createTarget", "params": {"url": "about:blank"}}))
                target = _answer(socket, 1)["targetId"]
                socket.send(json.dumps({"id": 2, "method": "Target.attachToTarget",
                                        "params": {"targetId": target, "flatten": True}}))
                page = Page(socket, _answer(socket, 2)["sessionId"])
                page.call("Network.enable")
                page.call("Page.enable")
                page.call("Page.navigate", url=url)
                page.wait_for("document.readyState === 'complete'")
                yield page
        finally:
            # Kill every Chromium process, not only the first: a helper left running keeps writing into the
            # profile while it is removed ("Directory not empty"), as seen on a loaded machine.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _answer(socket: Any, number: int) -> dict:
    while True:
        message = json.loads(socket.recv(timeout=30))
        if message.get("id") == number:
            if "error" in message:
                raise RuntimeError(str(message["error"]))
            return message["result"]
