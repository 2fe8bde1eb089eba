"""The asyncio clients' TLS layer (``iothub_tls._io.tls``) and the waiter a blocking
sender parks on (``iothub_tls._io.waiter``).

The layer reads the socket through the buffered-protocol interface into a buffer shared
by the thread's connections, and stops reading a batch when its last record is used up:
these tests feed it what a real TLS server writes, cut in every awkward way (records
glued in one TCP segment, a record split across segments, records of 16 KiB, a
close_notify behind the data), and check every byte arrives once and in order.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from iothub_tls._io.tls import TlsLayer, open_tls
from iothub_tls._io.waiter import ThreadWaiter
from iothub_tls.tls.context import create_ssl_context
from tests.conftest import HOST, PKI


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)  # not a view of the shared receive buffer
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


class RecordServer:
    """A TLS server on a thread that sends prepared TLS records, cut into TCP writes as
    the test says (the records are encrypted through memory BIOs, so their boundaries
    are known)."""

    def __init__(self, pki: PKI, tmp: Path, plans: list[list[bytes]]) -> None:
        cert, key = pki.rsa_leaf.write(tmp, "server")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.num_tickets = 0  # only the test's records after the handshake
        self.plans = plans
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self.sock.accept()
            with raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = self.ctx.wrap_bio(incoming, outgoing, server_side=True)
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        raw.sendall(outgoing.read())
                        incoming.write(raw.recv(65536))
                raw.sendall(outgoing.read())
                for plan in self.plans:
                    # each step: plaintexts to encrypt (one record each) or b"close"
                    wire = b""
                    for plaintext in plan:
                        if plaintext == b"close":
                            try:
                                tls.unwrap()
                            except ssl.SSLWantReadError:
                                pass
                        else:
                            tls.write(plaintext)
                        wire += outgoing.read()
                    self._send_cut(raw, wire)
                    time.sleep(0.05)  # separate TCP segments between plans
                raw.settimeout(5)
                raw.recv(1)  # until the client closes
        except Exception as exc:  # reported by the test
            self.errors.append(exc)

    @staticmethod
    def _send_cut(raw: socket.socket, wire: bytes) -> None:
        raw.sendall(wire)

    def close(self) -> None:
        self.sock.close()


async def _run(pki: PKI, server: RecordServer, expect: int) -> Recorder:
    inner = Recorder()
    layer = await open_tls(
        inner,
        "127.0.0.1",
        server.port,
        context=create_ssl_context(pki.policy()),
        server_hostname=HOST,
        connect_timeout=5,
        handshake_timeout=5,
    )
    assert isinstance(layer, TlsLayer)
    deadline = asyncio.get_running_loop().time() + 10
    while len(inner.received) < expect and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return inner


def test_records_glued_split_and_full_size_arrive_once_in_order(pki: PKI, tmp_path: Path) -> None:
    big = bytes(range(256)) * 64  # 16 KiB: a record's whole plaintext
    plans: list[list[bytes]] = [
        [b"one", b"two", b"three"],  # three records in one segment
        [big, big, b"tail"],  # full-size records, then a small one
        [b"x" * 100],
    ]
    server = RecordServer(pki, tmp_path, plans)
    expected = b"onetwothree" + big + big + b"tail" + b"x" * 100

    async def main() -> Recorder:
        inner = await _run(pki, server, len(expected))
        assert inner.transport is not None
        inner.transport.close()
        return inner

    try:
        inner = asyncio.run(main())
    finally:
        server.close()
    assert server.errors == []
    assert inner.received == expected
    # full-size records come one per read; the small ones of the first segment are read
    # one by one too (one read returns one record's plaintext)
    assert inner.chunks[:3] == [b"one", b"two", b"three"]
    assert len(big) in {len(c) for c in inner.chunks}


def test_a_record_split_across_segments_waits_for_its_end(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuts: list[int] = []

    def send_cut(raw: socket.socket, wire: bytes) -> None:
        # the record in three TCP segments: header, half the body, the rest
        for part in (wire[:3], wire[3 : len(wire) // 2], wire[len(wire) // 2 :]):
            raw.sendall(part)
            cuts.append(len(part))
            time.sleep(0.05)

    monkeypatch.setattr(RecordServer, "_send_cut", staticmethod(send_cut))
    server = RecordServer(pki, tmp_path, [[b"split record" * 50]])

    async def main() -> Recorder:
        inner = await _run(pki, server, 600)
        assert inner.transport is not None
        inner.transport.close()
        return inner

    try:
        inner = asyncio.run(main())
    finally:
        server.close()
    assert server.errors == []
    assert len(cuts) == 3
    assert inner.chunks == [b"split record" * 50]


def test_close_notify_behind_data_delivers_the_data_then_closes(pki: PKI, tmp_path: Path) -> None:
    server = RecordServer(pki, tmp_path, [[b"last words", b"close"]])

    async def main() -> tuple[Recorder, Exception | None]:
        inner = await _run(pki, server, len(b"last words"))
        lost = await asyncio.wait_for(inner.lost, 5)
        return inner, lost

    try:
        inner, lost = asyncio.run(main())
    finally:
        server.close()
    assert inner.chunks == [b"last words"]
    assert lost is None  # a clean close_notify, not an error


# -- ThreadWaiter ----------------------------------------------------------------------


def test_waiter_settled_from_another_thread_wakes_the_waiting_one() -> None:
    waiter = ThreadWaiter()
    assert not waiter.done() and not waiter.running() and not waiter.cancelled()
    assert waiter.set_running_or_notify_cancel()
    assert waiter.running()
    timer = threading.Timer(0.05, waiter.set_result)
    timer.start()
    assert waiter.wait(5)
    assert waiter.done() and waiter.exception() is None
    assert waiter.wait(0)  # settled: every later wait returns at once
    assert not waiter.cancel()  # too late to withdraw


def test_waiter_times_out_then_withdraws_a_pending_message() -> None:
    waiter = ThreadWaiter()
    started = time.monotonic()
    assert not waiter.wait(0.05)
    assert time.monotonic() - started >= 0.04
    assert waiter.cancel() and waiter.cancelled() and waiter.done()
    assert waiter.cancel()  # still cancelled
    # the loop finds it withdrawn: not sent, and settling it later changes nothing
    assert not waiter.set_running_or_notify_cancel()
    waiter.set_exception(RuntimeError("late"))
    assert waiter.cancelled() and waiter.exception() is None
    assert waiter.wait(0)


def test_waiter_already_sent_cannot_be_withdrawn_and_keeps_its_error() -> None:
    waiter = ThreadWaiter()
    assert waiter.set_running_or_notify_cancel()
    assert not waiter.wait(0.01)
    assert not waiter.cancel()  # sent: may still be delivered
    assert not waiter.done()
    error = RuntimeError("closed before the acknowledgement")
    waiter.set_exception(error)
    assert waiter.wait(0) and waiter.exception() is error
    with pytest.raises(RuntimeError, match="not pending"):
        waiter.set_running_or_notify_cancel()
