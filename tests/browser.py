"""A page rendered by a real browser: Debian's headless Chromium, driven over the Chrome DevTools
Protocol (websocket-client; no driver binary, no browser download).

`render(path)` opens a local HTML file, waits for it to load, decodes every <img> (`img.decode()`
rejects an image the browser cannot decode), collects console errors, uncaught exceptions and
failed loads, and takes a full-page PNG screenshot. Chromium runs with a fresh profile and every
background service that would reach the network off; the DevTools port binds 127.0.0.1.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.services import require_binary

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-default-apps", "--disable-extensions", "--metrics-recording-only", "--mute-audio",
          "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


@dataclass
class Rendered:
    title: str
    images: list[dict[str, Any]]  # {alt, width, height, decoded, error}
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    screenshot: bytes = b""
    text: str = ""


class _Session:
    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(f"no {method} within {timeout:.0f} s")


_PROBE = """(async () => {
  const images = [];
  for (const img of document.images) {
    let error = null;
    try { await img.decode(); } catch (e) { error = String(e); }
    images.push({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight,
                 decoded: error === null && img.complete && img.naturalWidth > 0, error});
  }
  return JSON.stringify({title: document.title, images, text: document.body.innerText});
})()"""


def render(page: Path, width: int = 1280, height: int = 1000) -> Rendered:
    chromium = require_binary("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
    profile = Path(tempfile.mkdtemp(prefix="mmpt-chromium-"))
    proc = subprocess.Popen([chromium, *_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.loads(r.read()) if t["type"] == "page")
        s = _Session(target["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            s.call(f"{domain}.enable")
        s.call("Page.navigate", url=page.resolve().as_uri())
        s.wait_event("Page.loadEventFired")
        probe = json.loads(s.call("Runtime.evaluate", expression=_PROBE, awaitPromise=True, returnByValue=True)["result"]["value"])
        shot = s.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        errors = []
        for event in s.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append("log: " + params["entry"]["text"])
            elif method == "Network.loadingFailed":
                errors.append("load failed: " + params.get("errorText", ""))
        s.ws.close()
        return Rendered(title=probe["title"], images=probe["images"], errors=errors,
                        screenshot=base64.b64decode(shot["data"]), text=probe["text"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
