"""Real TLS peers on loopback for the test suite.

* :class:`TLSServer` — a Python/OpenSSL server thread with a configurable profile
  (versions, suites, RSA and/or ECDSA certificates, client certificates, a stalling
  mode). It is deliberately able to be weak: that is what the refusal tests need.
* :class:`OpenSSLServer` — ``openssl s_server`` as a foreign peer.
* :class:`RecordRelay` — a TCP relay that parses TLS record headers on the way
  through, to measure record sizes and handshake bytes on the wire.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tests.pki import Issued


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def _write_tmp(data: bytes, directory: Path, name: str) -> str:
    path = directory / name
    path.write_bytes(data)
    return str(path)


def _ffdhe2048(directory: Path) -> str:
    path = directory / "ffdhe2048.pem"
    pem = subprocess.run(
        ["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048"],
        check=True,
        capture_output=True,
    ).stdout
    path.write_bytes(pem)
    return str(path)


@dataclass
class Accepted:
    """What the server saw of one connection."""

    version: str | None = None
    cipher: str | None = None
    client_cert: bytes | None = None
    error: str | None = None
    session_reused: bool = False


class TLSServer:
    """A TLS server on 127.0.0.1 serving ``payload`` to each client after the handshake."""

    def __init__(
        self,
        certs: list[Issued],
        *,
        min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
        max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
        ciphers: str | None = None,
        client_ca: bytes | None = None,
        require_client_cert: bool = False,
        payload: bytes = b"hello\n",
        stall: bool = False,
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="itls-srv-"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        legacy = min_version < ssl.TLSVersion.TLSv1_2
        with warnings.catch_warnings():  # TLS 1.0/1.1 servers are what refusal tests need
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = min_version
            ctx.maximum_version = max_version
        if ciphers or legacy:
            # SECLEVEL=0 so OpenSSL 3 will speak TLS 1.0/1.1 and the weak suites at all.
            ctx.set_ciphers((ciphers or "ALL") + ":@SECLEVEL=0")
            # RFC 7919 ffdhe2048, so the DHE suites are really served.
            ctx.load_dh_params(_ffdhe2048(self._dir))
        for i, issued in enumerate(certs):
            ctx.load_cert_chain(
                _write_tmp(issued.cert_chain_pem, self._dir, f"c{i}.pem"),
                _write_tmp(issued.key_pem, self._dir, f"k{i}.pem"),
            )
        if client_ca:
            ctx.load_verify_locations(cadata=client_ca.decode())
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        self.context = ctx
        self.payload = payload
        self.stall = stall
        self.accepted: list[Accepted] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.stall:
                self._held.append(raw)  # accept TCP, never answer
                continue
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        seen = Accepted()
        raw.settimeout(10)
        # no Nagle: a greeting written right after the handshake is not held back ~40 ms
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                seen.version = tls.version()
                cipher = tls.cipher()
                seen.cipher = cipher[0] if cipher else None
                seen.client_cert = tls.getpeercert(binary_form=True)
                seen.session_reused = tls.session_reused
                self.accepted.append(seen)
                tls.sendall(self.payload)
                with contextlib.suppress(OSError):
                    while tls.recv(65536):
                        pass
        except (OSError, ssl.SSLError) as exc:
            seen.error = str(exc)
            self.accepted.append(seen)

    def wait_accepted(self, count: int = 1, timeout: float = 5.0) -> list[Accepted]:
        """Wait until the server has recorded ``count`` connection attempts."""
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.accepted

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for s in self._held:
            s.close()
        self._thread.join(2)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TLSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSSLServer:
    """``openssl s_server`` on a free loopback port (a peer that is not Python)."""

    def __init__(self, issued: Issued, *extra: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="itls-ossl-"))
        from tests.pki import pem

        cert = _write_tmp(pem(issued.cert), self._dir, "cert.pem")
        chain = _write_tmp(
            b"".join(pem(c) for c in issued.chain) or pem(issued.cert), self._dir, "chain.pem"
        )
        key = _write_tmp(issued.key_pem, self._dir, "key.pem")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "openssl",
                "s_server",
                "-accept",
                str(self.port),
                "-cert",
                cert,
                "-cert_chain",
                chain,
                "-key",
                key,
                "-naccept",
                "8",
                "-quiet",
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_port(self.port, proc=self.proc)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> OpenSSLServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RecordLog:
    """TLS records seen on one direction of a relayed connection."""

    records: list[tuple[int, int]] = field(default_factory=list)  # (content type, length)
    total_bytes: int = 0

    @property
    def largest_record(self) -> int:
        return max((length for _, length in self.records), default=0)

    def bytes_of(self, content_type: int) -> int:
        return sum(5 + length for t, length in self.records if t == content_type)


class RecordRelay:
    """TCP relay 127.0.0.1:port -> target that parses TLS record headers (RFC 8446 5.1)
    in both directions. ``logs[i]`` holds (client->server, server->client) for the i-th
    connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.logs: list[tuple[RecordLog, RecordLog]] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = int(self._sock.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            up, down = RecordLog(), RecordLog()
            self.logs.append((up, down))
            for src, dst, log in ((client, server, up), (server, client, down)):
                t = threading.Thread(target=self._pump, args=(src, dst, log), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: RecordLog) -> None:
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                log.total_bytes += len(data)
                buf += data
                while len(buf) >= 5:
                    ctype, _ver, length = struct.unpack("!BHH", buf[:5])
                    if len(buf) < 5 + length:
                        break
                    log.records.append((ctype, length))
                    buf = buf[5 + length :]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def wait_idle(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def close(self) -> None:
        self._sock.close()
        self.wait_idle(1.0)
        for s in self._sockets:
            s.close()

    def __enter__(self) -> RecordRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
