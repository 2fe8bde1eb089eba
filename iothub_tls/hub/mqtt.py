"""The local hub's MQTT front door: IoT Hub's MQTT 3.1.1 subset for devices.

CONNECT with IoT Hub's client id / username / SAS-token password (or an X.509 client
certificate and no password), telemetry on ``devices/{id}/messages/events/{props}``,
cloud-to-device on ``devices/{id}/messages/devicebound/#`` (QoS 1; PUBACK completes),
the device twin on ``$iothub/twin/...`` and direct methods on ``$iothub/methods/...``.
Anything else closes the connection, as IoT Hub does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import IoTHubTLSError
from ..mqtt import conventions as mqttc
from ..mqtt import packets as codec
from ..policy import iana_name
from .frontdoor import DEFAULT_MAX_CONNECTIONS, HubFrontDoor, TlsMeta
from .log import ConnectionEvent, ConnectionLog
from .loop import HubLoop
from .profile import HubTlsProfile
from .registry import DeviceRegistry, TokenSource
from .state import C2DMessage, HubState, ReceivedMessage, Telemetry
from .stream import TlsStream

__all__ = ["MqttEndpoint"]

# CONNACK return codes (MQTT 3.1.1 3.2.2.3)
_ACCEPTED, _BAD_CREDENTIALS, _NOT_AUTHORIZED, _IDENTIFIER_REJECTED = 0, 4, 5, 2


class _Refused(Exception):
    """The device did something IoT Hub answers by closing the connection."""


@dataclass
class _Session:
    """An authenticated device connection (after its CONNECT was accepted)."""

    connection: _Connection
    meta: TlsMeta
    device_id: str
    module_id: str | None
    auth_type: str
    subscriptions: set[str] = field(default_factory=set)
    inflight: dict[int, C2DMessage] = field(default_factory=dict)
    next_id: int = 0
    closed: bool = False

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.connection.stream.write(data)

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id


class _Connection:
    """One MQTT connection on the hub's loop: CONNECT within ``connect_timeout`` of the
    handshake, then packets until DISCONNECT, the end of the stream, a protocol error or
    the keep-alive (1.5 times the device's, MQTT 3.1.1 section 3.1.2.10) expires."""

    def __init__(self, door: MqttEndpoint, stream: TlsStream, meta: TlsMeta) -> None:
        self.door = door
        self.stream = stream
        self.meta = meta
        self.decoder = codec.Decoder()
        self.session: _Session | None = None
        self.ended = False
        self.loop = asyncio.get_running_loop()
        self.last_seen = self.loop.time()
        self.keepalive: float | None = None
        self._timer: asyncio.TimerHandle | None = self.loop.call_at(
            self.last_seen + door.connect_timeout, self._expired
        )

    # -- the stream's session ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        self.last_seen = self.loop.time()
        try:
            packets = self.decoder.feed(data)
        except codec.MqttProtocolError as exc:
            if self.session is None:
                self._refused(f"no MQTT CONNECT received: {exc}")
            else:
                self.end(f"protocol error: {exc}")
            return
        for packet in packets:
            if self.ended:
                return
            if self.session is None:
                if not isinstance(packet, codec.Connect):
                    self._refused("no MQTT CONNECT received")
                    return
                self._on_connect(packet)
                continue
            if isinstance(packet, codec.Disconnect):
                self.end("client disconnected")
                return
            try:
                self.door._dispatch(self.session, packet)
            except _Refused as exc:
                self.end(str(exc))
                return

    def eof_received(self) -> None:
        if self.session is None:
            self._refused("no MQTT CONNECT received")
        else:
            self.end("connection closed by the device")

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.ended:
            return
        if self.session is None:
            self._refused("no MQTT CONNECT received" + (f": {exc}" if exc else ""))
        else:
            self.end(f"connection lost: {exc}" if exc else "connection closed by the device")

    # -- CONNECT and the end --------------------------------------------------------------------

    def _on_connect(self, connect: codec.Connect) -> None:
        session = self.door._authenticate(self, connect)
        if session is None:
            self._finish()
            self.stream.close()
            return
        self.session = session
        if connect.keepalive:
            self.keepalive = max(connect.keepalive, 1) * 1.5
            self._schedule(self.last_seen + self.keepalive)
        else:
            self._cancel()

    def _refused(self, reason: str, *, abort: bool = False) -> None:
        """The connection ends before a CONNECT was accepted."""
        if self.ended:
            return
        self.door.connected(self.meta, None, success=False, reason=reason)
        self._finish()
        if abort:
            self.stream.abort()
        else:
            self.stream.close()

    def end(self, reason: str, *, abort: bool = False) -> None:
        """End an accepted connection (logged with ``reason``)."""
        if self.ended:
            return
        self._finish()
        assert self.session is not None
        self.door._end(self.session, reason)
        if abort:
            self.stream.abort()
        else:
            self.stream.close()

    def _finish(self) -> None:
        self.ended = True
        self._cancel()

    # -- one timer: the CONNECT deadline, then the keep-alive ------------------------------------

    def _expired(self) -> None:
        self._timer = None
        if self.ended:
            return
        if self.session is None:
            self._refused("no MQTT CONNECT received in time", abort=True)
            return
        assert self.keepalive is not None
        due = self.last_seen + self.keepalive
        if self.loop.time() < due:  # traffic since: look again then
            self._schedule(due)
            return
        self.end("keep-alive expired", abort=True)

    def _schedule(self, when: float) -> None:
        self._cancel()
        self._timer = self.loop.call_at(when, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class MqttEndpoint(HubFrontDoor):
    """IoT Hub's device MQTT endpoint, locally. Devices authenticate against
    ``registry``; its ``hub_host`` is the name they put in their username and SAS
    resource.

    :param connect_timeout: seconds a client has for the TLS handshake, and then for its
        MQTT CONNECT.
    :param max_connections: connections open at once (TLS handshakes in progress and
        connections served); the next is closed before TLS and logged as refused.
    :param hub_loop: the hub's I/O loop (default: one of the door's own).
    """

    protocol = "Mqtt"
    token_source = TokenSource.MQTT_PASSWORD

    def __init__(
        self,
        profile: HubTlsProfile,
        registry: DeviceRegistry,
        state: HubState | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: ConnectionLog | None = None,
        on_connection: Callable[[ConnectionEvent], None] | None = None,
        connect_timeout: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        hub_loop: HubLoop | None = None,
    ) -> None:
        super().__init__(
            profile,
            registry,
            state,
            host=host,
            port=port,
            log=log,
            on_connection=on_connection,
            handshake_timeout=connect_timeout,
            max_connections=max_connections,
            hub_loop=hub_loop,
        )
        self.hostname = registry.hub_host
        self.connect_timeout = connect_timeout
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()  # connected_devices() reads from any thread
        self.state.on_c2d_enqueued(self._c2d_ready)
        self.state.on_desired_patch(self._desired_patched)

    # -- connection ---------------------------------------------------------------------

    def open_session(self, stream: TlsStream, meta: TlsMeta) -> _Connection:
        return _Connection(self, stream, meta)

    def _authenticate(self, connection: _Connection, connect: codec.Connect) -> _Session | None:
        meta = connection.meta
        device_id, _, module_id = connect.client_id.partition("/")
        module = module_id or None

        def refuse(code: int, reason: str) -> None:
            # logged before the device can read the answer (tests and tools read the log
            # as soon as the device has its CONNACK)
            self.connected(meta, device_id or None, success=False, reason=reason)
            connection.stream.write(codec.connack(code))

        if not device_id:
            refuse(_IDENTIFIER_REJECTED, "empty client id (IoT Hub needs the device id)")
            return None
        expected = f"{self.hostname}/{connect.client_id}/"
        if not connect.username or not connect.username.startswith(expected):
            refuse(
                _NOT_AUTHORIZED,
                f"username {connect.username!r} must start with {expected!r} "
                "followed by ?api-version=...",
            )
            return None
        if module:
            refuse(_NOT_AUTHORIZED, "module identities are not supported by the local hub")
            return None
        try:
            if connect.password:
                token = connect.password.decode("utf-8", "replace")
                auth_type = self.authenticate_sas(device_id, token).auth_type
            else:  # X.509: no password; the TLS client certificate identifies the device
                auth_type = self.authenticate_certificate(meta, device_id).auth_type
        except (IoTHubTLSError, LookupError) as exc:
            refuse(_NOT_AUTHORIZED, f"not authorized: {exc}")
            return None
        session = _Session(connection, meta, device_id, module, auth_type)
        with self._sessions_lock:
            previous = self._sessions.get(connect.client_id)
            self._sessions[connect.client_id] = session
        if previous is not None:  # one connection per identity: the new one wins
            previous.connection.end("replaced by a new connection of the same device")
        self.connected(meta, connect.client_id, success=True)
        connection.stream.write(codec.connack(_ACCEPTED))
        return session

    def _end(self, session: _Session, reason: str) -> None:
        client_id = self._client_id(session)
        with self._sessions_lock:
            current = self._sessions.get(client_id) is session
            if current:
                del self._sessions[client_id]
        if current:
            self.state.route_methods(client_id, None)
        session.closed = True
        inflight, session.inflight = session.inflight, {}
        for message in inflight.values():  # never acknowledged: back in the queue
            if message.lock_token:
                with contextlib.suppress(KeyError):
                    self.state.settle_c2d(message.lock_token, "abandon")
        self.disconnected(session.meta, client_id, reason)

    # -- packets ------------------------------------------------------------------------

    def _dispatch(self, session: _Session, packet: codec.Packet) -> None:
        if isinstance(packet, codec.Publish):
            self._on_publish(session, packet)
        elif isinstance(packet, codec.Subscribe):
            self._on_subscribe(session, packet)
        elif isinstance(packet, codec.Unsubscribe):
            session.subscriptions.difference_update(packet.topics)
            session.send(codec.unsuback(packet.packet_id))
        elif isinstance(packet, codec.PubAck):
            message = session.inflight.pop(packet.packet_id, None)
            if message is not None and message.lock_token:
                with contextlib.suppress(KeyError):
                    self.state.settle_c2d(message.lock_token, "complete")
            self._deliver_c2d(session)
        elif isinstance(packet, codec.PingReq):
            session.send(codec.pingresp())
        elif isinstance(packet, codec.Connect):
            raise _Refused("second CONNECT on one connection (MQTT 3.1.0-2)")

    def _prefix(self, session: _Session) -> str:
        if session.module_id:
            return f"devices/{session.device_id}/modules/{session.module_id}/"
        return f"devices/{session.device_id}/"

    def _allowed_filters(self, session: _Session) -> set[str]:
        allowed = {
            mqttc.TWIN_RESPONSE_FILTER,
            mqttc.TWIN_DESIRED_FILTER,
            mqttc.METHODS_FILTER,
        }
        if not session.module_id:  # modules get no C2D over MQTT
            allowed.add(f"devices/{session.device_id}/messages/devicebound/#")
        return allowed

    def _on_subscribe(self, session: _Session, packet: codec.Subscribe) -> None:
        allowed = self._allowed_filters(session)
        granted = []
        for topic, qos in packet.topics:
            if topic in allowed:
                session.subscriptions.add(topic)
                granted.append(min(qos, 1))
            else:
                granted.append(0x80)
        session.send(codec.suback(packet.packet_id, granted))
        if mqttc.METHODS_FILTER in session.subscriptions:
            client_id = self._client_id(session)
            self.state.route_methods(client_id, self._method_route(session))
        self._deliver_c2d(session)

    def _on_publish(self, session: _Session, packet: codec.Publish) -> None:
        topic = packet.topic
        client_id = self._client_id(session)
        telemetry = mqttc.parse_telemetry_topic(topic, session.device_id, session.module_id)
        twin = mqttc.parse_twin_request(topic) if telemetry is None else None
        if telemetry is not None:
            self._accept_mqtt_telemetry(session, packet, *telemetry)
        elif twin is not None and twin.operation == "GET":
            document = self.state.twin(client_id).document()
            self._publish_if(
                session,
                mqttc.TWIN_RESPONSE_FILTER,
                mqttc.twin_response_topic(200, twin.request_id),
                json.dumps(document).encode(),
            )
        elif twin is not None:  # PATCH of the reported properties
            try:
                patch = json.loads(packet.payload or b"{}")
                if not isinstance(patch, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                self._publish_if(
                    session,
                    mqttc.TWIN_RESPONSE_FILTER,
                    mqttc.twin_response_topic(400, twin.request_id),
                    b"",
                )
            else:
                version = self.state.patch_reported(client_id, patch)
                self._publish_if(
                    session,
                    mqttc.TWIN_RESPONSE_FILTER,
                    mqttc.twin_response_topic(204, twin.request_id, version),
                    b"",
                )
        elif (answer := mqttc.parse_method_response(topic)) is not None:
            self.state.method_response(answer.request_id, answer.status, packet.payload)
        else:
            raise _Refused(f"publish to a topic IoT Hub does not accept: {topic!r}")
        if packet.qos == 1 and packet.packet_id is not None:
            session.send(codec.puback(packet.packet_id))

    def _accept_mqtt_telemetry(
        self,
        session: _Session,
        packet: codec.Publish,
        app: dict[str, str | None],
        system: dict[str, str | None],
    ) -> None:
        # IoT Hub keeps a property sent without a value as an empty string
        properties = {name: value or "" for name, value in app.items()}
        if packet.retain:
            properties["mqtt-retain"] = "true"
        meta = session.meta
        self.accept_telemetry(
            ReceivedMessage(
                device_id=session.device_id,
                body=packet.payload,
                properties=properties,
                message_id=system.get("$.mid"),
                correlation_id=system.get("$.cid"),
                content_type=system.get("$.ct"),
                content_encoding=system.get("$.ce"),
                batch=False,
                auth_type=session.auth_type,
                tls_version=meta.tls_version or "",
                cipher=iana_name(meta.cipher or ""),
                time=dt.datetime.now(dt.timezone.utc),
            ),
            Telemetry(
                session.device_id,
                packet.payload,
                properties,
                {name: value or "" for name, value in system.items()},
                "Mqtt",
                session.module_id,
            ),
        )

    @staticmethod
    def _client_id(session: _Session) -> str:
        return session.device_id + (f"/{session.module_id}" if session.module_id else "")

    @staticmethod
    def _publish_if(session: _Session, subscription: str, topic: str, payload: bytes) -> None:
        """Hub -> device publish at QoS 0, only if the device subscribed (IoT Hub drops
        twin responses for devices that did not)."""
        if subscription in session.subscriptions:
            session.send(codec.publish(topic, payload))

    # -- hub -> device (from any thread: handed over to the loop) ------------------------

    def _session_for(self, client_id: str) -> _Session | None:
        with self._sessions_lock:
            return self._sessions.get(client_id)

    def _c2d_ready(self, device_id: str) -> None:
        """A message was queued for ``device_id`` (on any thread)."""
        self.io.post(self._deliver_to, device_id)

    def _deliver_to(self, device_id: str) -> None:
        session = self._session_for(device_id)
        if session is not None:
            self._deliver_c2d(session)

    def _deliver_c2d(self, session: _Session) -> None:
        topic_filter = f"devices/{session.device_id}/messages/devicebound/#"
        if (
            session.closed
            or session.module_id
            or topic_filter not in session.subscriptions
            or session.inflight
        ):
            return  # one in flight at a time keeps order, as IoT Hub does per device
        message = self.state.lock_next_c2d(session.device_id)
        if message is None:
            return
        props: dict[str, str | None] = {
            "$.mid": message.message_id,
            "$.to": f"/devices/{session.device_id}/messages/deviceBound",
            **({"$.cid": message.correlation_id} if message.correlation_id else {}),
            **message.properties,
        }
        topic = mqttc.c2d_topic(session.device_id, props)
        packet_id = session.packet_id()
        session.inflight[packet_id] = message
        session.send(codec.publish(topic, message.payload, qos=1, packet_id=packet_id))

    def _desired_patched(self, client_id: str, patch: dict[str, Any], version: int) -> None:
        """The service changed desired properties (on any thread)."""
        body = json.dumps({**patch, "$version": version}).encode()
        self.io.post(self._push_desired, client_id, version, body)

    def _push_desired(self, client_id: str, version: int, body: bytes) -> None:
        session = self._session_for(client_id)
        if session is not None:
            self._publish_if(
                session, mqttc.TWIN_DESIRED_FILTER, mqttc.desired_patch_topic(version), body
            )

    def _method_route(self, session: _Session) -> Callable[[str, bytes, str], None]:
        """How the hub's state calls a direct method on this session (from any thread)."""

        def route(name: str, payload: bytes, rid: str) -> None:
            self.io.post(self._call_method, session, name, payload, rid)

        return route

    @staticmethod
    def _call_method(session: _Session, name: str, payload: bytes, rid: str) -> None:
        session.send(codec.publish(mqttc.method_request_topic(name, rid), payload))

    def connected_devices(self) -> list[str]:
        with self._sessions_lock:
            return sorted(self._sessions)
