"""Headless Chromium driven over the DevTools protocol: open a page, run script, screenshot.

For pages a test must click through; a page that only renders is simpler with
``chromium --dump-dom`` (see test_dashboard.py).
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from websockets.sync.client import ClientConnection, connect

from iiot_common.localservers import require

__all__ = ["Browser", "BrowserError"]


class BrowserError(AssertionError):
    """The page threw, or what a test waited for did not happen."""


class Browser:
    """One Chromium process with one page; ``with Browser(tmp) as b: b.goto(url)``."""

    def __init__(self, tmp: Path, *, width: int = 1400, height: int = 1000) -> None:
        self._profile = tmp / "chromium-cdp"
        self._size = f"{width},{height}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Self:
        binary = require("chromium", "chromium")
        self._profile.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                f"--window-size={self._size}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = self._devtools_port()
        with httpx.Client(trust_env=False, timeout=10) as http:
            pages = [t for t in http.get(f"http://127.0.0.1:{port}/json/list").json()]
        target = next(t for t in pages if t["type"] == "page")
        self._ws = connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.call("Page.enable")
        self.call("Runtime.enable")
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)

    def _devtools_port(self) -> int:
        # Chromium writes the port it picked to this file once it listens.
        marker = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if marker.exists():
                first = marker.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode}")
            time.sleep(0.05)
        raise BrowserError("chromium did not open its DevTools port within 30 s")

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One DevTools command; events that arrive meanwhile are dropped."""
        assert self._ws is not None
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self._ws.recv(timeout=30))
            if msg.get("id") != ident:
                continue
            if "error" in msg:
                raise BrowserError(f"{method}: {msg['error']}")
            result: dict[str, Any] = msg.get("result", {})
            return result

    def eval(self, expression: str) -> Any:
        """The value of a script expression in the page (promises awaited)."""
        out = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in out:
            details = out["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"script failed: {text}")
        return out.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete'", what=f"{url} loaded")

    def wait(self, expression: str, *, within: float = 20.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + within
        # An element comes back by value as {}, which is falsy here: found means true.
        probe = f"(() => {{ const v = ({expression}); return v instanceof Node ? true : v; }})()"
        while True:
            value = self.eval(probe)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {within} s waiting for {what or expression}")
            time.sleep(0.1)

    def text(self, selector: str) -> str:
        """The visible text of the first element matching ``selector`` ('' if none)."""
        found = self.eval(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText")
        return str(found or "")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page."""
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
