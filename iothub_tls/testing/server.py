"""TLS servers on loopback for test suites and benchmarks.

* :class:`TLSServer` — a Python/OpenSSL server with a configurable profile (versions,
  suites, RSA and/or ECDSA certificates, client certificates, a stalling mode). It is
  deliberately able to be weak: that is what tests of refusals need.
* :class:`HubLikeServer` — a :class:`TLSServer` shaped like IoT Hub's front door, for
  handshake measurements.
* :class:`OpenSSLServer` — ``openssl s_server`` as a peer that is not Python.

Every server binds 127.0.0.1 on a port of the kernel's choosing (``server.port``),
serves on daemon threads, and is stopped by :meth:`close` or by leaving its ``with``
block. Certificates come from :mod:`iothub_tls.testing.pki`::

    from iothub_tls.testing.pki import CertificateAuthority
    from iothub_tls.testing.server import TLSServer

    root = CertificateAuthority.root("Test Root")
    with TLSServer([root.issue("hub.test")], max_version=ssl.TLSVersion.TLSv1_1) as old:
        ...  # connect to 127.0.0.1:old.port and expect a refusal
        assert old.wait_accepted()[0].error
"""

# ruff: noqa: S603, S607  (the openssl command line, from PATH, with arguments we build)

from __future__ import annotations

import contextlib
import queue
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..policy import STRONG_SUITES
from ..tls._openssl import shim
from .pki import Issued
from .ports import free_port, wait_port

__all__ = ["Accepted", "HubLikeServer", "OpenSSLServer", "TLSServer"]


def _ffdhe2048(directory: Path) -> str:
    """RFC 7919's ffdhe2048 group as a PEM file (so DHE suites are really served)."""
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

    #: the negotiated protocol (``"TLSv1.3"``...), None when the handshake failed
    version: str | None = None
    #: the negotiated suite (OpenSSL name)
    cipher: str | None = None
    #: the client's certificate, DER, when it sent one
    client_cert: bytes | None = None
    #: why the handshake or the connection failed
    error: str | None = None
    session_reused: bool = False
    #: CPU seconds the server's thread spent in the handshake
    handshake_cpu: float = 0.0


class TLSServer:
    """A TLS server on 127.0.0.1 sending ``payload`` to each client after the handshake,
    then reading until the client closes.

    :param certs: certificates (with their chains) to serve; several for RSA + ECDSA.
    :param min_version, max_version: the protocol range (TLS 1.0/1.1 are possible:
        they switch OpenSSL to security level 0).
    :param ciphers: an OpenSSL cipher string for TLS <= 1.2 (at security level 0, with
        RFC 7919 DH parameters, so weak and DHE suites are really served).
    :param client_ca: PEM of the CAs whose client certificates are accepted; asked for
        but optional unless ``require_client_cert``.
    :param stall: accept TCP connections and never answer (a hung server).
    :param tickets: send TLS session tickets (resumption); off, a handshake's bytes
        are the handshake alone.
    :param one_at_a_time: serve connections one after the other on one thread instead
        of a thread each (a measured handshake then competes with no other).

    ``accepted`` lists what the server saw of each connection, in the order of
    handshakes; :meth:`next_finished` returns them as their connections end.
    """

    def __init__(
        self,
        certs: Sequence[Issued],
        *,
        min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
        max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
        ciphers: str | None = None,
        client_ca: bytes | None = None,
        require_client_cert: bool = False,
        payload: bytes = b"hello\n",
        stall: bool = False,
        tickets: bool = True,
        one_at_a_time: bool = False,
    ) -> None:
        if not certs:
            raise ValueError("a TLS server needs at least one certificate")
        if require_client_cert and client_ca is None:
            raise ValueError("require_client_cert needs client_ca (the CAs to accept)")
        self._dir = Path(tempfile.mkdtemp(prefix="itls-srv-"))
        try:
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
            if not tickets:
                ctx.options |= ssl.OP_NO_TICKET
                ctx.num_tickets = 0
            for i, issued in enumerate(certs):
                files = issued.write(self._dir, f"server{i}")
                ctx.load_cert_chain(files.certificate, files.private_key)
            if client_ca:
                ctx.load_verify_locations(cadata=client_ca.decode())
                ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
            self._configure(ctx)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.context = ctx
        self.payload = payload
        self.stall = stall
        self.one_at_a_time = one_at_a_time
        self.accepted: list[Accepted] = []
        self._finished: queue.Queue[Accepted] = queue.Queue()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="tls-server", daemon=True)
        self._thread.start()

    def _configure(self, ctx: ssl.SSLContext) -> None:
        """Last changes to the context before serving (for subclasses)."""

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.stall:
                self._held.append(raw)  # accept TCP, never answer
            elif self.one_at_a_time:
                self._handle(raw)
            else:
                threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        seen = Accepted()
        raw.settimeout(10)
        # no Nagle: a greeting written right after the handshake is not held back ~40 ms
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        began = time.thread_time()
        try:
            with self.context.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            ) as tls:
                began = time.thread_time()  # the handshake alone
                tls.do_handshake()
                seen.handshake_cpu = time.thread_time() - began
                seen.version = tls.version()
                cipher = tls.cipher()
                seen.cipher = cipher[0] if cipher else None
                seen.client_cert = tls.getpeercert(binary_form=True)
                seen.session_reused = bool(tls.session_reused)
                self.accepted.append(seen)
                if self.payload:
                    tls.sendall(self.payload)
                with contextlib.suppress(OSError):
                    while tls.recv(65536):
                        pass
        except (OSError, ssl.SSLError) as exc:
            if seen.version is None:
                seen.handshake_cpu = time.thread_time() - began
                seen.error = str(exc)
                self.accepted.append(seen)
            raw.close()
        self._finished.put(seen)

    def wait_accepted(self, count: int = 1, timeout: float = 5.0) -> list[Accepted]:
        """Wait until the server has recorded ``count`` connection attempts (or
        ``timeout`` passed) and return all it recorded."""
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.accepted

    def next_finished(self, timeout: float = 10.0) -> Accepted:
        """What the server saw of the next connection it is done with (the handshake
        failed, or the client closed).

        :raises queue.Empty: when no connection ends within ``timeout`` seconds.
        """
        return self._finished.get(timeout=timeout)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for s in self._held:
            s.close()
        self._thread.join(5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TLSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# RSA first: the hub's default certificate is RSA; ECDSA only for ECC-only devices.
_HUB_SIGALGS = (
    "RSA-PSS+SHA256:RSA-PSS+SHA384:RSA-PSS+SHA512:RSA+SHA256:RSA+SHA384:RSA+SHA512:"
    "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512"
)


class HubLikeServer(TLSServer):
    """A :class:`TLSServer` that chooses like IoT Hub's front door, for handshake
    measurements.

    It holds an RSA and an ECDSA certificate and, like IoT Hub, presents the RSA one
    unless the client can only accept ECDSA: in TLS 1.2 the server picks the suite in its
    own order (IoT Hub's strong suites, ECDHE-RSA first), in TLS 1.3 it picks the
    signature algorithm in its own order (RSA-PSS first). A plain OpenSSL server with
    both certificates would hand ECDSA to every client that merely allows it, and an
    ECC/RSA comparison would compare ECDSA with ECDSA.

    Connections are served one at a time; each :class:`Accepted` carries the CPU time
    the server spent in its handshake. Session tickets are off unless asked for, so the
    bytes of a handshake are the handshake. Needs the OpenSSL shim
    (:mod:`iothub_tls.tls._openssl`) to order signature algorithms.
    """

    def __init__(
        self, certs: Sequence[Issued], *, tickets: bool = False, payload: bytes = b""
    ) -> None:
        super().__init__(certs, payload=payload, tickets=tickets, one_at_a_time=True)

    def _configure(self, ctx: ssl.SSLContext) -> None:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
        ordered = sorted(STRONG_SUITES, key=lambda s: s.authentication != "RSA")
        ctx.set_ciphers(":".join(s.openssl for s in ordered))
        shim("server signature algorithm order").set_sigalgs(ctx, _HUB_SIGALGS)


class OpenSSLServer:
    """``openssl s_server`` on a free loopback port, serving ``issued`` with its
    intermediates (a peer that is not Python). ``extra`` are more ``s_server`` arguments
    (``-tls1_2``, ``-cipher``, ``-rev``...).

    :param client_ca: PEM of the CAs whose client certificates it accepts: with it, the
        server requires a client certificate and ends the handshake without one.
    :param naccept: how many connections it serves before exiting (None: no limit).
    :raises FileNotFoundError: when the ``openssl`` command is not installed.
    """

    def __init__(
        self,
        issued: Issued,
        *extra: str,
        client_ca: bytes | None = None,
        naccept: int | None = 8,
    ) -> None:
        binary = shutil.which("openssl")
        if binary is None:
            raise FileNotFoundError("openssl not installed: apt-get install openssl")
        self._dir = Path(tempfile.mkdtemp(prefix="itls-ossl-"))
        files = issued.write(self._dir, "server")
        argv = [binary, "s_server", "-accept", "", "-cert", str(files.certificate)]
        argv += ["-key", str(files.private_key), "-quiet"]
        if issued.chain:  # -cert reads one certificate: the intermediates go separately
            chain = self._dir / "chain.pem"
            chain.write_bytes(issued.chain_pem[len(issued.cert_pem) :])
            argv += ["-cert_chain", str(chain)]
        if client_ca is not None:
            cafile = self._dir / "client-ca.pem"
            cafile.write_bytes(client_ca)
            argv += ["-Verify", "1", "-verify_return_error", "-CAfile", str(cafile)]
        if naccept is not None:
            argv += ["-naccept", str(naccept)]
        self.port = free_port()
        argv[3] = str(self.port)
        # Its messages go to a file: a pipe nobody reads fills up after some hundred
        # connections, and the server then stops in the middle of one.
        self.log_path = self._dir / "s_server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*argv, *extra],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            wait_port(self.port, proc=self.proc)
        except RuntimeError as exc:  # it exited: say what it said
            said = self.log_path.read_text(errors="replace")[-2000:]
            self.close()
            raise RuntimeError(f"{exc}: {said}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> OpenSSLServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
