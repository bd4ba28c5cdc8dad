"""The headless-Chromium helper itself, on tiny pages written into tmp_path."""

from __future__ import annotations

import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.browser import chromium_path, link_targets, render, require_chromium


@pytest.fixture(autouse=True)
def _chromium():
    require_chromium()


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour RGB PNG from zlib and struct alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = (b"\0" + bytes(rgb) * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def probe() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1: its base URL and the paths requested from it."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            hits.append(self.path)
            self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _processes_mentioning(text: str) -> list[str]:
    """PIDs of live processes whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:
            pass
    return found


def test_good_page(tmp_path: Path) -> None:
    (tmp_path / "red.png").write_bytes(_png(160, 90, (200, 30, 30)))
    (tmp_path / "other page.html").write_text("<title>other</title>")
    page = tmp_path / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Good page</title></head>"
        "<body><h1>QC report</h1><img id='red' src='red.png' alt='red'>"
        "<p><a href='other%20page.html#top'>other</a> <a href='missing.html?x=1'>missing</a>"
        " <a href='#here'>here</a> <a href='mailto:qc@example.org'>mail</a></p></body></html>"
    )
    report = render(page, tmp_path / "shots" / "good.png", timeout=30)

    assert report.title == "Good page"
    [image] = report.images
    assert image.src == "red.png"
    assert image.url == (tmp_path / "red.png").as_uri()
    assert image.complete and image.natural_width == 160
    assert report.console_errors == ()
    assert report.failed_requests == ()
    assert report.external_requests == ()

    targets = link_targets(report, tmp_path)
    assert targets.local == {
        "other%20page.html#top": tmp_path / "other page.html",
        "missing.html?x=1": tmp_path / "missing.html",
    }
    assert targets.missing == [tmp_path / "missing.html"]
    assert targets.external == ()
    assert targets.outside == []

    assert report.screenshot == tmp_path / "shots" / "good.png"
    width, height = _png_size(report.screenshot)
    assert (width, height) == (1280, 900)


def test_bad_page(tmp_path: Path, probe: tuple[str, list[str]]) -> None:
    base, hits = probe
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><html><head><title>Bad page</title></head><body>"
        f"<img src='missing.png'><img src='http://example.invalid/x.png'><img src='{base}/p.png'>"
        "<a href='https://example.org/docs'>docs</a> <a href='/etc/hostname'>abs</a>"
        "<script>console.error('boom')</script><script>throw new Error('x')</script>"
        + "<p>tall</p>" * 200
        + "</body></html>"
    )
    report = render(page, tmp_path / "bad.png", width=800, height=600, timeout=30)

    missing, external, loopback = report.images
    assert missing.url == (tmp_path / "missing.png").as_uri()
    assert missing.natural_width == 0
    assert external.url == "http://example.invalid/x.png"
    assert external.natural_width == 0

    assert "console.error: boom" in report.console_errors
    assert "exception: Error: x" in report.console_errors
    assert any("ERR_FILE_NOT_FOUND" in e and "missing.png" in e for e in report.console_errors)

    failed = {request.url: request.error for request in report.failed_requests}
    assert failed[missing.url] == "net::ERR_FILE_NOT_FOUND"
    # Failed by the Fetch domain inside the browser: no DNS lookup, no connection.
    assert failed[external.url].startswith("net::ERR_BLOCKED_BY_CLIENT")
    assert set(report.external_requests) == {"http://example.invalid/x.png", f"{base}/p.png"}
    assert loopback.natural_width == 0 and hits == []  # nothing reached even a local server

    targets = link_targets(report, tmp_path)
    assert targets.external == ("https://example.org/docs",)
    assert targets.outside == [Path("/etc/hostname")]

    width, height = _png_size(report.screenshot)
    assert width == 800 and height > 600  # full page, not just the viewport


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="ERR_FILE_NOT_FOUND"):
        render(tmp_path / "nothing.html", tmp_path / "nothing.png", timeout=30)


def test_timeout_kills_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page that never finishes loading: bounded wait, then no Chromium process is left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    page = tmp_path / "hang.html"
    page.write_text("<title>hang</title><script>while (true) {}</script>")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="Chromium timed out"):
        render(page, tmp_path / "hang.png", timeout=3)
    assert time.monotonic() - start < 3 + 10  # kill and clean-up are bounded too
    for _ in range(50):  # SIGKILLed children may take a moment to exit
        if not (survivors := _processes_mentioning(str(tmp_path))):
            break
        time.sleep(0.1)
    assert survivors == []
    assert not list(tmp_path.glob("dlmuse-chromium-*"))  # the profile is gone too


def test_browser_that_dies_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLMUSE_CHROMIUM", "false")  # exits at once, like a crashing browser
    page = tmp_path / "page.html"
    page.write_text("<title>x</title>")
    with pytest.raises(RuntimeError, match="Chromium exited"):
        render(page, tmp_path / "page.png", timeout=10)


def test_chromium_path_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLMUSE_CHROMIUM", "/nonexistent/chromium")
    assert chromium_path() is None  # an explicit override never falls back to PATH
