"""Headless Chromium (Debian's ``/usr/bin/chromium``, installed by scripts/setup.sh) driven over the Chrome
DevTools Protocol with aiohttp's WebSocket client, and a PNG decoder for looking at its screenshots.

Only what the page tests need: open a tab, record every request it makes, type, click, evaluate, screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = Path("/usr/bin/chromium")
#: flags for a quiet, offline, throwaway browser (root needs --no-sandbox)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


class BrowserError(RuntimeError):
    """Chromium answered a command with an error, or did not start."""


@dataclass
class Tab:
    """One page target, attached with its own session."""

    browser: Browser
    session: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, in order
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and console/browser errors (CSP's too)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    async def goto(self, url: str, *, within: float = 20.0) -> None:
        self.loaded.clear()
        await self.send("Page.navigate", {"url": url})
        async with asyncio.timeout(within):
            await self.loaded.wait()

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (awaited when it is a promise), as JSON gives it."""
        answer = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, *, within: float = 20.0) -> Any:
        """The first truthy value of ``expression``, polled."""
        deadline = time.monotonic() + within
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within:g} s waiting for {expression}")
            await asyncio.sleep(0.05)

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` as keyboard input would."""
        await self.evaluate(f"document.querySelector({selector!r}).focus()")
        await self.send("Input.insertText", {"text": text})

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view first)."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({selector!r}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                         "clickCount": 1})

    async def box(self, selector: str) -> tuple[int, int, int, int]:
        """The element's rectangle in page pixels: left, top, right, bottom."""
        left, top, right, bottom = await self.evaluate(
            f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();"
            " return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY]; })()")
        return int(left), int(top), int(right), int(bottom)

    async def screenshot(self) -> bytes:
        """A PNG of the whole page."""
        width, height = await self.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        answer = await self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
        return base64.b64decode(answer["data"])


class Browser:
    """A Chromium process with a fresh profile, and one DevTools WebSocket to it."""

    def __init__(self, process: subprocess.Popen[bytes], socket: aiohttp.ClientWebSocketResponse) -> None:
        self._process = process
        self._socket = socket
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tabs: dict[str, Tab] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = message.json()
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(BrowserError(str(data["error"])))
                    else:
                        future.set_result(data.get("result", {}))
                continue
            tab = self._tabs.get(data.get("sessionId", ""))
            if tab is None:
                continue
            if data["method"] == "Network.requestWillBeSent":
                tab.requests.append(data["params"]["request"]["url"])
            elif data["method"] == "Page.loadEventFired":
                tab.loaded.set()
            elif data["method"] == "Runtime.exceptionThrown":
                tab.errors.append(str(data["params"]["exceptionDetails"]))
            elif data["method"] == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                tab.errors.append(str(data["params"]["entry"]["text"]))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   session: str | None = None, within: float = 30.0) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._socket.send_json(message)
        async with asyncio.timeout(within):
            return await future

    async def new_tab(self, *, width: int = 1200, height: int = 900) -> Tab:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        tab = Tab(self, attached["sessionId"])
        self._tabs[tab.session] = tab
        for domain in ("Page", "Network", "Runtime", "Log"):
            await tab.send(f"{domain}.enable")
        await tab.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                              "deviceScaleFactor": 1, "mobile": False})
        return tab

    async def allow_downloads(self, directory: Path) -> None:
        await self.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(directory)})


def _launch() -> tuple[subprocess.Popen[bytes], Path, str]:
    """Start Chromium with a fresh profile; its process, profile and DevTools WebSocket URL."""
    if not CHROMIUM.is_file():
        raise BrowserError(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium")
    profile = Path(tempfile.mkdtemp(prefix="chromium-test-"))
    process = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
        if process.poll() is not None or time.monotonic() > deadline:
            _end(process, profile)
            raise BrowserError(f"chromium did not open its DevTools port (exit code {process.poll()})")
        time.sleep(0.05)
    port, path = port_file.read_text().splitlines()[:2]
    return process, profile, f"ws://127.0.0.1:{port}{path}"


def _end(process: subprocess.Popen[bytes], profile: Path) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    shutil.rmtree(profile, ignore_errors=True)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile, ended (and its profile removed) on exit."""
    process, profile, url = await asyncio.to_thread(_launch)
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as socket:
            browser = Browser(process, socket)
            try:
                yield browser
            finally:
                browser._reader.cancel()
    finally:
        await asyncio.to_thread(_end, process, profile)


@dataclass(frozen=True)
class Image:
    """Decoded 8-bit RGB(A) pixels."""

    width: int
    height: int
    channels: int
    rows: list[bytes]

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        row, at = self.rows[y], x * self.channels
        return row[at], row[at + 1], row[at + 2]

    def count(self, colour: tuple[int, int, int], box: tuple[int, int, int, int], *, tolerance: int = 12) -> int:
        """How many pixels inside ``box`` (left, top, right, bottom) are within ``tolerance`` of ``colour``."""
        left, top, right, bottom = box
        found = 0
        for y in range(max(top, 0), min(bottom, self.height)):
            for x in range(max(left, 0), min(right, self.width)):
                if all(abs(a - b) <= tolerance for a, b in zip(self.pixel(x, y), colour, strict=True)):
                    found += 1
        return found


def decode_png(data: bytes) -> Image:
    """The pixels of a non-interlaced 8-bit RGB or RGBA PNG (what Chromium's screenshots are)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    at, idat, header = 8, bytearray(), b""
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        at += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour_type not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour_type}, interlace {interlace}")
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                estimate = left + up - corner
                da, db, dc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
                line[i] = (line[i] + (left if da <= db and da <= dc else up if db <= dc else corner)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return Image(width, height, channels, rows)
