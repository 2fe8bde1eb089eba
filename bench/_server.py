"""A loopback TLS server shaped like IoT Hub's front door, for handshake measurements.

It holds an RSA and an ECDSA certificate and, like IoT Hub, presents the RSA one unless
the client can only accept ECDSA: in TLS 1.2 the server picks the suite in its own order
(ECDHE-RSA first), in TLS 1.3 it picks the signature algorithm in its own order (RSA-PSS
first). A plain OpenSSL server with both certificates would hand ECDSA to every client
that merely allows it, and the ECC/RSA comparison would compare ECDSA with ECDSA.

Connections are served one at a time; for each, the server measures the CPU time its
own thread spent in the handshake (``time.thread_time``) and reports it on a queue.
Session tickets are off unless asked for, so the bytes of a handshake are the handshake.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from iothub_tls.policy import STRONG_SUITES
from iothub_tls.tls._openssl import shim
from tests.pki import Issued

# RSA first: the hub's default certificate is RSA; ECDSA only for ECC-only devices.
_SERVER_SIGALGS = (
    "RSA-PSS+SHA256:RSA-PSS+SHA384:RSA-PSS+SHA512:RSA+SHA256:RSA+SHA384:RSA+SHA512:"
    "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512"
)


@dataclass(frozen=True)
class ServerSide:
    """What the server saw of one connection."""

    cpu: float  # seconds of server thread CPU in the handshake
    version: str | None
    cipher: str | None
    reused: bool
    error: str | None = None


class HubLikeServer:
    def __init__(self, certs: list[Issued], *, tickets: bool = False, payload: bytes = b"") -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="itls-bench-"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
        if not tickets:
            ctx.options |= ssl.OP_NO_TICKET
            ctx.num_tickets = 0
        ordered = sorted(STRONG_SUITES, key=lambda s: s.authentication != "RSA")
        ctx.set_ciphers(":".join(s.openssl for s in ordered))
        shim("server signature algorithm order").set_sigalgs(ctx, _SERVER_SIGALGS)
        for i, issued in enumerate(certs):
            chain, key = issued.write(self._dir, f"server{i}")
            ctx.load_cert_chain(chain, key)
        self.context = ctx
        self.payload = payload
        self.seen: queue.Queue[ServerSide] = queue.Queue()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hub-like-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._handle(raw)

    def _handle(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cpu = 0.0
        try:
            tls = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            began = time.thread_time()
            tls.do_handshake()
            cpu = time.thread_time() - began
            cipher = tls.cipher()
            side = ServerSide(
                cpu, tls.version(), cipher[0] if cipher else None, bool(tls.session_reused)
            )
            if self.payload:
                tls.sendall(self.payload)
            with contextlib.suppress(OSError):
                while tls.recv(65536):
                    pass
            tls.close()
        except (OSError, ssl.SSLError) as exc:
            side = ServerSide(cpu, None, None, False, error=str(exc))
            raw.close()
        self.seen.put(side)

    def next_seen(self, timeout: float = 10.0) -> ServerSide:
        return self.seen.get(timeout=timeout)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> HubLikeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
