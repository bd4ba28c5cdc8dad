"""A HuggingFace-like file server on 127.0.0.1 for the model-download tests.

Serves ``/<repo>/resolve/<revision>/<path>`` from memory, honours ``Range`` requests, and can
misbehave on purpose: cut a transfer half-way (once per file) or serve corrupted bytes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dlmuse_bids.fetch import RemoteFile


class FakeHub:
    """The server's state: files by URL path, requests seen, and misbehaviours."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.gets: Counter[str] = Counter()
        self.ranges: list[tuple[str, str]] = []
        self.cut_once: set[str] = set()  # paths whose first transfer stops half-way
        self.corrupt: set[str] = set()  # paths served with one byte flipped
        self.delay = 0.0  # seconds per 64 KiB chunk, to make transfers overlap
        self.lock = threading.Lock()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?")[0]
            data = hub.files.get(path)
            if data is None:
                self.send_error(404)
                return
            with hub.lock:
                hub.gets[path] += 1
                cut = path in hub.cut_once
                hub.cut_once.discard(path)
            if path in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = 0
            header = self.headers.get("Range")
            if header:
                hub.ranges.append((path, header))
                start = int(header.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut:
                body = body[: len(body) // 2]
            for i in range(0, len(body), 1 << 16):
                if hub.delay:
                    time.sleep(hub.delay)
                self.wfile.write(body[i : i + (1 << 16)])
            if cut:
                self.close_connection = True

    return Handler


class HubServer:
    """Context manager running a :class:`FakeHub` on a free loopback port."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def manifest_of(models_dir: Path, official: list[RemoteFile]) -> tuple[list[RemoteFile], dict]:
    """The official file list re-pointed at a local models folder: (manifest, served files).

    Same repositories and paths as the real release, with the local files' sizes and sha256s.
    """
    import hashlib

    manifest, served = [], {}
    for item in official:
        data = (models_dir / item.dest).read_bytes()
        checksummed = item.sha256 is not None
        manifest.append(
            RemoteFile(
                item.repo,
                item.path,
                item.dest,
                len(data) if checksummed else None,
                hashlib.sha256(data).hexdigest() if checksummed else None,
            )
        )
        served[f"/{item.repo}/resolve/main/{item.path}"] = data
    return manifest, served
