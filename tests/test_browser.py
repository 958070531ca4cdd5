"""The report in a real browser: headless Chromium opens index.html from disk.

Chromium is driven over its DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
ending in NUL on file descriptors 3 and 4), so no websocket client or webdriver is needed.
Skipped when Debian's `chromium` is not installed.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image
from test_report import EXPECTED_FIGURES, write_sweep_folder

from fedsens.reports.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)

pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]


def _high_fd(fd: int) -> int:
    """Move `fd` to a number >= 10, so that bash can put the pipe ends at 3 and 4 without clashes."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class Chromium:
    """A headless Chromium and one page, spoken to in the DevTools protocol over a pipe."""

    def __init__(self, user_data_dir: Path, *, timeout: float = 60.0):
        commands_read, commands_write = map(_high_fd, os.pipe())
        replies_read, replies_write = map(_high_fd, os.pipe())
        args = [*FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"]
        # bash, not sh: dash's redirections only take fds 0-9.
        self.process = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{commands_read} 4>&{replies_write}', CHROMIUM, *args],
            pass_fds=(commands_read, replies_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(replies_write)
        self.commands, self.replies = commands_write, replies_read
        self.timeout, self.buffer, self.next_id, self.session = timeout, b"", 0, None
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (OSError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.replies], [], [], remaining)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise OSError("chromium closed its DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: bool = True, **params) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            found = next((e for e in self.events if e.get("method") == event), None)
            if found:
                return found
            self.events.append(self._receive(deadline))

    def open_page(self, width: int, height: int) -> None:
        target = self.send("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found


def load_in_chromium(page: Path, profile: Path, *, width: int = 1280, height: int = 900) -> dict:
    """Open `page` from disk; return its images' decode states, errors, requests and a screenshot."""
    browser = Chromium(profile)
    try:
        browser.open_page(width, height)
        browser.send("Page.navigate", url=page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        images = browser.send(
            "Runtime.evaluate",
            returnByValue=True,
            awaitPromise=True,
            expression="Promise.all(Array.from(document.images, i => i.decode().catch(() => null)))"
            ".then(() => Array.from(document.images, i => ({complete: i.complete,"
            " width: i.naturalWidth, height: i.naturalHeight})))",
        )["result"]["value"]
        screenshot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        requests = [
            e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
        ]
        return {"images": images, "errors": browser.errors(), "requests": requests, "screenshot": screenshot}
    finally:
        browser.close()


def test_report_renders_in_headless_chromium(tmp_path):
    sweep = write_sweep_folder(tmp_path / "sweep")
    index = build_report(sweep, quiet=True)
    seen = load_in_chromium(index, tmp_path / "profile")

    assert len(seen["images"]) == len(EXPECTED_FIGURES["sweep"])
    assert all(image["complete"] and image["width"] > 0 and image["height"] > 0 for image in seen["images"])
    assert seen["errors"] == []
    # Self-contained: the page itself is the only thing fetched (images are data: URIs).
    assert all(url.startswith(("file:", "data:")) for url in seen["requests"])

    screenshot = Image.open(io.BytesIO(seen["screenshot"])).convert("RGB")
    assert screenshot.size == (1280, 900)
    (tmp_path / "screenshot.png").write_bytes(seen["screenshot"])
    colours = screenshot.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # text, tables and the headline box, not a blank page
    white = sum(count for count, colour in colours if min(colour) >= 250)
    assert white < 0.97 * screenshot.width * screenshot.height


def test_a_broken_image_is_caught(tmp_path):
    """The check above can fail: a page with an undecodable image reports naturalWidth 0."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><img src="data:image/png;base64,AAAA"></body></html>')
    seen = load_in_chromium(page, tmp_path / "profile", width=200, height=100)
    assert [image["width"] for image in seen["images"]] == [0]
