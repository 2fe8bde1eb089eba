"""One accepted connection of the local hub: server-side TLS over memory BIOs on an
asyncio transport, then the protocol's session.

The TLS is the door's own ``ssl.SSLContext`` (from :class:`~.profile.HubTlsProfile`)
driven through ``SSLContext.wrap_bio``: OpenSSL sees exactly what it would see on a
socket, and the stream keeps what a front door must know about each handshake — the
ClientHello's first bytes (``iothub-tls probe`` names itself there), the SNI the client
sent (also when the handshake then fails), one deadline for the whole handshake — and
costs a connection no more memory than OpenSSL's own state and what is in flight.

Once the handshake completes, the door's session for the protocol takes over: it gets
the decrypted bytes (:meth:`Session.data_received`), the peer's end of the stream
(:meth:`Session.eof_received`) and the end of the connection
(:meth:`Session.connection_lost`, once), and writes with :meth:`TlsStream.write`.
Everything here runs on the hub's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import ssl
from dataclasses import dataclass, field
from typing import Protocol

from ..diagnostics.clienthello import parse_client_hello
from ..tls.info import verified_chain_der
from .log import tls_failure_reason

__all__ = ["Session", "StreamOwner", "TlsMeta", "TlsStream"]

logger = logging.getLogger("iothub_tls.hub")

#: What one read of decrypted bytes takes at most (TLS records carry 16 KiB).
_READ_SIZE = 32 * 1024
_SNI_ATTR = "_iothub_frontdoor_sni"
#: How long a closing connection may take to send what is left before it is dropped.
_CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class TlsMeta:
    """What the handshake established about a client."""

    tls_version: str | None
    cipher: str | None
    sni: str | None
    client_cert: bytes | None
    caller: str
    #: The client's certificate chain as TLS verified it (DER, leaf first, ending at the
    #: anchor); just the leaf where the verified chain cannot be read; empty without one.
    client_chain: tuple[bytes, ...] = field(default=(), repr=False)
    #: the client named itself ``iothub-tls probe`` in its ClientHello
    probe: bool = False
    #: the protocol runs over WebSockets on the HTTPS door (:mod:`.websocket`)
    websocket: bool = False

    @property
    def thumbprint(self) -> str | None:
        """SHA-1 of the client certificate, uppercase hex (how IoT Hub registers it)."""
        if not self.client_cert:
            return None
        return hashlib.sha1(self.client_cert, usedforsecurity=False).hexdigest().upper()

    @property
    def thumbprint_sha256(self) -> str | None:
        if not self.client_cert:
            return None
        return hashlib.sha256(self.client_cert).hexdigest().upper()


class Session(Protocol):
    """A protocol's side of one connection (MQTT, AMQP or HTTPS)."""

    def data_received(self, data: bytes) -> None:
        """Decrypted bytes from the device."""

    def eof_received(self) -> None:
        """The device ended its side (TLS close_notify or TCP end); the session closes
        the stream when it is done with it."""

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is gone (closed by either side, reset, or the door stopped);
        called once, last."""


class StreamOwner(Protocol):
    """The front door a stream reports to."""

    protocol: str
    context: ssl.SSLContext
    handshake_timeout: float

    def stream_established(self, stream: TlsStream, meta: TlsMeta) -> Session: ...

    def stream_failed(self, stream: TlsStream, reason: str) -> None: ...

    def stream_ended(self, stream: TlsStream) -> None: ...


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def sni_of(tls: ssl.SSLObject) -> str | None:
    found = vars(tls).get(_SNI_ATTR)
    return found if isinstance(found, str) else None


class TlsStream(asyncio.Protocol):
    """Server-side TLS on one accepted TCP connection (see the module docstring).

    :param deadline: the loop time by which the handshake must be complete.
    """

    def __init__(self, owner: StreamOwner, caller: str, deadline: float) -> None:
        self.owner = owner
        self.caller = caller
        self.deadline = deadline
        self.phase = Phase.HANDSHAKE
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.probe = False
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls: ssl.SSLObject = owner.context.wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        self._hello_read = False
        self._timer: asyncio.TimerHandle | None = None
        self._abort_reason: BaseException | None = None
        self._ended = False

    # -- asyncio's side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self.deadline, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.HANDSHAKE:
            if not self._hello_read:
                # The ClientHello's first bytes, before OpenSSL reads them: a handshake
                # that ``iothub-tls probe`` makes says so there (and may fail before
                # OpenSSL would look at it). A ClientHello that arrives in pieces is
                # taken as a device's, as the first bytes cannot be parsed alone.
                self._hello_read = True
                hello = parse_client_hello(data)
                self.probe = hello is not None and hello.from_probe
            self._incoming.write(data)
            self._handshake()
        elif self.phase is Phase.OPEN:
            self._incoming.write(data)
            self._read()
        # CLOSING: what still arrives is dropped (the session is done with it)

    def eof_received(self) -> bool:
        if self.phase is Phase.HANDSHAKE:
            self._incoming.write_eof()
            self._handshake()  # fails: the handshake cannot complete without the peer
        elif self.phase is Phase.OPEN:
            self._incoming.write_eof()
            self._read()
        elif self.phase is Phase.CLOSING and self.transport is not None:
            self.transport.close()  # the peer read our end and closed its side
        return True  # keep our side open: the session may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        was = self.phase
        self.phase = Phase.CLOSED
        reason = self._abort_reason or exc
        try:
            if was is Phase.HANDSHAKE and self._abort_reason is None:
                self.owner.stream_failed(
                    self, tls_failure_reason(exc or ConnectionResetError("connection closed"))
                )
            if self.session is not None:
                session, self.session = self.session, None
                try:
                    session.connection_lost(reason)
                except Exception:  # a session bug must not keep the door's count wrong
                    logger.exception("%s session of %s failed", self.owner.protocol, self.caller)
        finally:
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self.owner.stream_ended(self)

    def pause_writing(self) -> None:
        # The device does not read what we send: stop reading what it sends until it
        # does (its requests would only add answers to the pile).
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- the handshake ----------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._flush()  # OpenSSL's alert, which tells the device why
            self._fail(tls_failure_reason(exc))
            return
        self._flush()
        self._cancel_timer()
        leaf = self.tls.getpeercert(binary_form=True)
        cipher = self.tls.cipher()
        meta = TlsMeta(
            tls_version=self.tls.version(),
            cipher=cipher[0] if cipher else None,
            sni=sni_of(self.tls),
            client_cert=leaf,
            caller=self.caller,
            client_chain=tuple(verified_chain_der(self.tls) or [leaf]) if leaf else (),
            probe=self.probe,
        )
        self.phase = Phase.OPEN
        try:
            self.session = self.owner.stream_established(self, meta)
        except Exception:  # a door bug must not kill the listener
            logger.exception("%s connection from %s not served", self.owner.protocol, self.caller)
            self.abort()
            return
        if self._incoming.pending:  # application bytes that came with the Finished
            self._read()

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.phase is not Phase.HANDSHAKE:
            return
        seconds = f"{self.owner.handshake_timeout:g}"
        self._fail(f"TLS handshake failed: not completed within {seconds} s", abort=True)

    def _fail(self, reason: str, *, abort: bool = False) -> None:
        """The handshake failed: log why (with the SNI the client sent, if it got that
        far) and close."""
        if self.phase is not Phase.HANDSHAKE:
            return
        self.owner.stream_failed(self, reason)
        self._abort_reason = ConnectionAbortedError(reason)
        self.phase = Phase.CLOSING
        self._cancel_timer()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()  # after the alert is written

    # -- established --------------------------------------------------------------------------

    def _read(self) -> None:
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                chunk = self.tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
                break
            except (OSError, ValueError) as exc:  # a corrupted record, a bad alert...
                self._flush()
                self.abort(ConnectionAbortedError(f"TLS error: {_why(exc)}"))
                return
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        self._flush()  # what OpenSSL answers by itself (key updates, alerts)
        session = self.session
        if chunks and session is not None and self.phase is Phase.OPEN:
            session.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended and self.session is not None and self.phase is Phase.OPEN:
            self.session.eof_received()

    def write(self, data: bytes) -> None:
        """Encrypt and send ``data`` (dropped once the stream is closing)."""
        if self.phase is not Phase.OPEN or not data:
            return
        try:
            self.tls.write(data)
        except (OSError, ValueError) as exc:
            self.abort(ConnectionAbortedError(f"TLS error: {_why(exc)}"))
            return
        self._flush()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- ending -------------------------------------------------------------------------------

    def close(self, *, linger: float = 0.0) -> None:
        """End the connection after what was written: TLS close_notify, then the TCP
        connection. ``linger`` > 0: half-close and read (and drop) what the device still
        sends until it closes too, at most ``linger`` seconds — so an answer sent while
        the device is still writing reaches it instead of being lost to a reset."""
        if self.phase is not Phase.OPEN or self.transport is None:
            return
        self.phase = Phase.CLOSING
        with contextlib.suppress(OSError, ValueError):
            self.tls.unwrap()  # writes close_notify; WantRead: the peer's is not needed
        self._flush()
        transport = self.transport
        self._cancel_timer()
        if linger > 0 and transport.can_write_eof():
            transport.write_eof()
            self._timer = asyncio.get_running_loop().call_later(linger, transport.abort)
        else:
            transport.close()
            # A device that reads nothing more would keep what is left unsent (and the
            # connection) forever: drop it after a while.
            self._timer = asyncio.get_running_loop().call_later(_CLOSE_TIMEOUT, transport.abort)

    def abort(self, reason: BaseException | None = None) -> None:
        """Drop the connection now (unsent data is discarded)."""
        if self.phase is Phase.CLOSED:
            return
        if self._abort_reason is None:
            self._abort_reason = reason or ConnectionAbortedError("closed by the hub")
        if self.phase is Phase.HANDSHAKE:
            self.phase = Phase.CLOSING
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _why(exc: BaseException) -> str:
    """OpenSSL's reason for a TLS error (``DECRYPTION_FAILED_OR_BAD_RECORD_MAC``...)."""
    return str(getattr(exc, "reason", None) or exc)
