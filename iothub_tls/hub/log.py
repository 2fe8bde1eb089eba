"""The local hub's connection log, shaped like IoT Hub's *Connections* diagnostic log,
and the counters behind ``serve --stats`` (IoT Hub's "successful connections" metric
split by TLS version and cipher suite).

Handshakes made by ``iothub-tls probe`` (which names itself in its ClientHello, see
:mod:`iothub_tls.diagnostics.clienthello`) carry ``"probe": true`` and are counted apart, not as
device failures. :class:`RotatingLogFile` keeps a log file to a size, with backups."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..policy import iana_name

__all__ = ["ConnectionEvent", "ConnectionLog", "RotatingLogFile", "tls_failure_reason"]


def _now() -> str:
    now = dt.datetime.now(dt.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ConnectionEvent:
    """One connection attempt or disconnection."""

    operation: str  # "deviceConnect" | "deviceDisconnect"
    protocol: str  # "Mqtt" | "Amqp" | "Https"
    result: str  # "Success" | "Failure"
    device_id: str | None = None
    tls_version: str | None = None
    cipher: str | None = None  # OpenSSL name; logged as IANA
    sni: str | None = None
    client_cert_thumbprint: str | None = None
    reason: str | None = None
    caller: str | None = None
    #: the handshake came from ``iothub-tls probe`` (a compliance check, not a device)
    probe: bool = False
    time: str = field(default_factory=_now)

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "category": "Connections",
            "operationName": self.operation,
            "level": "Information" if self.result == "Success" else "Error",
            "deviceId": self.device_id,
            "protocol": self.protocol,
            "tlsVersion": self.tls_version,
            "cipherSuite": iana_name(self.cipher) if self.cipher else None,
            "sni": self.sni,
            "clientCertThumbprint": self.client_cert_thumbprint,
            "result": self.result,
            "reason": self.reason,
            "callerIpAddress": self.caller,
            "probe": self.probe,
        }


def tls_failure_reason(exc: BaseException) -> str:
    """What a failed server-side handshake says, with OpenSSL's reason / alert name."""
    reason = getattr(exc, "reason", None)
    if reason:
        return f"TLS handshake failed: {reason}"
    return f"TLS handshake failed: {exc}"


class ConnectionLog:
    """Collects events, writes one JSON line per event, counts successes.

    :param max_events: how many recent events :attr:`events` keeps in memory (the
        stream gets every one, the counters count every one): a hub that runs for
        weeks, or takes a connection flood, must not keep a record per connection.
    """

    def __init__(self, stream: IO[str] | None = None, *, max_events: int = 1000) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, not {max_events}")
        self._stream = stream
        self._lock = threading.Lock()
        self.events: deque[ConnectionEvent] = deque(maxlen=max_events)
        self.by_tls_version: Counter[str] = Counter()
        self.by_cipher_suite: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        #: handshakes made by ``iothub-tls probe`` (accepted or refused)
        self.probes = 0
        self._connected: Counter[str] = Counter()
        self._listeners: list[Callable[[ConnectionEvent], None]] = []

    def subscribe(self, listener: Callable[[ConnectionEvent], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, event: ConnectionEvent) -> None:
        with self._lock:
            self.events.append(event)
            if event.probe:
                if event.operation == "deviceConnect":
                    self.probes += 1
            elif event.operation == "deviceConnect":
                if event.result == "Success":
                    self.by_tls_version[event.tls_version or "unknown"] += 1
                    self.by_cipher_suite[iana_name(event.cipher or "unknown")] += 1
                    if event.device_id:
                        self._connected[event.device_id] += 1
                else:
                    self.failures[event.protocol] += 1
            elif event.operation == "deviceDisconnect" and event.device_id:
                if self._connected[event.device_id] > 0:
                    self._connected[event.device_id] -= 1
                if not self._connected[event.device_id]:
                    del self._connected[event.device_id]
            if self._stream is not None:
                self._stream.write(json.dumps(event.to_json()) + "\n")
                self._stream.flush()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def is_connected(self, device_id: str) -> bool:
        """Whether ``device_id`` has a connection open now (IoT Hub's connectionState)."""
        with self._lock:
            return self._connected.get(device_id, 0) > 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "successfulConnections": sum(self.by_tls_version.values()),
                "byTlsVersion": dict(self.by_tls_version),
                "byCipherSuite": dict(self.by_cipher_suite),
                "failedConnections": dict(self.failures),
                "probeHandshakes": self.probes,
            }


class RotatingLogFile:
    """A text stream that appends to ``path`` and, when a write would take the file past
    ``max_bytes``, renames it to ``path.1`` (``path.1`` to ``path.2`` ...; the oldest
    beyond ``backups`` is deleted) and starts a new one. ``max_bytes=0`` never rotates.
    A line is never split across two files. Files are created 0600 (the log names
    devices and their addresses)."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 0, backups: int = 0):
        if max_bytes < 0 or backups < 0:
            raise ValueError("max_bytes and backups must be >= 0")
        if max_bytes and not backups:
            raise ValueError(
                "rotating by size needs at least one backup (backups >= 1), or max_bytes=0"
            )
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file = self._open()

    def _open(self) -> IO[str]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(fd).st_size
        return os.fdopen(fd, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        size = len(text.encode("utf-8"))
        with self._lock:
            if self.max_bytes and self._size and self._size + size > self.max_bytes:
                self._rotate()
            self._file.write(text)
            self._size += size
        return len(text)

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = self._open()

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> RotatingLogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
