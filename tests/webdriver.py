"""A headless Chromium for the tests, driven through chromedriver's W3C WebDriver HTTP API with
urllib (no selenium): navigate, find elements, read their text as a person sees it, run a
script, take a screenshot.

``browser()`` skips the test, saying why, when Debian's ``chromium`` or ``chromium-driver`` is
missing (``make deps`` installs them).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.localbroker import end_process, free_port
from tests.broker import WAIT, wait_until

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class WebDriverError(Exception):
    """What chromedriver answered instead of a value: its error code and message."""


class Browser:
    """One chromedriver and one headless Chromium session."""

    def __init__(self, chromedriver: str, chromium: str, profile: Path,
                 size: tuple[int, int] = (1500, 620)) -> None:
        port = free_port()
        self._log = (profile.parent / "chromedriver.log").open("wb")
        self.proc = subprocess.Popen([chromedriver, f"--port={port}"], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        self.session = ""
        try:
            wait_until(self._ready, what="chromedriver ready")
            options = {"binary": chromium, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}",
                "--lang=en-GB", "--hide-scrollbars"]}
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                     "goog:chromeOptions": options}}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.quit()
            raise

    def _ready(self) -> bool:
        try:
            return bool(self._call("GET", "/status")["ready"])
        except (OSError, WebDriverError):
            return False

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as answer:
                return json.loads(answer.read())["value"]
        except urllib.error.HTTPError as exc:
            value = json.loads(exc.read() or b"{}").get("value") or {}
            raise WebDriverError(f"{value.get('error')}: {value.get('message')}") from None

    def _session(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def find(self, css: str) -> list[str]:
        """The element references of what ``css`` selects, in document order."""
        found = self._session("POST", "/elements", {"using": "css selector", "value": css})
        return [e[ELEMENT] for e in found]

    def text(self, element: str) -> str:
        """The element's rendered text, as a person sees it."""
        return str(self._session("GET", f"/element/{element}/text"))

    def displayed(self, element: str) -> bool:
        return bool(self._session("GET", f"/element/{element}/displayed"))

    def run(self, script: str, *args: Any) -> Any:
        """``script`` (a function body) in the page, synchronously, with ``args``."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def alert(self) -> str | None:
        """The text of an open alert, if a script opened one."""
        try:
            return str(self._session("GET", "/alert/text"))
        except WebDriverError as exc:
            if str(exc).startswith("no such alert"):
                return None
            raise

    def fit(self) -> None:
        """Size the window to the page, so a screenshot holds all of it."""
        width, height = self.run(
            "const d = document.documentElement; return [d.scrollWidth + outerWidth -"
            " innerWidth, d.scrollHeight + outerHeight - innerHeight];")
        self._session("POST", "/window/rect", {"width": int(width), "height": int(height)})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._session("GET", "/screenshot"))

    def quit(self) -> None:
        if self.session:
            with contextlib.suppress(OSError, WebDriverError):
                self._call("DELETE", f"/session/{self.session}")
        end_process(self.proc)
        self._log.close()


@contextlib.contextmanager
def browser(directory: Path) -> Iterator[Browser]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium and chromedriver are not installed (make deps installs them:"
                    " Debian's chromium and chromium-driver)")
    profile = directory / "chromium-profile"
    profile.mkdir()
    driver = Browser(chromedriver, chromium, profile)
    try:
        yield driver
    finally:
        driver.quit()
