"""A tiny headless-Chromium driver over the DevTools protocol, for the dashboard tests.

    chromium = find_chromium()                       # installs Debian's package if missing
    with Chromium.launch(chromium, tmp_path) as browser:      # the process
        async with Page.open(browser.ws_url) as page:         # one tab, one CDP session
            await page.goto("http://127.0.0.1:8765/?token=...")
            await page.wait_for("window.__cfnesa.connected")
            await page.click("li.call")
            await page.screenshot(tmp_path / "shot.png")

No Playwright, no Selenium: Chromium prints ``DevTools listening on ws://...`` on
stderr when started with ``--remote-debugging-port=0``; one websocket to that URL
(the `websockets` library) carries every command, sessions flattened.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from debian import apt_install
from websockets.asyncio.client import ClientConnection, connect

from streaming.embedded import parent_death_signal

__all__ = ["BrowserError", "Chromium", "Page", "find_chromium"]

_DEVTOOLS = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    """Chromium could not be started, or a DevTools command failed."""


def find_chromium(install: bool = True) -> tuple[str | None, str]:
    """The chromium executable, installing Debian's ``chromium`` package if it is missing.

    Returns:
        (path, "") when found or installed, else (None, why not) for a skip message.
    """
    found = shutil.which("chromium")
    if found or not install:
        return found, "" if found else "chromium is not installed"
    why = apt_install("chromium")
    found = shutil.which("chromium")
    return (found, "") if found else (None, why or "chromium is still missing after installing it")


class Chromium:
    """A headless Chromium process with a DevTools endpoint (`ws_url`)."""

    def __init__(self, process: subprocess.Popen[str], ws_url: str, profile: Path) -> None:
        self.process = process
        self.ws_url = ws_url
        self.profile = profile
        self.stderr_tail: list[str] = []

    @classmethod
    def launch(
        cls,
        executable: str,
        workdir: Path | None = None,
        *,
        width: int = 1440,
        height: int = 900,
        timeout_s: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> Chromium:
        """Start Chromium and wait for its DevTools URL.

        Raises:
            BrowserError: it exited or printed no DevTools URL within ``timeout_s``.
        """
        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
        args = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            "--hide-scrollbars",
            # a test's tab is "visible": keep timers and rAF at full speed
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            f"--window-size={width},{height}",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            *extra_args,
            "about:blank",
        ]
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=parent_death_signal(),  # a killed test run takes its browser along
        )
        assert process.stderr is not None
        found: list[str] = []
        tail: list[str] = []

        def read() -> None:  # drain stderr for the whole life of the process
            assert process.stderr is not None
            for line in process.stderr:
                if not found:
                    match = _DEVTOOLS.search(line)
                    if match:
                        found.append(match.group(1))
                tail.append(line.rstrip())
                del tail[:-50]

        threading.Thread(target=read, daemon=True, name="chromium-stderr").start()
        deadline = time.monotonic() + timeout_s
        while not found:
            if process.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    process.kill()
                process.wait()
                shutil.rmtree(profile, ignore_errors=True)
                raise BrowserError("chromium did not start: " + " / ".join(tail[-8:]))
            time.sleep(0.05)
        browser = cls(process, found[0], profile)
        browser.stderr_tail = tail
        return browser

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and remove its profile."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Page:
    """One tab, driven through a flattened DevTools session.

    Attributes:
        console: console messages and uncaught exceptions of the page, as text.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._reader: asyncio.Task[None] | None = None
        self.session_id: str | None = None
        self.target_id: str | None = None
        self.console: list[str] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, browser_ws_url: str, width: int = 1440, height: int = 900
    ) -> AsyncIterator[Page]:
        """A new tab of the browser at ``browser_ws_url``, closed on exit."""
        async with connect(browser_ws_url, max_size=None, ping_interval=None) as ws:
            page = cls(ws)
            page._reader = asyncio.create_task(page._read())
            try:
                created = await page.send("Target.createTarget", {"url": "about:blank"}, top=True)
                page.target_id = created["targetId"]
                attached = await page.send(
                    "Target.attachToTarget", {"targetId": page.target_id, "flatten": True}, top=True
                )
                page.session_id = attached["sessionId"]
                page._listeners.append(page._on_console)
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                )
                yield page
            finally:
                if page.target_id is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(
                            page.send("Target.closeTarget", {"targetId": page.target_id}, top=True),
                            5,
                        )
                page._reader.cancel()
                await asyncio.gather(page._reader, return_exceptions=True)

    async def _read(self) -> None:
        async for raw in self._ws:
            msg = json.loads(raw)
            if "id" in msg:
                future = self._waiting.pop(msg["id"], None)
                if future is not None and not future.done():
                    future.set_result(msg)
            elif msg.get("sessionId") == self.session_id:
                for listener in list(self._listeners):
                    listener(msg.get("method", ""), msg.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    def _on_console(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            args = " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])
            )
            self.console.append(f"console.{params.get('type')}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(f"exception: {text}")

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        top: bool = False,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Send one DevTools command (to the tab's session unless ``top``); its result.

        Raises:
            BrowserError: the command failed, or got no answer within ``timeout_s``.
        """
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if not top:
            message["sessionId"] = self.session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        await self._ws.send(json.dumps(message))
        try:
            reply = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._waiting.pop(msg_id, None)
            raise BrowserError(f"{method}: no answer within {timeout_s:g} s") from None
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def goto(self, url: str, timeout_s: float = 15.0) -> None:
        """Navigate and wait for the load event."""
        loaded = asyncio.get_running_loop().create_future()

        def on_event(method: str, params: dict[str, Any]) -> None:
            if method == "Page.loadEventFired" and not loaded.done():
                loaded.set_result(None)

        self._listeners.append(on_event)
        try:
            result = await self.send("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise BrowserError(f"navigating to {url}: {result['errorText']}")
            await asyncio.wait_for(loaded, timeout_s)
        finally:
            self._listeners.remove(on_event)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON.

        Raises:
            BrowserError: it threw.
        """
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]!r} threw: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float = 10.0, poll_s: float = 0.05) -> Any:
        """Poll until ``expression`` is truthy; its value.

        Raises:
            TimeoutError: it stayed falsy for ``timeout_s`` (the page's console is in the message).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{expression!r} still {value!r} after {timeout_s:g} s; console: "
                    f"{self.console[-10:]}"
                )
            await asyncio.sleep(poll_s)

    async def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the first match.

        Raises:
            BrowserError: nothing matches, or it has no size.
        """
        box = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: 'center'}});
                const r = el.getBoundingClientRect();
                return {{x: r.left + r.width / 2, y: r.top + r.height / 2,
                         w: r.width, h: r.height}};
            }})()"""
        )
        if not box or not box["w"] or not box["h"]:
            raise BrowserError(f"nothing clickable matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    async def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport to ``path``."""
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(shot["data"])

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(write)
        return path
