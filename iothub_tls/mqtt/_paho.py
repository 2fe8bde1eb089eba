"""paho-mqtt 1.6.x and 2.x behind one small adapter, configured for IoT Hub.

The MQTT client drives paho itself (``loop_read`` / ``loop_write`` / ``loop_misc`` from
its own network thread, never ``loop_start``), so this module only makes paho
importable, dials the right address, makes paho queue what it sends, and normalises the
callbacks whose signatures differ between 1.6 (positional ints and dicts) and 2.x
(``ReasonCode`` objects).

Queued writes: without its own thread and without socket-write callbacks, paho writes
each packet the moment it makes it, also from inside its read loop, so every PUBACK that
frees a place in the in-flight window sends one PUBLISH on its own and the broker wakes
once per message. With the callbacks installed (public API, same in 1.6 and 2.x) paho
only queues packets; the network thread writes the queue once per round, after reading.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from ..errors import ConnectionFailedError, IncompatibleDependencyError, MissingDependencyError
from ..tls.context import HardenedSSLContext
from .conventions import WEBSOCKET_PATH, MqttOptions, connack_code

#: paho-mqtt versions the client is tested with (CI runs both).
TESTED_PAHO_VERSIONS = ("1.6.1", "2.2.0")
_PAHO_REMEDY = "pip install 'paho-mqtt>=1.6,<3'"

#: paho's own log lines (every packet at DEBUG) go to this logger.
PAHO_LOGGER = "iothub_tls.mqtt.paho"


def import_paho() -> Any:
    """``paho.mqtt.client``, or a MissingDependencyError / IncompatibleDependencyError
    that says what to install."""
    try:
        import paho.mqtt
        import paho.mqtt.client as paho_client
    except ImportError as exc:
        raise MissingDependencyError("mqtt", "paho-mqtt") from exc
    version = str(getattr(paho.mqtt, "__version__", "unknown"))
    major, _, rest = version.partition(".")
    minor = rest.partition(".")[0]
    supported = major == "2" or (major == "1" and minor.isdigit() and int(minor) >= 6)
    if not supported:
        raise IncompatibleDependencyError(
            "paho-mqtt", version, TESTED_PAHO_VERSIONS, "the MQTT client", _PAHO_REMEDY
        )
    for needed in ("_create_socket_connection", "on_socket_register_write", "want_write"):
        if getattr(paho_client.Client, needed, None) is None:
            raise IncompatibleDependencyError(
                "paho-mqtt",
                f"{version} (without Client.{needed})",
                TESTED_PAHO_VERSIONS,
                "the MQTT client",
                _PAHO_REMEDY,
            )
    return paho_client


_CLIENT_CLASSES: dict[int, Any] = {}


def _client_class(mqtt: Any) -> Any:
    """A paho ``Client`` subclass that opens its TCP connection to our address.

    paho connects to the host it sends as SNI. Overriding its TCP step lets the client
    dial another address (a test broker, a local port forward) while TLS still names
    and verifies the hub. paho 1.6 times the TLS handshake with the keep-alive; the
    subclass swaps in the handshake timeout until the socket is open.
    """
    key = id(mqtt)
    if key in _CLIENT_CLASSES:
        return _CLIENT_CLASSES[key]
    base = mqtt.Client

    class _Client(base):  # type: ignore[misc,valid-type]
        _itls_address: tuple[str, int]
        _itls_connect_timeout: float
        _itls_handshake_timeout: float
        _itls_keepalive: int | None = None
        _itls_swap_keepalive = False

        def _create_socket_connection(self) -> socket.socket:
            host, port = self._itls_address
            try:
                sock = socket.create_connection((host, port), timeout=self._itls_connect_timeout)
            except OSError as exc:
                raise ConnectionFailedError(
                    f"could not open a TCP connection to {host}:{port}: {exc}"
                ) from exc
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._itls_swap_keepalive:
                self._itls_keepalive = getattr(self, "_keepalive")  # noqa: B009
                self._keepalive = self._itls_handshake_timeout
            return sock

        def _itls_restore_keepalive(self) -> None:
            if self._itls_keepalive is not None:
                self._keepalive = self._itls_keepalive
                self._itls_keepalive = None

    _CLIENT_CLASSES[key] = _Client
    return _Client


#: paho's ``on_publish`` signature: ``(client, userdata, mid)`` in 1.6, plus
#: ``(reason_code, properties)`` in 2.x.
PublishCallback = Callable[..., None]


class Paho:
    """One paho client for one device, configured for IoT Hub.

    ``client`` is the paho client itself: the network thread calls its ``publish``,
    ``subscribe``, ``loop_read``, ``loop_write``, ``loop_misc`` and ``socket`` directly.
    ``on_publish`` is installed as paho's callback unchanged (it is called once per
    acknowledged message, so it gets no adapter layer); the others are normalised.

    paho queues every packet it makes (``publish``, ``subscribe``, ``disconnect``,
    ``loop_misc``'s PINGREQ, ``loop_read``'s PUBACKs and released PUBLISHes) and writes
    nothing by itself: whoever drives it calls ``loop_write`` while ``want_write()``.
    """

    def __init__(
        self,
        *,
        client_id: str,
        websockets: bool,
        address: tuple[str, int],
        context: HardenedSSLContext,
        options: MqttOptions,
        on_connack: Callable[[int, bool], None],
        on_suback: Callable[[int, list[int]], None],
        on_publish: PublishCallback,
        on_message: Callable[[str, bytes], None],
    ) -> None:
        mqtt = import_paho()
        self.mqtt = mqtt
        self.v2 = hasattr(mqtt, "CallbackAPIVersion")
        kwargs: dict[str, Any] = {
            "client_id": client_id,
            "clean_session": False,  # keep subscriptions and queued C2D across connections
            "protocol": mqtt.MQTTv311,
            "transport": "websockets" if websockets else "tcp",
            "reconnect_on_failure": False,  # we reconnect; never downgrade to MQTT 3.1
        }
        cls = _client_class(mqtt)
        client = cls(mqtt.CallbackAPIVersion.VERSION2, **kwargs) if self.v2 else cls(**kwargs)
        client._itls_address = address
        client._itls_connect_timeout = options.connect_timeout
        client._itls_handshake_timeout = options.handshake_timeout
        if self.v2:
            client.connect_timeout = options.handshake_timeout  # TLS and WebSocket upgrade
        else:
            client._itls_swap_keepalive = True
        client.suppress_exceptions = True
        client.enable_logger(logging.getLogger(PAHO_LOGGER))
        # The one place TLS comes from: the hardened context, unchanged.
        client.tls_set_context(context)
        if websockets:
            client.ws_set_options(path=WEBSOCKET_PATH)
        self.client = client
        self._on_connack = on_connack
        self._on_suback = on_suback
        self._on_message = on_message
        client.on_connect = self._connect_cb
        client.on_subscribe = self._subscribe_cb
        client.on_publish = on_publish
        client.on_message = self._message_cb
        client.on_socket_open = self._socket_open_cb
        # With these set, paho queues packets instead of writing them at once.
        client.on_socket_register_write = self._write_interest_cb
        client.on_socket_unregister_write = self._write_interest_cb
        self.success = int(mqtt.MQTT_ERR_SUCCESS)
        self.no_connection = int(mqtt.MQTT_ERR_NO_CONN)
        self.last_error: str | None = None

    # paho callbacks (network thread) -------------------------------------------------

    def _connect_cb(self, _client: Any, _userdata: Any, flags: Any, rc: Any, *_: Any) -> None:
        if isinstance(flags, dict):
            present = bool(flags.get("session present"))
        else:
            present = bool(getattr(flags, "session_present", False))
        self._on_connack(connack_code(rc), present)

    def _subscribe_cb(self, _client: Any, _userdata: Any, mid: int, granted: Any, *_: Any) -> None:
        self._on_suback(mid, [int(getattr(g, "value", g)) for g in granted])

    def _message_cb(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._on_message(message.topic, bytes(message.payload))

    def _log_cb(self, _client: Any, _userdata: Any, level: int, text: str) -> None:
        # paho reports socket errors (e.g. a TLS alert after the handshake) only here.
        if level == self.mqtt.MQTT_LOG_ERR:
            self.last_error = text

    def _socket_open_cb(self, client: Any, *_: Any) -> None:
        client._itls_restore_keepalive()

    @staticmethod
    def _write_interest_cb(_client: Any, _userdata: Any, _sock: Any) -> None:
        # Installed for its effect on paho (queue, do not write); the network thread
        # asks want_write() itself, before each wait and after each round.
        return None

    # driving it ------------------------------------------------------------------------

    def watch_errors(self, enabled: bool) -> None:
        """Record paho's error log lines in :attr:`last_error` (while connecting only:
        paho formats every log line for an ``on_log`` callback, two per message)."""
        if enabled:
            self.last_error = None
        self.client.on_log = self._log_cb if enabled else None

    def connect(self, host: str, port: int, keepalive: int) -> None:
        try:
            self.client.connect(host, port, keepalive=keepalive)
        finally:
            self.client._itls_restore_keepalive()

    def socket(self) -> Any:
        return self.client.socket()

    def ssl_socket(self) -> ssl.SSLSocket | None:
        """The TLS socket, also when paho wrapped it in its WebSocket framing."""
        sock = self.socket()
        inner = getattr(sock, "_socket", None)
        for candidate in (sock, inner):
            if isinstance(candidate, ssl.SSLSocket):
                return candidate
        return None

    def force_close(self) -> None:
        closer = getattr(self.client, "_sock_close", None)
        if callable(closer):
            with contextlib.suppress(Exception):
                closer()
