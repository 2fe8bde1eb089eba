from __future__ import annotations

import datetime as dt
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

import iothub_tls as it
from iothub_tls.testing.pki import CertificateAuthority, Issued, KeyPool, KeyType
from iothub_tls.testing.server import TLSServer
from iothub_tls.tls import _openssl

# Tests stop the commands they start (`iothub-tls serve`) with SIGINT, as Ctrl-C does. A
# shell starts a background job with SIGINT ignored, and children inherit that: without
# a handler here, a suite run in the background would wait for servers that never stop.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

HOST = "hub.iothub-tls.test"
#: When the test run started (a reference for validity windows).
NOW = dt.datetime.now(dt.timezone.utc)
#: Leaf keys shared by the whole test run (RSA generation is slow); a CA made with
#: ``key_pool=KEYS`` draws its leaves' keys from here.
KEYS = KeyPool()


def new_root(
    common_name: str = "iothub-tls Test Root CA", **kwargs: object
) -> CertificateAuthority:
    """A root CA whose leaves draw their keys from :data:`KEYS`."""
    return CertificateAuthority.root(common_name, key_pool=KEYS, **kwargs)  # type: ignore[arg-type]


@dataclass
class PKI:
    """A root CA with an intermediate, as IoT Hub's chains look: root -> intermediate -> leaf."""

    root: CertificateAuthority
    intermediate: CertificateAuthority
    rsa_leaf: Issued
    ec_leaf: Issued

    @property
    def roots(self) -> it.RootSet:
        return it.RootSet.from_pem(self.root.cert_pem)

    def policy(self, **kwargs: object) -> it.TlsPolicy:
        return it.TlsPolicy(roots=self.roots, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pki() -> PKI:
    root = new_root("iothub-tls Test Root G2")
    inter = root.intermediate("iothub-tls Test Issuing CA")
    return PKI(
        root=root,
        intermediate=inter,
        rsa_leaf=inter.issue(HOST, "localhost"),
        ec_leaf=inter.issue(HOST, "localhost", key_type=KeyType.EC),
    )


@pytest.fixture
def tls_server() -> Iterator[Callable[..., TLSServer]]:
    """Factory: ``tls_server([certs], **profile)`` -> a running TLSServer, closed after."""
    made: list[TLSServer] = []

    def make(certs: list[Issued], **kwargs: object) -> TLSServer:
        server = TLSServer(certs, **kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def start_door() -> Iterator[Callable[..., object]]:
    """Factory: ``start_door(DoorClass, profile, registry, **options)`` -> a started
    front door of the local hub, stopped after the test."""
    started: list[object] = []

    def make(cls: Callable[..., object], *args: object, **options: object) -> object:
        door = cls(*args, **options)
        door.start()  # type: ignore[attr-defined]
        started.append(door)
        return door

    yield make
    for door in started:
        door.stop()  # type: ignore[attr-defined]


def connect(
    ctx: ssl.SSLContext, port: int, host: str = HOST, *, read: bool = True, timeout: float = 5
) -> ssl.SSLSocket:
    """Open a TLS connection through ``ctx`` and read the server's greeting."""
    raw = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    if read:
        tls.recv(65536)
    return tls


@pytest.fixture
def no_shim() -> Iterator[None]:
    """Simulate a platform where the OpenSSL shim cannot work."""
    _openssl._disable_for_tests("simulated: _ssl is statically linked")
    yield
    _openssl._reset()
