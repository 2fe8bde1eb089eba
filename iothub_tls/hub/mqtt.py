"""The local hub's MQTT front door: IoT Hub's MQTT 3.1.1 subset for devices.

CONNECT with IoT Hub's client id / username / SAS-token password (or an X.509 client
certificate and no password), telemetry on ``devices/{id}/messages/events/{props}``,
cloud-to-device on ``devices/{id}/messages/devicebound/#`` (QoS 1; PUBACK completes),
the device twin on ``$iothub/twin/...`` and direct methods on ``$iothub/methods/...``.
Anything else closes the connection, as IoT Hub does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import ssl
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
from .profile import HubTlsProfile
from .registry import DeviceRegistry, TokenSource
from .state import C2DMessage, HubState, ReceivedMessage, Telemetry

__all__ = ["MqttEndpoint"]

# CONNACK return codes (MQTT 3.1.1 3.2.2.3)
_ACCEPTED, _BAD_CREDENTIALS, _NOT_AUTHORIZED, _IDENTIFIER_REJECTED = 0, 4, 5, 2


class _Refused(Exception):
    """The device did something IoT Hub answers by closing the connection."""


@dataclass
class _Session:
    tls: ssl.SSLSocket
    meta: TlsMeta
    device_id: str
    module_id: str | None
    auth_type: str
    subscriptions: set[str] = field(default_factory=set)
    inflight: dict[int, C2DMessage] = field(default_factory=dict)
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    next_id: int = 0
    closed: bool = False

    def send(self, data: bytes) -> None:
        with self.write_lock:
            if not self.closed:
                self.tls.sendall(data)

    def packet_id(self) -> int:
        with self.write_lock:
            self.next_id = self.next_id % 65535 + 1
            return self.next_id


class MqttEndpoint(HubFrontDoor):
    """IoT Hub's device MQTT endpoint, locally. Devices authenticate against
    ``registry``; its ``hub_host`` is the name they put in their username and SAS
    resource.

    :param connect_timeout: seconds a client has for the TLS handshake, and then for its
        MQTT CONNECT.
    :param max_connections: connections open at once (TLS handshakes in progress and
        connections served); the next is closed before TLS and logged as refused.
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
        )
        self.hostname = registry.hub_host
        self.connect_timeout = connect_timeout
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self.state.on_c2d_enqueued(self._c2d_ready)
        self.state.on_desired_patch(self._desired_patched)

    # -- connection ---------------------------------------------------------------------

    def serve_connection(self, tls: ssl.SSLSocket, meta: TlsMeta) -> None:
        decoder = codec.Decoder()
        tls.settimeout(self.connect_timeout)
        try:
            first = self._read_packets(tls, decoder)
        except (codec.MqttProtocolError, OSError) as exc:
            reason = "no MQTT CONNECT received" + (
                " in time" if isinstance(exc, TimeoutError) else f": {exc}"
            )
            self.connected(meta, None, success=False, reason=reason)
            return
        if not first or not isinstance(first[0], codec.Connect):
            self.connected(meta, None, success=False, reason="no MQTT CONNECT received")
            return
        connect = first[0]
        session = self._authenticate(tls, meta, connect)
        if session is None:
            return
        reason = "client disconnected"
        try:
            tls.settimeout(max(connect.keepalive, 1) * 1.5 if connect.keepalive else None)
            pending = first[1:]
            while True:
                for packet in pending:
                    if isinstance(packet, codec.Disconnect):
                        return
                    self._dispatch(session, packet)
                pending = self._read_packets(tls, decoder)
                if not pending:
                    reason = "connection closed by the device"
                    return
        except TimeoutError:
            reason = "keep-alive expired"
        except codec.MqttProtocolError as exc:
            reason = f"protocol error: {exc}"
        except _Refused as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._end(session, reason)

    @staticmethod
    def _read_packets(tls: ssl.SSLSocket, decoder: codec.Decoder) -> list[codec.Packet]:
        while True:
            data = tls.recv(65536)
            if not data:
                return []
            packets = decoder.feed(data)
            if packets:
                return packets

    def _authenticate(
        self, tls: ssl.SSLSocket, meta: TlsMeta, connect: codec.Connect
    ) -> _Session | None:
        device_id, _, module_id = connect.client_id.partition("/")
        module = module_id or None

        def refuse(code: int, reason: str) -> None:
            with contextlib.suppress(OSError):
                tls.sendall(codec.connack(code))
            self.connected(meta, device_id or None, success=False, reason=reason)

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
        session = _Session(tls, meta, device_id, module, auth_type)
        with self._sessions_lock:
            previous = self._sessions.get(connect.client_id)
            self._sessions[connect.client_id] = session
        if previous is not None:  # one connection per identity: the new one wins
            previous.closed = True
            with contextlib.suppress(OSError):
                previous.tls.shutdown(socket.SHUT_RDWR)
        tls.sendall(codec.connack(_ACCEPTED))
        self.connected(meta, connect.client_id, success=True)
        return session

    def _end(self, session: _Session, reason: str) -> None:
        client_id = self._client_id(session)
        with self._sessions_lock:
            if self._sessions.get(client_id) is session:
                del self._sessions[client_id]
                self.state.route_methods(client_id, None)
        session.closed = True
        for message in session.inflight.values():  # never acknowledged: back in the queue
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
            self.state.route_methods(
                client_id, lambda name, payload, rid: self._call_method(session, name, payload, rid)
            )
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

    # -- hub -> device ------------------------------------------------------------------

    def _session_for(self, client_id: str) -> _Session | None:
        with self._sessions_lock:
            return self._sessions.get(client_id)

    def _c2d_ready(self, device_id: str) -> None:
        session = self._session_for(device_id)
        if session is not None:
            with contextlib.suppress(OSError):
                self._deliver_c2d(session)

    def _deliver_c2d(self, session: _Session) -> None:
        topic_filter = f"devices/{session.device_id}/messages/devicebound/#"
        if session.module_id or topic_filter not in session.subscriptions or session.inflight:
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
        session = self._session_for(client_id)
        if session is None:
            return
        body = json.dumps({**patch, "$version": version}).encode()
        with contextlib.suppress(OSError):
            self._publish_if(
                session, mqttc.TWIN_DESIRED_FILTER, mqttc.desired_patch_topic(version), body
            )

    @staticmethod
    def _call_method(session: _Session, name: str, payload: bytes, rid: str) -> None:
        session.send(codec.publish(mqttc.method_request_topic(name, rid), payload))

    def connected_devices(self) -> list[str]:
        with self._sessions_lock:
            return sorted(self._sessions)
