"""A real headless browser (Debian's chromium) for the tests, behind a recording proxy.

Chromium is pointed at a proxy on a loopback port that records the first line of every
request (``GET http://host/path``, ``CONNECT host:443``) and answers 502, so nothing
leaves the machine and every request a page makes is seen. Chromium's own service
traffic (component updates, account and time checks: Google hosts, which no flag fully
silences in headless mode) is told apart by host.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tests.brokers import require_binary

#: Hosts chromium itself contacts at start (not the page).
BROWSER_SERVICE_DOMAINS = ("google.com", "googleapis.com", "gstatic.com", "gvt1.com")

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--no-pings",
    "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate,"
    "AutofillServerCommunication",
    "--hide-scrollbars",
)


@dataclass
class RecordingProxy:
    """Records request lines; answers every request with 502."""

    requests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(8192).split(b"\r\n", 1)[0]
                    self.requests.append(first.decode("latin-1"))
                    conn.sendall(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()

    @staticmethod
    def host(request: str) -> str:
        parts = request.split()
        target = parts[1] if len(parts) > 1 else ""
        if "://" in target:
            target = target.split("://", 1)[1]
        return target.split("/", 1)[0].rsplit(":", 1)[0]

    def page_requests(self) -> list[str]:
        """Requests not made by chromium's own services."""
        return [
            r
            for r in self.requests
            if not any(
                self.host(r) == d or self.host(r).endswith("." + d) for d in BROWSER_SERVICE_DOMAINS
            )
        ]


class Chromium:
    """Runs ``chromium`` headless on one page at a time, through a RecordingProxy."""

    def __init__(self) -> None:
        self.binary = require_binary("chromium")
        self.proxy = RecordingProxy()
        self._profiles = tempfile.TemporaryDirectory(prefix="iothub-tls-chromium-")

    def _run(self, page: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        profile = tempfile.mkdtemp(dir=self._profiles.name)
        return subprocess.run(
            [
                self.binary,
                *_FLAGS,
                f"--user-data-dir={profile}",
                f"--proxy-server=http://127.0.0.1:{self.proxy.port}",
                "--proxy-bypass-list=<-loopback>",
                *extra,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=True,
        )

    def dump_dom(self, page: Path) -> str:
        """The DOM after load, serialized."""
        return self._run(page, "--dump-dom").stdout

    def screenshot(self, page: Path, out: Path, width: int = 1400, height: int = 1800) -> Path:
        self._run(page, f"--screenshot={out}", f"--window-size={width},{height}")
        return out

    def close(self) -> None:
        self.proxy.close()
        self._profiles.cleanup()


def png_pixels(path: Path) -> tuple[int, int, set[bytes]]:
    """(width, height, distinct RGB(A) pixels) of an 8-bit RGB or RGBA PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = bit_depth = color_type = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, bit_depth, color_type = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert bit_depth == 8 and color_type in (2, 6), (bit_depth, color_type)
    channels = 3 if color_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    colors: set[bytes] = set()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
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
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[i] = (line[i] + pred) & 0xFF
        if y % 8 == 0:  # a sample of rows is plenty to tell a page from a blank
            colors.update(bytes(line[i : i + 3]) for i in range(0, stride, channels * 4))
        previous = line
    return width, height, colors
