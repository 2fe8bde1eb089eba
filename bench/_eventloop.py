"""Many paho clients on one event-loop thread: how a gateway can hold devices without a
thread (or a ``select()`` set) per device.

paho's external-loop API: the blocking part of ``connect()`` (TCP, TLS handshake,
sending CONNECT) runs on the caller's thread; afterwards the socket is handed to this
loop, which waits on an ``epoll`` selector (no FD_SETSIZE limit) and calls
``loop_read`` / ``loop_write``. Everything touching a registered client runs on the
loop thread, so paho needs no locking of ours.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import threading
from typing import Any

import iothub_tls as it

from ._pki import HOST, LOCAL_HOST


class EventLoop:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._commands: queue.SimpleQueue[tuple[str, Any, threading.Event]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="gateway-loop", daemon=True)
        self._thread.start()

    def _call(self, what: str, device: Any) -> None:
        done = threading.Event()
        self._commands.put((what, device, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if not done.wait(30):
            raise TimeoutError(f"event loop did not {what} in time")

    def add(self, device: PahoDevice) -> None:
        self._call("add", device)

    def remove(self, device: PahoDevice) -> None:
        self._call("remove", device)

    def _run(self) -> None:
        while not self._stop:
            for key, _events in self._selector.select(0.5):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                key.data.on_readable()
            while True:
                try:
                    what, device, done = self._commands.get_nowait()
                except queue.Empty:
                    break
                if what == "add":
                    self._selector.register(device.client.socket(), selectors.EVENT_READ, device)
                    device.on_readable()  # anything that arrived before registration
                elif what == "remove":
                    sock = device.client.socket()
                    if sock is not None:
                        with contextlib.suppress(KeyError, ValueError):
                            self._selector.unregister(sock)
                    device.disconnect()
                done.set()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(5)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class PahoDevice:
    """One device: a paho client with its own hardened context (like MqttDeviceClient)."""

    def __init__(self, loop: EventLoop, port: int, device_id: str, policy: it.TlsPolicy) -> None:
        import paho.mqtt.client as mqtt

        kwargs: dict[str, Any] = {"client_id": device_id, "clean_session": False}
        if hasattr(mqtt, "CallbackAPIVersion"):
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        else:  # paho-mqtt 1.6
            self.client = mqtt.Client(**kwargs)
        self.client.tls_set_context(it.create_ssl_context(policy))
        self.client.username_pw_set(f"{HOST}/{device_id}/?api-version=2021-04-12", "unused")
        self.client.on_connect = self._connected
        self._connack = threading.Event()
        self.loop = loop
        self.port = port
        self.tls_info: it.TlsInfo | None = None

    def _connected(self, *args: Any) -> None:
        self._connack.set()

    def connect(self) -> None:
        self._connack.clear()
        self.client.connect(LOCAL_HOST, self.port, keepalive=60)
        self.tls_info = it.tls_info(self.client.socket())  # captured in the handshake
        self.loop.add(self)
        if not self._connack.wait(30):
            raise TimeoutError("no CONNACK within 30 s")

    def on_readable(self) -> None:  # loop thread
        self.client.loop_read()
        sock = self.client.socket()
        while sock is not None and getattr(sock, "pending", lambda: 0)():
            self.client.loop_read()
            sock = self.client.socket()

    def disconnect(self) -> None:  # loop thread
        self.client.disconnect()

    def close(self) -> None:
        self.loop.remove(self)
