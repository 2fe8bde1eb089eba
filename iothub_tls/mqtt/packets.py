"""MQTT 3.1.1 packets, sans I/O, both directions: the device client and the local hub
encode and decode with this one module, so they agree on the wire by construction.

Only the subset IoT Hub implements: CONNECT/CONNACK, PUBLISH (QoS 0 and 1), PUBACK,
SUBSCRIBE/SUBACK, UNSUBSCRIBE/UNSUBACK, PINGREQ/PINGRESP, DISCONNECT. QoS 2 is a
protocol error, as on IoT Hub. References are to the OASIS MQTT 3.1.1 standard.

:class:`Decoder` takes the packets a *server* receives (``Decoder()``) or those a
*client* receives (``Decoder(from_server=True)``); a packet the other side may not send
is a :class:`MqttProtocolError`.
"""

from __future__ import annotations

import struct

from .._record import Record

__all__ = [
    "ConnAck",
    "Connect",
    "Decoder",
    "Disconnect",
    "MqttProtocolError",
    "Packet",
    "PingReq",
    "PingResp",
    "PubAck",
    "Publish",
    "SubAck",
    "Subscribe",
    "UnsubAck",
    "Unsubscribe",
    "connack",
    "connect",
    "disconnect",
    "pingreq",
    "pingresp",
    "puback",
    "publish",
    "suback",
    "subscribe",
    "unsuback",
]

# packet types (3.1.1 section 2.2.1)
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

#: IoT Hub's device-to-cloud message limit is 256 KB; allow the topic on top of it.
MAX_PACKET = 256 * 1024 + 64 * 1024


class MqttProtocolError(ValueError):
    """The peer sent something that is not valid MQTT 3.1.1 (or not IoT Hub's subset)."""


_set = object.__setattr__


class Connect(Record):
    _fields = (
        "client_id",
        "username",
        "password",
        "keepalive",
        "clean_session",
        "protocol_level",
    )
    __slots__ = _fields
    client_id: str
    username: str | None
    password: bytes | None
    keepalive: int
    clean_session: bool
    protocol_level: int

    def __init__(
        self,
        client_id: str,
        username: str | None,
        password: bytes | None,
        keepalive: int,
        clean_session: bool,
        protocol_level: int,
    ) -> None:
        _set(self, "client_id", client_id)
        _set(self, "username", username)
        _set(self, "password", password)
        _set(self, "keepalive", keepalive)
        _set(self, "clean_session", clean_session)
        _set(self, "protocol_level", protocol_level)


class Publish(Record):
    _fields = ("topic", "payload", "qos", "packet_id", "retain", "dup")
    __slots__ = _fields
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    retain: bool
    dup: bool

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        packet_id: int | None = None,
        retain: bool = False,
        dup: bool = False,
    ) -> None:
        _set(self, "topic", topic)
        _set(self, "payload", payload)
        _set(self, "qos", qos)
        _set(self, "packet_id", packet_id)
        _set(self, "retain", retain)
        _set(self, "dup", dup)


class PubAck(Record):
    _fields = ("packet_id",)
    __slots__ = _fields
    packet_id: int

    def __init__(self, packet_id: int) -> None:
        _set(self, "packet_id", packet_id)


class Subscribe(Record):
    _fields = ("packet_id", "topics")
    __slots__ = _fields
    packet_id: int
    topics: tuple[tuple[str, int], ...]

    def __init__(self, packet_id: int, topics: tuple[tuple[str, int], ...]) -> None:
        _set(self, "packet_id", packet_id)
        _set(self, "topics", topics)


class Unsubscribe(Record):
    _fields = ("packet_id", "topics")
    __slots__ = _fields
    packet_id: int
    topics: tuple[str, ...]

    def __init__(self, packet_id: int, topics: tuple[str, ...]) -> None:
        _set(self, "packet_id", packet_id)
        _set(self, "topics", topics)


class PingReq(Record):
    __slots__ = ()


class Disconnect(Record):
    __slots__ = ()


class ConnAck(Record):
    _fields = ("return_code", "session_present")
    __slots__ = _fields
    return_code: int
    session_present: bool

    def __init__(self, return_code: int, session_present: bool) -> None:
        _set(self, "return_code", return_code)
        _set(self, "session_present", session_present)


class SubAck(Record):
    _fields = ("packet_id", "granted")
    __slots__ = _fields
    packet_id: int
    granted: tuple[int, ...]

    def __init__(self, packet_id: int, granted: tuple[int, ...]) -> None:
        _set(self, "packet_id", packet_id)
        _set(self, "granted", granted)


class UnsubAck(Record):
    _fields = ("packet_id",)
    __slots__ = _fields
    packet_id: int

    def __init__(self, packet_id: int) -> None:
        _set(self, "packet_id", packet_id)


class PingResp(Record):
    __slots__ = ()


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
)

# what each side may receive (MQTT 3.1.1 section 2.2.1, "direction of flow")
_FROM_CLIENT = frozenset({1, 3, 4, 8, 10, 12, 14})
_FROM_SERVER = frozenset({2, 3, 4, 9, 11, 13})


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MqttProtocolError("packet shorter than its fields")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MqttProtocolError("string is not UTF-8 (MQTT 1.5.3)") from exc

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def _parse(kind: int, flags: int, body: bytes) -> Packet:
    if kind == PUBACK:  # first: one arrives for every message a device sends
        if len(body) < 2:
            raise MqttProtocolError("packet shorter than its fields")
        return PubAck((body[0] << 8) | body[1])
    r = _Reader(body)
    if kind == CONNECT:
        protocol = r.text()
        level = r.u8()
        if protocol != "MQTT" or level != 4:
            raise MqttProtocolError(
                f"unsupported protocol {protocol!r} level {level}: IoT Hub speaks MQTT 3.1.1"
            )
        cflags = r.u8()
        keepalive = r.u16()
        client_id = r.text()
        if cflags & 0x04:  # will: read and ignore (IoT Hub does not document wills)
            r.text()
            r.binary()
        username = r.text() if cflags & 0x80 else None
        password = r.binary() if cflags & 0x40 else None
        return Connect(client_id, username, password, keepalive, bool(cflags & 0x02), level)
    if kind == PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 2:
            raise MqttProtocolError("QoS 2 is not supported by IoT Hub")
        if qos == 3:
            raise MqttProtocolError("invalid QoS 3")
        topic = r.text()
        packet_id = r.u16() if qos else None
        return Publish(topic, r.rest(), qos, packet_id, bool(flags & 0x01), bool(flags & 0x08))
    if kind == SUBSCRIBE:
        if flags != 0x02:
            raise MqttProtocolError("SUBSCRIBE with wrong fixed-header flags (MQTT 3.8.1)")
        packet_id = r.u16()
        topics: list[tuple[str, int]] = []
        while not r.done:
            topics.append((r.text(), r.u8() & 0x03))
        if not topics:
            raise MqttProtocolError("SUBSCRIBE without topics")
        return Subscribe(packet_id, tuple(topics))
    if kind == UNSUBSCRIBE:
        packet_id = r.u16()
        names: list[str] = []
        while not r.done:
            names.append(r.text())
        return Unsubscribe(packet_id, tuple(names))
    if kind == PINGREQ:
        return PingReq()
    if kind == DISCONNECT:
        return Disconnect()
    if kind == CONNACK:
        ack_flags, code = r.u8(), r.u8()
        return ConnAck(code, bool(ack_flags & 0x01))
    if kind == SUBACK:
        packet_id = r.u16()
        return SubAck(packet_id, tuple(r.rest()))
    if kind == UNSUBACK:
        return UnsubAck(r.u16())
    if kind == PINGRESP:
        return PingResp()
    raise MqttProtocolError(f"unknown packet type {kind}")


class Decoder:
    """Incremental decoder: ``feed`` bytes, get whole packets back. By default it reads
    what a server receives; ``from_server=True`` reads what a client receives."""

    def __init__(self, max_packet: int = MAX_PACKET, from_server: bool = False) -> None:
        self.max_packet = max_packet
        self.from_server = from_server
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf
        buf += data
        packets: list[Packet] = []
        size = len(buf)
        start = 0  # where the next packet begins; what is before it is consumed
        try:
            while size - start >= 2:
                header = self._header(buf, start, size)
                if header is None:
                    break
                kind, flags, length, offset = header
                end = offset + length
                if size < end:
                    break
                body = bytes(buf[offset:end])
                start = end
                if kind not in (_FROM_SERVER if self.from_server else _FROM_CLIENT):
                    sender = "a server" if self.from_server else "a client"
                    raise MqttProtocolError(f"unexpected packet type {kind} from {sender}")
                packets.append(_parse(kind, flags, body))
        finally:
            if start:
                del buf[:start]
        return packets

    def _header(self, buf: bytearray, start: int, size: int) -> tuple[int, int, int, int] | None:
        """(type, flags, remaining length, where the body begins) of the packet at
        ``start``; None while its header is incomplete."""
        length, multiplier = 0, 1
        for i in range(start + 1, start + 5):
            if i >= size:
                return None
            byte = buf[i]
            length += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                if length > self.max_packet:
                    raise MqttProtocolError(
                        f"packet of {length} bytes exceeds the {self.max_packet} byte limit"
                    )
                first = buf[start]
                return first >> 4, first & 0x0F, length, i + 1
            multiplier *= 128
        raise MqttProtocolError("malformed remaining length (MQTT 2.2.3)")


def _frame(first: int, *parts: bytes) -> bytes:
    """The fixed header (type and flags, remaining length: MQTT 2.2.3) and the body."""
    n = sum(len(part) for part in parts)
    if n < 0x80:  # (most packets: one length byte)
        header = bytes((first, n))
    else:
        out = bytearray([first])
        while True:
            byte = n % 128
            n //= 128
            out.append(byte | (0x80 if n else 0))
            if not n:
                break
        header = bytes(out)
    return b"".join((header, *parts))


_ID = struct.Struct("!H")  # packet ids and string lengths: two bytes, big-endian


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _ID.pack(len(raw)) + raw


def connack(return_code: int, session_present: bool = False) -> bytes:
    return _frame(CONNACK << 4, bytes([1 if session_present else 0, return_code]))


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int | None = None) -> bytes:
    if qos:
        return _frame((PUBLISH << 4) | (qos << 1), _text(topic), _ID.pack(packet_id or 0), payload)
    return _frame(PUBLISH << 4, _text(topic), payload)


def puback(packet_id: int) -> bytes:
    return _frame(PUBACK << 4, struct.pack("!H", packet_id))


def suback(packet_id: int, granted: list[int]) -> bytes:
    return _frame(SUBACK << 4, struct.pack("!H", packet_id) + bytes(granted))


def unsuback(packet_id: int) -> bytes:
    return _frame(UNSUBACK << 4, struct.pack("!H", packet_id))


def pingresp() -> bytes:
    return _frame(PINGRESP << 4, b"")


def connect(
    client_id: str,
    *,
    username: str | None = None,
    password: bytes | None = None,
    keepalive: int = 60,
    clean_session: bool = False,
) -> bytes:
    """CONNECT for MQTT 3.1.1 (protocol level 4). IoT Hub keeps a device's session (its
    QoS 1 cloud-to-device messages) when ``clean_session`` is False."""
    flags = 0x02 if clean_session else 0
    payload = _text(client_id)
    if username is not None:
        flags |= 0x80
        payload += _text(username)
    if password is not None:
        flags |= 0x40
        payload += struct.pack("!H", len(password)) + password
    header = _text("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    return _frame(CONNECT << 4, header + payload)


def subscribe(packet_id: int, topics: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_text(t) + bytes([q]) for t, q in topics)
    return _frame((SUBSCRIBE << 4) | 0x02, body)


def pingreq() -> bytes:
    return _PINGREQ


def disconnect() -> bytes:
    return _DISCONNECT


_PINGREQ = _frame(PINGREQ << 4, b"")
_DISCONNECT = _frame(DISCONNECT << 4, b"")
