"""The local hub's Device Provisioning Service (DPS) door.

:class:`ProvisioningService` (:mod:`.dps_service`) holds the enrollments (individual enrollments and
enrollment groups, each with a symmetric key or X.509: a device certificate's
thumbprint, or a CA) in ``STATE/dps.json`` and answers registrations: it authenticates
the device (SAS token for ``{idScope}/registrations/{registrationId}`` signed with the
enrollment's key or, for a group, with the key derived from the group's key; or the TLS
client certificate, whose subject CN is the registration id), then assigns it to this
hub (or to the hub its enrollment names), creating the device in the hub's registry
with the same credential. A registration is ``assigning`` first (the door answers 202
with ``retry-after``), then ``assigned``, ``failed`` (the device id is taken by a device
with another kind of credential) or ``disabled`` (its enrollment is disabled).

:class:`DpsEndpoint` serves DPS's device API on one TLS port, on the hub's I/O loop like
the other doors: a connection that starts with an MQTT CONNECT speaks DPS's MQTT
(``$dps/registrations/...``), any other speaks its REST API
(``PUT /{idScope}/registrations/{id}/register``, ``GET .../operations/{operationId}``).
Refused credentials are CONNACK 5 over MQTT and 401 over HTTPS; :meth:`fail_next`
makes the next requests answer 429 with a retry-after. The topics, paths and JSON are
:mod:`iothub_tls.dps.conventions`, the module the client uses.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import uuid
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..dps import conventions as dps
from ..mqtt import packets as codec
from . import http1
from .dps_service import DPS_FILE, Enrollment, ProvisioningService, Refusal, now_iso
from .frontdoor import DEFAULT_MAX_CONNECTIONS, HubFrontDoor, TlsMeta
from .log import ConnectionLog
from .loop import HubLoop
from .profile import HubTlsProfile
from .registry import DeviceRegistry
from .stream import TlsStream

__all__ = ["DPS_FILE", "DpsEndpoint", "Enrollment", "ProvisioningService", "door_profile"]

logger = logging.getLogger("iothub_tls.hub")

_MAX_REQUEST_BYTES = 64 * 1024
_LINGER = 2.0


# -- the door ------------------------------------------------------------------------------------


class DpsEndpoint(HubFrontDoor):
    """DPS's device API (MQTT and HTTPS on one port) for :class:`ProvisioningService`.

    :param profile: the door's TLS (its certificate names the DPS host).
    :param service: enrollments and registrations.
    """

    protocol = "Dps"

    def __init__(
        self,
        profile: HubTlsProfile,
        registry: DeviceRegistry,
        service: ProvisioningService,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: ConnectionLog | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        hub_loop: HubLoop | None = None,
    ) -> None:
        super().__init__(
            profile,
            registry,
            None,
            host=host,
            port=port,
            log=log,
            handshake_timeout=connect_timeout,
            max_connections=max_connections,
            hub_loop=hub_loop,
        )
        self.service = service
        self.idle_timeout = idle_timeout
        extra = service.trusted_pem()
        if extra:
            self.context.load_verify_locations(cadata=extra)
        service.on_trust(self._trust)

    def _trust(self, pem: str) -> None:
        """A certificate was enrolled: later handshakes accept chains ending at it."""
        self.context.load_verify_locations(cadata=pem)

    def fail_next(self, status: int = 429, *, times: int = 1, retry_after: int | None = 1) -> None:
        """See :meth:`ProvisioningService.fail_next`."""
        self.service.fail_next(status, times=times, retry_after=retry_after)

    def open_session(self, stream: TlsStream, meta: TlsMeta) -> _Sniffer:
        return _Sniffer(self, stream, meta)


class _Sniffer:
    """The first decrypted byte says which protocol the client speaks: 0x10 is an MQTT
    CONNECT; anything else is HTTP."""

    def __init__(self, door: DpsEndpoint, stream: TlsStream, meta: TlsMeta) -> None:
        self.door, self.stream, self.meta = door, stream, meta
        self.session: _MqttSession | _HttpSession | None = None
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            door.handshake_timeout, self._expired
        )

    def _expired(self) -> None:
        self.timer = None
        if self.session is None:
            self.door.connected(
                self.meta, None, success=False, reason="no request received in time"
            )
            self.stream.abort()

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.session = (
                _MqttSession(self.door, self.stream, self.meta)
                if data[:1] == b"\x10"
                else _HttpSession(self.door, self.stream, self.meta)
            )
        self.session.data_received(data)

    def eof_received(self) -> None:
        if self.session is not None:
            self.session.eof_received()
        else:
            self.stream.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.session is not None:
            self.session.connection_lost(exc)
        else:
            self.door.connected(self.meta, None, success=False, reason="closed before any request")


class _MqttSession:
    """DPS over MQTT: CONNECT (authenticated at once), SUBSCRIBE to the response
    filter, PUBLISH register and status requests, answers on the response topic."""

    def __init__(self, door: DpsEndpoint, stream: TlsStream, meta: TlsMeta) -> None:
        self.door, self.stream, self.meta = door, stream, meta
        self.decoder = codec.Decoder()
        self.registration_id: str | None = None
        self.enrollment: Enrollment | None = None
        self.key: str | None = None
        self.subscribed = False
        self.ended = False
        self.next_id = 0

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        try:
            received = self.decoder.feed(data)
        except codec.MqttProtocolError as exc:
            self._end(f"protocol error: {exc}")
            return
        for packet in received:
            if self.ended:
                return
            if self.enrollment is None:
                if isinstance(packet, codec.Connect):
                    self._connect(packet)
                else:
                    self._end("no MQTT CONNECT received", accepted=False)
                continue
            self._packet(packet)

    def eof_received(self) -> None:
        self._end("connection closed by the device", accepted=self.enrollment is not None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ended:
            self.ended = True
            if self.enrollment is not None:
                self.door.disconnected(self.meta, self.registration_id, "connection lost")

    def _end(self, reason: str, *, accepted: bool = True, last: bytes = b"") -> None:
        """Log the connection's end, then send ``last`` (a refusing CONNACK) and close:
        the log line exists before the device can read the answer."""
        if self.ended:
            return
        self.ended = True
        if accepted and self.enrollment is not None:
            self.door.disconnected(self.meta, self.registration_id, reason)
        elif not accepted:
            self.door.connected(self.meta, self.registration_id, success=False, reason=reason)
        if last:
            self.stream.write(last)
        self.stream.close()

    def _connect(self, connect: codec.Connect) -> None:
        door = self.door
        parsed = dps.parse_mqtt_username(connect.username or "")
        rid = connect.client_id
        self.registration_id = rid or None

        def refuse(code: int, reason: str) -> None:
            self._end(reason, accepted=False, last=codec.connack(code))

        if parsed is None or parsed[1] != rid or "api-version" not in parsed[2]:
            refuse(
                5,
                f"username {connect.username!r} must be "
                f"{{idScope}}/registrations/{rid}/api-version=... (client id = registration id)",
            )
            return
        token = connect.password.decode("utf-8", "replace") if connect.password else None
        try:
            enrollment, key = door.service.authenticate(
                parsed[0], rid, token, self.meta.client_chain if token is None else ()
            )
        except Refusal as exc:
            refuse(5, f"not authorized: {exc.message}")
            return
        self.enrollment, self.key = enrollment, key
        door.connected(self.meta, rid, success=True)  # logged before the device hears of it
        self.stream.write(codec.connack(0))

    def _packet(self, packet: codec.Packet) -> None:
        if isinstance(packet, codec.Disconnect):
            self._end("client disconnected")
        elif isinstance(packet, codec.PingReq):
            self.stream.write(codec.pingresp())
        elif isinstance(packet, codec.Subscribe):
            granted = []
            for topic, qos in packet.topics:
                if topic == dps.RESPONSE_FILTER:
                    self.subscribed = True
                    granted.append(min(qos, 1))
                else:
                    granted.append(0x80)
            self.stream.write(codec.suback(packet.packet_id, granted))
        elif isinstance(packet, codec.Unsubscribe):
            self.subscribed = False
            self.stream.write(codec.unsuback(packet.packet_id))
        elif isinstance(packet, codec.Publish):
            self._publish(packet)
        elif isinstance(packet, codec.Connect):
            self._end("second CONNECT on one connection")

    def _publish(self, packet: codec.Publish) -> None:
        request = dps.parse_request_topic(packet.topic)
        if request is None:
            self._end(f"publish to a topic DPS does not accept: {packet.topic!r}")
            return
        if packet.qos == 1 and packet.packet_id is not None:
            self.stream.write(codec.puback(packet.packet_id))
        status, body, retry = _answer(
            self.door.service, self.enrollment, self.registration_id or "", self.key,
            self.meta.client_chain, request.kind, request.operation_id, packet.payload,
        )  # fmt: skip
        if not self.subscribed:
            return  # DPS answers on the response topic only to a subscriber
        self.next_id = self.next_id % 65535 + 1
        self.stream.write(
            codec.publish(
                dps.response_topic(status, request.request_id, retry),
                body,
                qos=1,
                packet_id=self.next_id,
            )
        )


def _answer(
    service: ProvisioningService,
    enrollment: Enrollment | None,
    registration_id: str,
    key: str | None,
    chain: tuple[bytes, ...],
    kind: str,
    operation_id: str | None,
    body: bytes,
) -> tuple[int, bytes, int | None]:
    """Answer a register request or a poll of an authenticated device."""
    try:
        if enrollment is None:
            raise Refusal(401, 401002, "not authenticated")
        if kind == "register":
            try:
                claimed, payload = dps.parse_register_body(body)
            except (UnicodeDecodeError, ValueError) as exc:
                raise Refusal(
                    400, 400004, f"the register request is not valid JSON: {exc}"
                ) from None
            if claimed is not None and claimed != registration_id:
                raise Refusal(
                    400, 400004,
                    f"the body's registrationId {claimed!r} is not {registration_id!r}",
                )  # fmt: skip
            return service.register(
                enrollment, registration_id, key, chain[0] if chain else None, payload
            )
        assert operation_id is not None
        return service.status(registration_id, operation_id)
    except Refusal as exc:
        tracking = uuid.uuid4().hex
        return (
            exc.status,
            dps.error_body(exc.error_code, exc.message, tracking, now_iso()),
            exc.retry_after,
        )


class _HttpSession:
    """DPS's REST API with keep-alive: one request at a time, bodies by Content-Length."""

    def __init__(self, door: DpsEndpoint, stream: TlsStream, meta: TlsMeta) -> None:
        self.door, self.stream, self.meta = door, stream, meta
        self.buffer = bytearray()
        self.head: http1.RequestHead | None = None
        self.length = 0
        self.closed = False
        self.reported = False
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self._idle()

    def _idle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.door.idle_timeout, self._close)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        while not self.closed:
            if self.head is None:
                end = http1.head_end(self.buffer)
                try:
                    if end < 0:
                        http1.check_incomplete(self.buffer)
                        if len(self.buffer) > _MAX_REQUEST_BYTES:
                            raise http1.HeadError(431, "request head too large")
                        return
                    head = http1.parse_head(bytes(self.buffer[:end]))
                except http1.HeadError as exc:
                    self._error(exc.status, exc.status * 1000 + 4, exc.message, close=True)
                    return
                del self.buffer[:end]
                length = head.headers.get("Content-Length") or "0"
                if head.headers.get("Transfer-Encoding") or not length.strip().isdigit():
                    self._error(411, 411004, "send the body with Content-Length", close=True)
                    return
                self.length = int(length)
                if self.length > _MAX_REQUEST_BYTES:
                    self._error(413, 413004, "request body too large", close=True)
                    return
                self.head = head
            if len(self.buffer) < self.length:
                return
            body = bytes(self.buffer[: self.length])
            del self.buffer[: self.length]
            head, self.head = self.head, None
            self._request(head, body)

    def eof_received(self) -> None:
        self._close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()

    def _request(self, head: http1.RequestHead, body: bytes) -> None:
        url = urlsplit(head.target)
        route = dps.parse_path(url.path)
        if route is None:
            self._error(404, 404001, f"no such resource: {url.path}", close=not head.keep_alive)
            return
        scope, rid, operation_id = route
        method = "PUT" if operation_id is None else "GET"
        if head.method != method:
            self._error(405, 405001, f"{head.method} is not allowed on {url.path}; use {method}")
            return
        if not parse_qs(url.query).get("api-version"):
            self._error(400, 400004, "the api-version query parameter is required")
            return
        service = self.door.service
        token = head.headers.get("Authorization")
        try:
            enrollment, key = service.authenticate(
                scope, rid, token, self.meta.client_chain if token is None else ()
            )
        except Refusal as exc:
            self._outcome(rid, False, exc.message)
            self._error(exc.status, exc.error_code, exc.message, retry_after=exc.retry_after)
            return
        self._outcome(rid, True, None)
        status, answer, retry = _answer(
            service, enrollment, rid, key, self.meta.client_chain,
            "register" if operation_id is None else "status", operation_id, body,
        )  # fmt: skip
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if retry is not None:
            headers["Retry-After"] = str(retry)
        self._send(status, headers, answer, close=not head.keep_alive)

    def _outcome(self, rid: str, success: bool, reason: str | None) -> None:
        if not self.reported:
            self.reported = True
            self.door.connected(self.meta, rid, success=success, reason=reason)

    def _error(
        self, status: int, code: int, message: str, *, close: bool = False,
        retry_after: int | None = None,
    ) -> None:  # fmt: skip
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        body = dps.error_body(code, message, uuid.uuid4().hex, now_iso())
        self._send(status, headers, body, close=close)

    def _send(self, status: int, headers: dict[str, str], body: bytes, *, close: bool) -> None:
        if self.closed:
            return
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {status} {phrase}", f"Date: {email.utils.formatdate(usegmt=True)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        self.stream.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        if close:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
            self.stream.close(linger=_LINGER)
        else:
            self._idle()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
            self.stream.close()


# -- what LocalHub needs -------------------------------------------------------------------------


def door_profile(hub: Any) -> HubTlsProfile:
    """The DPS door's TLS: the hub's profile (versions, suites, certificate kinds, the
    hub's root for device certificates), with a certificate for the DPS host name when
    it is not the hub's."""
    from ..testing.pki import KeyType, PKIDirectory
    from .profile import ServerCredential

    options = hub.options
    name = (options.dps_hostname or options.hostname).lower()
    if name == options.hostname.lower():
        profile: HubTlsProfile = hub.profile
        return profile
    names = list(dict.fromkeys([name, "localhost", "127.0.0.1"]))
    wanted = {"rsa": [KeyType.RSA], "ecdsa": [KeyType.EC], "dual": [KeyType.RSA, KeyType.EC]}
    folder = hub.pki.path / PKIDirectory.SERVERS
    creds = []
    for key_type in wanted[options.certificate]:
        stem = f"dps-{name.replace(':', '_')}-{'ecdsa' if key_type is KeyType.EC else 'rsa'}"
        cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
        if not cert.exists() or not key.exists():
            hub.pki.issuer().server(*names, key_type=key_type).write(folder, stem, force=True)
        creds.append(ServerCredential.from_files(cert, key))
    base: HubTlsProfile = hub.profile
    return replace(base, certificates=tuple(creds))


def describe(hub: Any) -> dict[str, Any]:
    """The ``dps`` part of ``serve --json`` and ``hub.json``."""
    service: ProvisioningService = hub.dps
    door = hub.doors.get("dps")
    return {
        "idScope": service.id_scope,
        "hostname": hub.options.dps_hostname or hub.options.hostname,
        "port": door.port if door is not None else None,
        "enrollments": [e.describe() for e in service.enrollments],
    }
