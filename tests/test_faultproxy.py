"""The fault proxy of the transport tests does what it claims, on plain TCP: each fault
is observed by a real client socket as the kind of loss it stands for."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from iothub_tls.testing.faultproxy import FaultProxy


class Echo:
    """A TCP server that answers each chunk with ``greeting`` + the chunk."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = int(self._sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if self.greeting:
                conn.sendall(self.greeting)
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[FaultProxy]:
    with FaultProxy(echo.port) as p:
        yield p


def dial(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        assert roundtrip(sock, b"hello") == b"hello"
        assert proxy.live == 1 and proxy.accepted == 1 and proxy.faults == 0


def test_cut_is_an_orderly_close(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        proxy.cut()
        assert sock.recv(10) == b""  # FIN: end of stream, not an error
    assert proxy.live == 0 and proxy.faults == 1


def test_reset_is_a_tcp_rst(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert proxy.faults == 1


def test_reset_on_next_request_waits_for_the_client(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        proxy.reset_on_next_request()
        assert proxy.live == 1  # still open: nothing is sent yet
        sock.sendall(b"lost")
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    with dial(proxy) as fresh:  # only the connections live when it was armed
        assert roundtrip(fresh, b"y") == b"y"


def test_flip_next_inverts_one_byte_of_the_next_server_chunk(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        proxy.flip_next(position=1)
        assert roundtrip(sock, b"abc") == b"a" + bytes([ord("b") ^ 0xFF]) + b"c"
        assert roundtrip(sock, b"abc") == b"abc"  # once


def test_drop_handshakes_resets_after_n_server_bytes() -> None:
    server = Echo(greeting=b"0123456789")
    try:
        with FaultProxy(server.port) as proxy:
            proxy.drop_handshakes(after=4, count=1)
            with dial(proxy) as sock:
                got = b""
                with pytest.raises(ConnectionResetError):
                    while chunk := sock.recv(65536):
                        got += chunk
                assert got == b"0123"
            with dial(proxy) as second:  # count=1: the next one is left alone
                assert second.recv(10) == b"0123456789"
            assert proxy.faults == 1
    finally:
        server.close()


def test_refusing_closes_new_connections(proxy: FaultProxy) -> None:
    proxy.refusing = True
    with dial(proxy) as sock:
        assert sock.recv(10) == b""
    proxy.refusing = False
    with dial(proxy) as sock:
        assert roundtrip(sock, b"z") == b"z"
    assert proxy.accepted == 2
