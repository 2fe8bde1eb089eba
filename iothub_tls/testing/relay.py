"""A TCP relay on loopback that reads TLS record headers on the way through, to measure
record sizes and handshake bytes on the wire::

    with TLSServer([leaf]) as server, RecordRelay(server.port) as relay:
        ...  # connect to 127.0.0.1:relay.port instead of server.port
        relay.wait_idle()
        to_server, to_client = relay.logs[0]
        assert to_client.largest_record <= 512 + 256
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

__all__ = ["RecordLog", "RecordRelay"]


@dataclass
class RecordLog:
    """TLS records seen on one direction of a relayed connection."""

    #: (content type, length) of each record (RFC 8446 5.1: 22 handshake, 23 data...)
    records: list[tuple[int, int]] = field(default_factory=list)
    total_bytes: int = 0

    @property
    def largest_record(self) -> int:
        return max((length for _, length in self.records), default=0)

    def bytes_of(self, content_type: int) -> int:
        """Bytes on the wire (headers included) of the records of ``content_type``."""
        return sum(5 + length for t, length in self.records if t == content_type)


class RecordRelay:
    """TCP relay 127.0.0.1:port -> 127.0.0.1:target_port that parses TLS record headers
    (RFC 8446 5.1) in both directions. ``logs[i]`` holds (client->server,
    server->client) for the i-th connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.logs: list[tuple[RecordLog, RecordLog]] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = int(self._sock.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="record-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            up, down = RecordLog(), RecordLog()
            self.logs.append((up, down))
            for src, dst, log in ((client, server, up), (server, client, down)):
                t = threading.Thread(target=self._pump, args=(src, dst, log), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: RecordLog) -> None:
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                log.total_bytes += len(data)
                buf += data
                while len(buf) >= 5:
                    ctype, _ver, length = struct.unpack("!BHH", buf[:5])
                    if len(buf) < 5 + length:
                        break
                    log.records.append((ctype, length))
                    buf = buf[5 + length :]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every relayed connection has ended in both directions."""
        for t in self._threads:
            t.join(timeout)

    def close(self) -> None:
        self._sock.close()
        self.wait_idle(1.0)
        for s in self._sockets:
            s.close()

    def __enter__(self) -> RecordRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
