"""HTTPS client CPU per message: the device clients against http.client and urllib3.

``python -m bench.https_cpu`` sends ``--messages`` telemetry messages (default 2,000), one
at a time on one kept-alive TLS connection, with each of:

* ``sync client`` — :class:`iothub_tls.https.HttpsDeviceClient` (a facade over the asyncio
  client on the shared I/O thread: every message crosses threads twice);
* ``asyncio client`` — :class:`iothub_tls.aio.HttpsDeviceClient` on this thread's loop;
* ``http.client`` — ``http.client.HTTPSConnection`` with the same hardened context (the
  baseline: the standard library's blocking HTTP/1.1, no retries, no parsing of IoT Hub's
  answers);
* ``urllib3`` — ``HTTPSConnectionPool`` with the same hardened context (what the HTTPS
  client was built on before).

Every variant sends the same request: the device clients build theirs (IoT Hub's headers,
a SAS token), the baselines send those headers ready-made. What is measured is the CPU time
of this whole process (``time.process_time``: every thread, so the sync client's I/O
thread counts) per message, after 50 warm-up messages. The server is a minimal HTTPS/1.1
server in *another process* that answers every request ``204 No Content``: the local
hub's HTTPS door runs as threads of the process that starts it, so its work (SAS checks,
the connection log) would be counted as the client's, and its speed would change how
often the client's loop wakes. Variants run interleaved, in a rotated order, ``--runs``
times (>= 3); ratios to http.client are taken per run, then their median and range.

A second measure, ``--connections`` (default 300) per run: the client CPU of one resumed
TLS 1.3 connection (TCP connect, resumed handshake, one request and its answer — which
brings the next ticket — and close) with the hardened context against a plain
``ssl.create_default_context()`` trusting the same root and resuming by hand
(``wrap_socket(session=...)``). The hardened context checks the policy after every
handshake and remembers the session itself.

::

    python -m bench.https_cpu                      # 5 runs of 2,000 messages per variant
    python -m bench.https_cpu --runs 3 --messages 1000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/https_cpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import iothub_tls as it
from bench._stats import Interleaved
from iothub_tls._io.loop import shared_loop
from iothub_tls.aio import HttpsDeviceClient as AsyncHttpsDeviceClient
from iothub_tls.auth import ConnectionString, SasTokenProvider
from iothub_tls.https import HttpsDeviceClient, conventions
from iothub_tls.testing.pki import CertificateAuthority, KeyType

HOST = "bench-hub.azure-devices.test"
DEVICE = "bench-https-cpu"
KEY = "YmVuY2gtaHR0cHMtY3B1LWtleS0zMi1ieXRlcy1sb25n"  # base64; the server checks nothing
BODY = b'{"temperature": 21.5, "humidity": 48}'
WARMUP = 50
BASELINE = "http.client"
VARIANTS = ("sync client", "asyncio client", BASELINE, "urllib3")

# -- the server (its own process) --------------------------------------------------------

_RESPONSE = b"HTTP/1.1 204 No Content\r\nServer: bench\r\nDate: %s\r\n\r\n"


def _serve(certfile: str, keyfile: str) -> None:
    """A keep-alive HTTPS/1.1 server answering 204 to every request; prints its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)  # TLS 1.3 tickets on: clients can resume
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(listener.getsockname()[1], flush=True)

    def connection(raw: socket.socket) -> None:
        try:
            tls = context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        buffer = b""
        with tls:
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        chunk = tls.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buffer) < length:
                        chunk = tls.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    buffer = buffer[length:]
                    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
                    tls.sendall(_RESPONSE % date.encode())
            except (OSError, ssl.SSLError):
                return

    # Ends with its parent: stdin closes when the parent goes away.
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=connection, args=(raw,), daemon=True).start()


@contextmanager
def _server(root: CertificateAuthority) -> Iterator[int]:
    leaf = root.intermediate("bench Issuing CA").server(HOST, key_type=KeyType.RSA)
    with tempfile.TemporaryDirectory(prefix="itls-https-cpu-") as folder:
        files = leaf.write(folder, "server")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.https_cpu",
                "--serve",
                str(files.certificate),
                str(files.private_key),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            assert process.stdout is not None
            yield int(process.stdout.readline())
        finally:
            process.kill()
            process.wait()


# -- the variants ------------------------------------------------------------------------


class Bench:
    def __init__(self, root: CertificateAuthority, port: int, messages: int) -> None:
        self.port = port
        self.messages = messages
        self.policy = it.TlsPolicy(roots=it.RootSet.from_pem(root.issued.cert_pem))
        self.root_pem = root.issued.cert_pem.decode()
        self.connection_string = f"HostName={HOST};DeviceId={DEVICE};SharedAccessKey={KEY}"
        # The request the device clients send, ready-made for the baselines.
        request = conventions.events_request(DEVICE, it.Message(BODY))
        token = SasTokenProvider.from_connection_string(
            ConnectionString.parse(self.connection_string)
        )
        self.path = request.path
        self.headers = {
            "Host": HOST,
            "User-Agent": f"iothub-tls/{it.__version__}",
            "Accept": "application/json",
            **request.headers,
            "Authorization": token.token(),
        }

    def _timed(self, send: Callable[[], Any]) -> float:
        for _ in range(WARMUP):
            send()
        began = time.process_time()
        for _ in range(self.messages):
            send()
        return (time.process_time() - began) / self.messages

    def sync_client(self) -> float:
        client = HttpsDeviceClient.from_connection_string(
            self.connection_string, policy=self.policy, host="127.0.0.1", port=self.port
        )
        with client:
            return self._timed(lambda: client.send_telemetry(BODY))

    def asyncio_client(self) -> float:
        async def main() -> float:
            client = AsyncHttpsDeviceClient.from_connection_string(
                self.connection_string, policy=self.policy, host="127.0.0.1", port=self.port
            )
            async with client:
                for _ in range(WARMUP):
                    await client.send_telemetry(BODY)
                began = time.process_time()
                for _ in range(self.messages):
                    await client.send_telemetry(BODY)
                return (time.process_time() - began) / self.messages

        return asyncio.run(main())

    def http_client(self) -> float:
        port = self.port
        connection = http.client.HTTPSConnection(
            HOST, port, context=it.create_ssl_context(self.policy)
        )
        # Dial the loopback server; http.client still sends HOST in SNI and checks it.
        connection._create_connection = (  # type: ignore[attr-defined]
            lambda address, *args, **kwargs: socket.create_connection(
                ("127.0.0.1", port), *args, **kwargs
            )
        )

        def send() -> None:
            connection.request("POST", self.path, BODY, self.headers)
            response = connection.getresponse()
            response.read()
            if response.status != 204:
                raise RuntimeError(f"http.client: HTTP {response.status}")

        try:
            return self._timed(send)
        finally:
            connection.close()

    def urllib3(self) -> float:
        import urllib3

        pool = urllib3.HTTPSConnectionPool(
            "127.0.0.1",
            self.port,
            ssl_context=it.create_ssl_context(self.policy),
            server_hostname=HOST,
            maxsize=1,
            retries=False,
        )

        def send() -> None:
            response = pool.urlopen(
                "POST", self.path, body=BODY, headers=self.headers, retries=False,
                redirect=False, assert_same_host=False,
            )  # fmt: skip
            if response.status != 204:
                raise RuntimeError(f"urllib3: HTTP {response.status}")

        try:
            return self._timed(send)
        finally:
            pool.close()

    # -- resumed TLS 1.3 connections ------------------------------------------------------

    def _request_bytes(self) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in self.headers.items()]
        lines.append(f"Content-Length: {len(BODY)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + BODY

    def resumed(self, context: ssl.SSLContext, connections: int, by_hand: bool) -> dict[str, float]:
        """CPU per resumed connection; ``by_hand``: pass the previous session (a plain
        context); else the hardened context offers the one it remembered."""
        request = self._request_bytes()
        session: ssl.SSLSession | None = None

        def one() -> bool:
            nonlocal session
            raw = socket.create_connection(("127.0.0.1", self.port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(
                raw, server_hostname=HOST, session=session if by_hand else None
            ) as tls:
                tls.sendall(request)
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = tls.recv(4096)
                    if not chunk:
                        raise RuntimeError("the server closed the connection")
                    answer += chunk
                if not answer.startswith(b"HTTP/1.1 204"):
                    raise RuntimeError(f"unexpected answer {answer[:40]!r}")
                if by_hand:
                    session = tls.session  # the ticket that came with the answer
                return bool(tls.session_reused) and tls.version() == "TLSv1.3"

        one()  # a full handshake first: the session to resume
        began = time.process_time()
        reused = sum(one() for _ in range(connections))
        return {"cpu": (time.process_time() - began) / connections, "resumed": reused / connections}


def run(messages: int, runs: int, connections: int) -> dict[str, Any]:
    root = CertificateAuthority.root("bench Root CA")
    shared_loop()  # started (and ticking) before any variant is timed: fair to all
    with _server(root) as port:
        bench = Bench(root, port, messages)
        samplers: dict[str, Callable[[], float]] = {
            "sync client": bench.sync_client,
            "asyncio client": bench.asyncio_client,
            BASELINE: bench.http_client,
            "urllib3": bench.urllib3,
        }
        per_message = Interleaved().run(samplers, rounds=runs, per_round=1, warmup=0)
        hardened = it.create_ssl_context(bench.policy)
        plain = ssl.create_default_context(cadata=bench.root_pem)
        resumption = Interleaved().run(
            {
                "hardened": lambda: bench.resumed(hardened, connections, by_hand=False),
                "plain ssl": lambda: bench.resumed(plain, connections, by_hand=True),
            },
            rounds=runs,
            per_round=1,
            warmup=0,
        )
    return {
        "messages": messages,
        "runs": runs,
        "connections": connections,
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
        "server": "minimal HTTPS/1.1 server answering 204, in its own process",
        "us_per_message": {
            name: per_message.summary(name).as_dict(scale=1e6, digits=1) for name in VARIANTS
        },
        "runs_us": {
            name: [round(v * 1e6, 1) for v in per_message.samples(name)] for name in VARIANTS
        },
        "ratio_to_http_client": {
            name: per_message.ratio(name, BASELINE).as_dict() for name in VARIANTS
        },
        "resumed_tls13": {
            "us_per_connection": {
                name: resumption.summary(name, "cpu").as_dict(scale=1e6, digits=1)
                for name in ("hardened", "plain ssl")
            },
            "resumed_fraction": {
                name: resumption.summary(name, "resumed").median
                for name in ("hardened", "plain ssl")
            },
            "ratio_hardened_to_plain": resumption.ratio("hardened", "plain ssl", "cpu").as_dict(),
        },
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"{result['messages']} messages per run, {result['runs']} runs, one at a time on one "
        f"kept-alive connection (python {result['python']}, {result['openssl']}); "
        f"server: {result['server']}"
    )
    print()
    print("| variant | CPU per message (median) | min - max | ratio to http.client | ratio range |")
    print("|---|---|---|---|---|")
    for name in VARIANTS:
        s = result["us_per_message"][name]
        r = result["ratio_to_http_client"][name]
        print(
            f"| {name} | {s['median']:.1f} us | {s['min']:.1f} - {s['max']:.1f} us | "
            f"{r['value']:.2f}x | {r['min']:.2f} - {r['max']:.2f}x |"
        )
    print()
    print("runs (us per message):", result["runs_us"])
    tls = result["resumed_tls13"]
    print()
    print(f"resumed TLS 1.3 connection (connect, handshake, one request, close), "
          f"{result['connections']} per run:")  # fmt: skip
    for name, s in tls["us_per_connection"].items():
        print(
            f"  {name}: {s['median']:.0f} us (min {s['min']:.0f}, max {s['max']:.0f}), "
            f"resumed {tls['resumed_fraction'][name]:.0%}"
        )
    r = tls["ratio_hardened_to_plain"]
    print(f"  hardened / plain: {r['value']:.2f}x (min {r['min']:.2f}x, max {r['max']:.2f}x)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.https_cpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (2000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per variant (>= 3)")
    parser.add_argument("--connections", type=int, default=300, help="resumed connections per run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--serve", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(*args.serve)
        return 0
    if args.runs < 3 or args.messages < 1 or args.connections < 1:
        parser.error("--runs must be at least 3, --messages and --connections at least 1")
    result = run(args.messages, args.runs, args.connections)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
