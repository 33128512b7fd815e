"""A minimal Chrome DevTools Protocol client (aiohttp websocket) to drive headless Debian chromium.

Only what the browser test needs: launch chromium with a fresh profile, open a page, evaluate
JavaScript, collect console errors / uncaught exceptions, take a PNG screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,900", "--remote-debugging-port=0",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


class Chromium:
    def __init__(self, executable: str):
        self.exe = executable
        self.profile = Path(tempfile.mkdtemp(prefix="hq-chromium-"))
        self.proc = None
        self.port = None

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen([self.exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_file.exists():
                lines = port_file.read_text().splitlines()
                if lines and lines[0].strip().isdigit():
                    self.port = int(lines[0])
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools port")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.profile, ignore_errors=True)


def _frames(stack) -> list[str]:
    """Script URLs of a CDP stack trace (async parents included)."""
    out = []
    while stack:
        out += [f.get("url", "") for f in stack.get("callFrames", [])]
        stack = stack.get("parent")
    return out


class Page:
    """One page target: ``call`` sends a CDP command; events are collected into ``console``/``errors``."""

    def __init__(self, ws):
        self.ws = ws
        self._id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.console: list[dict] = []  # {"level", "text", "url", "frames": [script urls of the stack]}
        self.exceptions: list[dict] = []  # {"text", "frames"}
        self.requests: list[str] = []  # every URL the page requested (Network domain)
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, session, port: int):
        async with session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
            target = await r.json(content_type=None)
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = cls(ws)
        for domain in ("Runtime", "Log", "Page", "Network"):
            await page.call(f"{domain}.enable")
        return page

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, p = data.get("method"), data.get("params", {})
            if method == "Network.requestWillBeSent":
                self.requests.append(p.get("request", {}).get("url", ""))
            elif method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                self.console.append({"level": p.get("type"), "text": text, "url": "",
                                     "frames": _frames(p.get("stackTrace"))})
            elif method == "Log.entryAdded":
                e = p.get("entry", {})
                self.console.append({"level": e.get("level"), "text": e.get("text", ""), "url": e.get("url", ""),
                                     "frames": _frames(e.get("stackTrace"))})
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                text = (d.get("exception", {}) or {}).get("description") or d.get("text", "")
                self.exceptions.append({"text": text, "frames": _frames(d.get("stackTrace")) + [d.get("url", "")]})

    async def call(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._id] = fut
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        res = await asyncio.wait_for(fut, timeout)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res.get("result", {})

    async def eval(self, expression: str, timeout: float = 30.0):
        res = await self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                   "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise RuntimeError(f"JS error: {(d.get('exception') or {}).get('description') or d.get('text')}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = await self.eval(expression)
                if last:
                    return last
            except RuntimeError as e:
                last = str(e)
            await asyncio.sleep(interval)
        raise TimeoutError(f"timed out waiting for {expression!r} (last: {last!r})")

    async def screenshot(self, path: Path) -> None:
        res = await self.call("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(res["data"]))

    async def close(self):
        await self.ws.close()
        self._reader.cancel()
