"""MQTT devices for the benchmarks: the product's client, and raw paho as the baseline.

:func:`device` (and :func:`aio_device` for the asyncio client) is the one place the
benchmarks make an ``MqttDeviceClient``; every MQTT
benchmark (resumption, throughput, gateway) goes through it. :class:`RawPahoDevice` is
what an application would write with paho-mqtt alone and the same hardened context.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import socket
import threading
from typing import Any

import iothub_tls as it

from ._pki import HOST, LOCAL_HOST

#: Mosquitto runs anonymous: the SAS token is sent and ignored, as a password would be.
DEVICE_KEY = base64.b64encode(b"iothub-tls-bench-device-key-32b!").decode()


def telemetry_topic(device_id: str) -> str:
    return f"devices/{device_id}/messages/events/"


def device(port: int, device_id: str, policy: it.TlsPolicy) -> Any:
    """An :class:`iothub_tls.mqtt.MqttDeviceClient` for the local broker on ``port``:
    TLS names and verifies the hub (``HOST``) while TCP dials 127.0.0.1."""
    from iothub_tls.mqtt import MqttDeviceClient

    return MqttDeviceClient.from_symmetric_key(
        HOST,
        device_id,
        DEVICE_KEY,
        policy=policy,
        host="127.0.0.1",
        port=port,
    )


def aio_device(port: int, device_id: str, policy: it.TlsPolicy) -> Any:
    """The asyncio :class:`iothub_tls.aio.MqttDeviceClient` for the same broker (made
    on the event loop that will run it)."""
    from iothub_tls.aio import MqttDeviceClient

    return MqttDeviceClient.from_symmetric_key(
        HOST,
        device_id,
        DEVICE_KEY,
        policy=policy,
        host="127.0.0.1",
        port=port,
    )


class RawPahoDevice:
    """paho-mqtt with ``tls_set_context(create_ssl_context(policy))`` and paho's own
    network thread (``loop_start``): the baseline for the client's overhead."""

    def __init__(self, port: int, device_id: str, policy: it.TlsPolicy) -> None:
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        kwargs: dict[str, Any] = {
            "client_id": device_id,
            "clean_session": False,
            "protocol": mqtt.MQTTv311,
        }
        if hasattr(mqtt, "CallbackAPIVersion"):
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        else:  # paho-mqtt 1.6
            self.client = mqtt.Client(**kwargs)
        self.client.tls_set_context(it.create_ssl_context(policy))
        self.client.username_pw_set(f"{HOST}/{device_id}/?api-version=2021-04-12", "unused")
        self.port = port
        self.topic = telemetry_topic(device_id)
        self._connected = threading.Event()
        self.client.on_connect = lambda *args: self._connected.set()
        # The device client turns Nagle off on its sockets; so does the baseline, so the
        # comparison is of the clients, not of TCP options.
        self.client.on_socket_open = _no_delay

    def connect(self) -> None:
        # paho sends the dialled name in SNI: the bench certificates also name localhost.
        self.client.connect(LOCAL_HOST, self.port, keepalive=60)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("no CONNACK from the broker within 10 s")

    def publish(self, payload: bytes) -> Any:
        return self.client.publish(self.topic, payload, qos=1)

    def send_telemetry(self, payload: bytes) -> None:
        self.publish(payload).wait_for_publish(30)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def wait_all(handles: list[Any], timeout: float = 60.0) -> None:
    """Wait for QoS 1 acknowledgements: futures (client) or MQTTMessageInfo (paho)."""
    futures = [h for h in handles if isinstance(h, concurrent.futures.Future)]
    if futures:
        done, pending = concurrent.futures.wait(futures, timeout=timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} messages not acknowledged in {timeout} s")
        for f in done:
            f.result()
    for h in handles:
        if not isinstance(h, concurrent.futures.Future):
            h.wait_for_publish(timeout)
            if not h.is_published():
                raise TimeoutError("a message was not acknowledged")
