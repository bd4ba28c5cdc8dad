"""Render a local HTML file in headless Chromium and report what a person would see.

Speaks Chromium's DevTools protocol over ``--remote-debugging-pipe`` (commands on fd 3, replies
on fd 4, each message JSON ended by a NUL byte), so it needs only the standard library and a
Chromium binary. Every request whose scheme is not local (file, data, blob, about) is recorded
and failed by the Fetch domain before it leaves the browser; a dead proxy and a host resolver
that resolves nothing are a second fence.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LOCAL_SCHEMES = frozenset({"file", "data", "blob", "about"})
MAX_SCREENSHOT_HEIGHT = 16384  # CSS px; taller pages are cut there
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--remote-debugging-pipe",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--metrics-recording-only",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--mute-audio",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)

# Waits (bounded) for fonts and every <img>, then reads what the page shows.
_COLLECT = """(async (ms) => {
  const imgs = Array.from(document.images);
  for (const img of imgs) if (img.loading === "lazy") img.loading = "eager";
  const settled = imgs.map((img) => img.complete ? null : new Promise((ok) => {
    img.addEventListener("load", ok, {once: true});
    img.addEventListener("error", ok, {once: true});
  }));
  settled.push(document.fonts.ready);
  await Promise.race([Promise.all(settled), new Promise((ok) => setTimeout(ok, ms))]);
  return {
    title: document.title,
    images: imgs.map((i) => ({src: i.getAttribute("src") ?? "", url: i.currentSrc || i.src,
                              complete: i.complete, naturalWidth: i.naturalWidth})),
    links: Array.from(document.querySelectorAll("a[href]"),
                      (a) => ({href: a.getAttribute("href"), url: a.href})),
  };
})(%d)"""


@dataclass(frozen=True)
class Image:
    """One <img>: its src attribute, resolved URL, and whether it loaded (naturalWidth > 0)."""

    src: str
    url: str
    complete: bool
    natural_width: int


@dataclass(frozen=True)
class Link:
    """One <a href>: the attribute as written and the absolute URL it resolves to."""

    href: str
    url: str


@dataclass(frozen=True)
class FailedRequest:
    """A request that failed, with Chromium's error text (e.g. net::ERR_FILE_NOT_FOUND)."""

    url: str
    error: str


@dataclass(frozen=True)
class PageReport:
    """What the rendered page showed and what went wrong while loading it."""

    title: str
    images: tuple[Image, ...]
    links: tuple[Link, ...]
    console_errors: tuple[str, ...]
    failed_requests: tuple[FailedRequest, ...]
    external_requests: tuple[str, ...]
    screenshot: Path


@dataclass(frozen=True)
class LinkTargets:
    """Where a page's links lead: local files by href, and every other (non-file) link."""

    local: dict[str, Path]
    external: tuple[str, ...]
    root: Path

    @property
    def missing(self) -> list[Path]:
        """Local targets that do not exist."""
        return sorted({path for path in self.local.values() if not path.exists()})

    @property
    def outside(self) -> list[Path]:
        """Local targets outside ``root`` (they break when the folder moves)."""
        root = self.root.resolve()
        return sorted({p for p in self.local.values() if not p.resolve().is_relative_to(root)})


def chromium_path() -> str | None:
    """The Chromium binary: $DLMUSE_CHROMIUM if set (no fallback), else the first on PATH."""
    override = os.environ.get("DLMUSE_CHROMIUM")
    if override:
        return shutil.which(override)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def require_chromium() -> str:
    """The Chromium binary; without one, skip (or fail under CI, which must install it)."""
    import pytest

    found = chromium_path()
    if found is None:
        why = "no Chromium: install Debian's chromium or set DLMUSE_CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI installs it in .ci/run)")
        pytest.skip(why)
    return found


def link_targets(report: PageReport, root: Path) -> LinkTargets:
    """Local paths of the report's file:// links (no fragment/query); skips mailto: and #..."""
    local: dict[str, Path] = {}
    external: list[str] = []
    for link in report.links:
        if link.href.startswith("#") or link.href.lower().startswith("mailto:"):
            continue
        parts = urlsplit(link.url)
        if parts.scheme == "file":
            local[link.href] = Path(unquote(parts.path))
        elif link.url not in external:
            external.append(link.url)
    return LinkTargets(local, tuple(external), Path(root))


def _is_local(url: str) -> bool:
    return urlsplit(url).scheme.lower() in LOCAL_SCHEMES


def _arg_text(arg: dict[str, Any]) -> str:
    return str(arg.get("value", arg.get("description", arg.get("type", ""))))


class _DevTools:
    """One DevTools connection over a pipe pair, collecting the attached page's events."""

    def __init__(self, reader: int, writer: int, deadline: float, log: Path) -> None:
        self.reader, self.writer, self.deadline, self.log = reader, writer, deadline, log
        self.buffer = b""
        self.last_id = 0
        self.session: str | None = None
        self.navigated = self.loaded = False
        self.console: list[str] = []
        self.urls: dict[str, str] = {}
        self.failed: list[FailedRequest] = []
        self.external: list[str] = []

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        """Send a command to the page session (Target.* to the browser); return its id."""
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            if not select.select([], [self.writer], [], self._left(method))[1]:
                raise TimeoutError(f"Chromium timed out accepting {method}")
            try:
                data = data[os.write(self.writer, data) :]
            except BrokenPipeError:
                raise self._died(method) from None
        return self.last_id

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a command and handle events until its reply comes."""
        wanted = self.send(method, params)
        while True:
            message = self._receive(method)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def wait(self, what: str, done: Callable[[], bool]) -> None:
        """Handle events until ``done()``."""
        while not done():
            self._event(self._receive(what))

    def _left(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"Chromium timed out waiting for {what}")
        return left

    def _receive(self, what: str) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            if not select.select([self.reader], [], [], self._left(what))[0]:
                raise TimeoutError(f"Chromium timed out waiting for {what}")
            chunk = os.read(self.reader, 1 << 20)
            if not chunk:
                raise self._died(what)
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(raw)

    def _died(self, what: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace")[-2000:]
        return RuntimeError(f"Chromium exited while waiting for {what}; its log:\n{tail}")

    def _event(self, message: dict[str, Any]) -> None:
        if message.get("sessionId") != self.session:
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Fetch.requestPaused":
            url, request_id = params["request"]["url"], params["requestId"]
            if _is_local(url):
                self.send("Fetch.continueRequest", {"requestId": request_id})
            else:
                self._note_external(url)
                blocked = {"requestId": request_id, "errorReason": "BlockedByClient"}
                self.send("Fetch.failRequest", blocked)
        elif method == "Network.requestWillBeSent":
            url = self.urls[params["requestId"]] = params["request"]["url"]
            if not _is_local(url):
                self._note_external(url)
        elif method == "Network.loadingFailed":
            url = self.urls.get(params["requestId"], "?")
            self.failed.append(FailedRequest(url, params.get("errorText", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(_arg_text(arg) for arg in params.get("args", []))
            self.console.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(f"exception: {text.splitlines()[0] if text else '?'}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            self.console.append(f"{entry.get('source', 'log')}: {entry.get('text', '')}{where}")
        elif method == "Page.frameNavigated" and not params["frame"].get("parentId"):
            self.navigated, self.loaded = True, False
        elif method == "Page.loadEventFired":
            self.loaded = self.navigated

    def _note_external(self, url: str) -> None:
        if url not in self.external:
            self.external.append(url)


def _inspect(cdp: _DevTools, url: str, screenshot: Path, width: int, height: int) -> PageReport:
    target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    attached = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})
    cdp.session = attached["sessionId"]
    cdp.call("Fetch.enable", {"patterns": [{"urlPattern": "*"}]})  # before any request
    for domain in ("Network", "Page", "Runtime", "Log"):
        cdp.call(f"{domain}.enable")
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    cdp.call("Emulation.setDeviceMetricsOverride", metrics)
    navigation = cdp.call("Page.navigate", {"url": url})
    if navigation.get("errorText"):
        raise RuntimeError(f"Chromium could not open {url}: {navigation['errorText']}")
    cdp.wait("the load event", lambda: cdp.loaded)
    budget_ms = max(0, int((cdp.deadline - time.monotonic() - 1) * 1000))
    evaluated = cdp.call(
        "Runtime.evaluate",
        {"expression": _COLLECT % budget_ms, "awaitPromise": True, "returnByValue": True},
    )
    if "exceptionDetails" in evaluated:
        raise RuntimeError(f"collecting the page failed: {evaluated['exceptionDetails']}")
    page = evaluated["result"]["value"]
    size = cdp.call("Page.getLayoutMetrics")["cssContentSize"]
    full_width = max(width, math.ceil(size["width"]))
    full_height = min(max(height, math.ceil(size["height"])), MAX_SCREENSHOT_HEIGHT)
    clip = {"x": 0, "y": 0, "width": full_width, "height": full_height, "scale": 1}
    shot = cdp.call(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    return PageReport(
        title=page["title"],
        images=tuple(
            Image(i["src"], i["url"], i["complete"], i["naturalWidth"]) for i in page["images"]
        ),
        links=tuple(Link(link["href"], link["url"]) for link in page["links"]),
        console_errors=tuple(cdp.console),
        failed_requests=tuple(cdp.failed),
        external_requests=tuple(cdp.external),
        screenshot=screenshot,
    )


def _pipe(fds: list[int]) -> tuple[int, int]:
    """A pipe whose ends are >= 10 (so bash's 3<& and 4>& cannot clash), noted in ``fds``."""
    for fd in os.pipe():
        fds.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return fds[-2], fds[-1]


def render(
    html: Path, screenshot: Path, *, width: int = 1280, height: int = 900, timeout: float = 60
) -> PageReport:
    """Open ``html`` in a fresh offline headless Chromium, report it, save a full-page PNG.

    Raises TimeoutError when the whole run takes longer than ``timeout`` seconds; Chromium and
    its child processes are killed and its temporary profile removed in every case.
    """
    binary = chromium_path()
    if binary is None:
        raise FileNotFoundError("no Chromium found (install chromium or set DLMUSE_CHROMIUM)")
    url = Path(html).resolve().as_uri()
    deadline = time.monotonic() + timeout
    fds: list[int] = []
    proc: subprocess.Popen[bytes] | None = None
    cdp: _DevTools | None = None
    with tempfile.TemporaryDirectory(prefix="dlmuse-chromium-", ignore_cleanup_errors=True) as tmp:
        try:
            child_in, to_child = _pipe(fds)
            from_child, child_out = _pipe(fds)
            args = [binary, *FLAGS, f"--user-data-dir={tmp}/profile"]
            args += [f"--window-size={width},{height}", "about:blank"]
            env = {**os.environ, "HOME": tmp, "XDG_CONFIG_HOME": tmp, "XDG_CACHE_HOME": tmp}
            log = Path(tmp, "chromium.log")
            with log.open("wb") as sink:
                proc = subprocess.Popen(
                    ["bash", "-c", f'exec "$@" 3<&{child_in} 4>&{child_out}', "bash", *args],
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=sink,
                    pass_fds=(child_in, child_out),
                    env=env,
                    start_new_session=True,
                )
            for fd in (child_in, child_out):  # only the child keeps these: EOF when it dies
                fds.remove(fd)
                os.close(fd)
            cdp = _DevTools(from_child, to_child, deadline, log)
            return _inspect(cdp, url, Path(screenshot), width, height)
        finally:
            if proc is not None:
                _stop(proc, cdp)
            for fd in fds:
                os.close(fd)


def _stop(proc: subprocess.Popen[bytes], cdp: _DevTools | None) -> None:
    """Ask Chromium to close (it then reaps its children), then SIGKILL its process group."""
    if cdp is not None and proc.poll() is None:
        cdp.session, cdp.deadline = None, time.monotonic() + 2
        with contextlib.suppress(OSError, TimeoutError, subprocess.TimeoutExpired):
            cdp.send("Browser.close")
            proc.wait(timeout=3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
