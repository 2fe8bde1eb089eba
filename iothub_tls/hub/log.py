"""The local hub's connection log, shaped like IoT Hub's *Connections* diagnostic log,
and the counters behind ``serve --stats`` (IoT Hub's "successful connections" metric
split by TLS version and cipher suite)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from ..policy import iana_name

__all__ = ["ConnectionEvent", "ConnectionLog", "tls_failure_reason"]


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
        self._listeners: list[Callable[[ConnectionEvent], None]] = []

    def subscribe(self, listener: Callable[[ConnectionEvent], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, event: ConnectionEvent) -> None:
        with self._lock:
            self.events.append(event)
            if event.operation == "deviceConnect":
                if event.result == "Success":
                    self.by_tls_version[event.tls_version or "unknown"] += 1
                    self.by_cipher_suite[iana_name(event.cipher or "unknown")] += 1
                else:
                    self.failures[event.protocol] += 1
            if self._stream is not None:
                self._stream.write(json.dumps(event.to_json()) + "\n")
                self._stream.flush()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "successfulConnections": sum(self.by_tls_version.values()),
                "byTlsVersion": dict(self.by_tls_version),
                "byCipherSuite": dict(self.by_cipher_suite),
                "failedConnections": dict(self.failures),
            }
