"""Headless Chromium (Debian's `chromium` package) for browser tests, driven
over the DevTools protocol on a websocket (aiohttp): no selenium, no
downloaded browser. It listens on loopback only, resolves no host name but
127.0.0.1 (so a page that reached for a CDN would fail), and is stopped by
PID (deploy/procs.py's ChildProcess)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from deploy.procs import LOOPBACK, ChildProcess

CHROMIUM = Path("/usr/bin/chromium")
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0
FLAGS = (
    "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
    f"--remote-debugging-address={LOOPBACK}", "--remote-debugging-port=0",
    f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {LOOPBACK}",
)


class ProtocolError(Exception):
    pass


class Page:
    """One tab (a flattened target session) of the browser."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self._browser = browser
        self.session_id = session_id

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.send(method, session_id=self.session_id, **params)

    async def evaluate(self, expression: str) -> Any:
        """The expression's value (awaited if a promise), as JSON."""
        answer = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise ProtocolError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


class Browser:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # Every event, in order: (method, params, session id).
        self.events: list[tuple[str, dict[str, Any], str | None]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = msg.json()
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.append((data["method"], data.get("params", {}),
                                    data.get("sessionId")))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ProtocolError("the browser closed the connection"))

    async def send(self, method: str, session_id: str | None = None,
                   **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        await self._ws.send_json(message)
        answer = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        if "error" in answer:
            raise ProtocolError(f"{method}: {answer['error']}")
        return answer["result"]

    async def new_page(self, width: int, height: int) -> Page:
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send("Target.attachToTarget", targetId=target["targetId"],
                                   flatten=True)
        page = Page(self, attached["sessionId"])
        for domain in ("Page", "Runtime", "Network"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        return page

    async def aclose(self) -> None:
        with contextlib.suppress(ProtocolError, TimeoutError, ConnectionError):
            await self.send("Browser.close")
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def running_chromium(work: Path) -> AsyncIterator[Browser]:
    """A headless browser with a fresh profile under `work`; stopped (by PID)
    when the block ends."""
    profile = work / "chromium-profile"
    active_port = profile / "DevToolsActivePort"
    # Chromium refuses to run as root unless its sandbox is off.
    sandbox = ("--no-sandbox",) if os.geteuid() == 0 else ()
    child = ChildProcess("chromium", [str(CHROMIUM), *FLAGS, *sandbox,
                                      f"--user-data-dir={profile}", "about:blank"],
                         work / "chromium.log")
    await child.start()
    try:
        async def ready() -> bool:
            return len(active_port.read_text().splitlines()) == 2 if active_port.exists() else False

        await child.wait_ready(ready, START_TIMEOUT_S)
        port, path = active_port.read_text().splitlines()
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://{LOOPBACK}:{port}{path}", max_msg_size=0)
            browser = Browser(ws)
            try:
                yield browser
            finally:
                await browser.aclose()
    finally:
        await child.stop()
