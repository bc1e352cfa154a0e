"""A headless Chromium for the tests, driven over the DevTools protocol: what a person sees in a
page (its text, its images) after loading, reloading, clicking.

Debian's `chromium` (`.ci/run` installs it); the protocol's websocket through aiohttp, which MLflow
already depends on. Each browser has a fresh profile (no cookies, no local storage: a new user).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1400,1000"]


def chromium_path() -> str:
    """The browser binary; RuntimeError naming the fix when there is none."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("no chromium on PATH: `apt-get install -y chromium` (.ci/run does it)")
    return path


class Page:
    """One tab, over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self._ids = ws, itertools.count(1)

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Call a protocol method (in an attached frame's `session`, else the tab) and return its
        result; events arriving meanwhile are dropped."""
        call_id = next(self._ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params or {},
                                 **({"sessionId": session} if session else {})})
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str, session: str | None = None):
        """The value of a JavaScript expression in the page, or in the frame of `session`
        (awaited when it is a promise)."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True}, session)
        return result.get("result", {}).get("value")

    async def frame_session(self, url_prefix: str, seconds: float = 120.0) -> str:
        """A session in the page's iframe whose URL starts with `url_prefix` (a sandboxed frame
        runs in a process of its own: its document is not reachable from the page's). Polled: the
        iframe element can exist before its document (and so its target) does."""
        deadline, urls = time.monotonic() + seconds, []
        while time.monotonic() < deadline:
            targets = (await self.send("Target.getTargets"))["targetInfos"]
            frames = [t for t in targets if t["type"] == "iframe" and t["url"].startswith(url_prefix)]
            if frames:
                session = await self.send("Target.attachToTarget", {"targetId": frames[0]["targetId"], "flatten": True})
                return session["sessionId"]
            urls = [(t["type"], t["url"]) for t in targets]
            await asyncio.sleep(0.5)
        raise TimeoutError(f"no iframe at {url_prefix}* within {seconds:.0f} s; the targets were {urls}")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def reload(self) -> None:
        await self.send("Page.reload", {"ignoreCache": True})

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, expression: str, seconds: float = 120.0, session: str | None = None):
        """Poll a JavaScript expression (in the frame of `session`, else the page) until it is
        truthy; its value. TimeoutError with the page's text when it never is (the test's message
        then says what the page showed). Generous: a loaded machine renders slowly."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the page is navigating
                value = await self.evaluate(expression, session)
                if value:
                    return value
            await asyncio.sleep(0.5)
        raise TimeoutError(f"{expression} never held; the page showed:\n{(await self.text())[:1500]}")

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile and one blank tab; closed (and its profile
    removed) on exit."""
    profile = Path(tempfile.mkdtemp(prefix="ablate-chromium-"))
    proc = subprocess.Popen([chromium_path(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {proc.poll()})")
            await asyncio.sleep(0.2)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            [tab] = [t for t in targets if t["type"] == "page"]
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
