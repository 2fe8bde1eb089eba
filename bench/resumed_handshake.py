"""A resumed TLS 1.3 connection: the device's CPU, the hardened context vs plain ``ssl``.

What a reconnection costs a device once it holds a session ticket. A TLS 1.3 server in
its own process (so only the client's work is counted; tickets on, as IoT Hub sends
them) takes connections that each go: TCP connect, a handshake resuming the previous
session, the server's greeting read (the new ticket arrives just before it), the session
kept for the next connection. Variants:

* ``plain ssl``: ``ssl.create_default_context(cadata=roots)``; the application keeps
  ``tls.session`` and passes it as ``wrap_socket(session=...)``, as Python's docs show;
* ``hardened settings, plain ssl``: the hardened context's OpenSSL settings on a plain
  ``SSLContext`` (no checks, no report), sessions kept the same way;
* ``create_ssl_context, socket``: the hardened context's ``wrap_socket`` (the context
  offers and keeps the session itself, checks the policy and builds the TLS report);
* ``create_ssl_context, asyncio``: the same context through the asyncio clients' TLS
  layer (:func:`iothub_tls._io.tls.open_tls`, an SSLObject over memory BIOs) on an event
  loop run by the calling thread: what the MQTT clients do.

Client CPU is ``time.thread_time()`` of the one client thread, from before the TCP
connect until the greeting was read and the session kept; closing is not counted. ::

    python -m bench.resumed_handshake                 # 3 runs, their median and spread
    python -m bench.resumed_handshake --runs 5 --rounds 30 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/resumed_handshake.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import iothub_tls as it
from bench._machine import load_average
from bench._pki import HOST, bench_pki
from bench._report import BenchResult, Headline, Table
from bench._stats import Interleaved, Ratio
from iothub_tls._io.tls import open_tls
from iothub_tls.tls.context import _configure

NAME = "resumed_handshake"
TITLE = "3b. A resumed TLS 1.3 connection: client CPU"

PLAIN = "plain ssl"
SETTINGS = "hardened settings, plain ssl"
SOCKET = "create_ssl_context, socket"
ASYNC = "create_ssl_context, asyncio"
VARIANTS = (PLAIN, SETTINGS, SOCKET, ASYNC)
BARE = "plain ssl, without copying the session out"
#: client CPU of a resumed connection, library over plain ssl (issue 14)
TARGET = 1.1
GREETING = b"hello\n"

# The server: one connection at a time, a greeting after the handshake (behind the
# session tickets), then wait for the client to close.
_SERVER = r"""
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
while True:
    raw, _ = listener.accept()
    raw.settimeout(10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        with ctx.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(b"hello\n")
            while tls.recv(1024):
                pass
    except (OSError, ssl.SSLError):
        raw.close()
"""


@contextmanager
def _server() -> Iterator[int]:
    pki = bench_pki()
    with tempfile.TemporaryDirectory(prefix="itls-bench-resume-") as tmp:
        cert, key = pki.rsa_leaf.write(Path(tmp), "server")
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, cert, key],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            yield int(proc.stdout.readline())
        finally:
            proc.kill()
            proc.wait(10)


def _dial(port: int) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return raw


def _read_greeting(tls: ssl.SSLSocket) -> None:
    got = b""
    while not got.endswith(b"\n"):
        chunk = tls.recv(64)
        if not chunk:
            raise ConnectionError("the server closed before its greeting")
        got += chunk


def _app_managed(ctx: ssl.SSLContext, port: int) -> Callable[[], dict[str, float]]:
    """A plain context: the application keeps the session and offers it."""
    kept: dict[str, ssl.SSLSession | None] = {"session": None}

    def sample() -> dict[str, float]:
        cpu0 = time.thread_time()
        raw = _dial(port)
        tls = ctx.wrap_socket(raw, server_hostname=HOST, session=kept["session"])
        _read_greeting(tls)
        bare = time.thread_time() - cpu0
        kept["session"] = tls.session  # the new ticket came before the greeting
        cpu = time.thread_time() - cpu0
        reused = tls.session_reused
        tls.close()
        return {"cpu": cpu, "cpu_without_session_copy": bare, "reused": float(reused)}

    return sample


def _hardened_socket(ctx: it.HardenedSSLContext, port: int) -> Callable[[], dict[str, float]]:
    def sample() -> dict[str, float]:
        cpu0 = time.thread_time()
        raw = _dial(port)
        tls = ctx.wrap_socket(raw, server_hostname=HOST)
        _read_greeting(tls)  # the context keeps the new session as it arrives
        cpu = time.thread_time() - cpu0
        reused = it.tls_info(tls).session_reused
        tls.close()
        return {"cpu": cpu, "reused": float(reused)}

    return sample


class _Greeting(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.got += data
        if self.got.endswith(b"\n") and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"lost before the greeting: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)


def _hardened_asyncio(
    ctx: it.HardenedSSLContext, port: int, loop: asyncio.AbstractEventLoop
) -> Callable[[], dict[str, float]]:
    async def connect() -> tuple[Any, _Greeting]:
        inner = _Greeting()
        layer = await open_tls(
            inner,
            "127.0.0.1",
            port,
            context=ctx,
            server_hostname=HOST,
            connect_timeout=10,
            handshake_timeout=10,
        )
        await inner.done
        return layer, inner

    async def close(layer: Any, inner: _Greeting) -> None:
        layer.close()
        await inner.lost

    def sample() -> dict[str, float]:
        cpu0 = time.thread_time()
        layer, inner = loop.run_until_complete(connect())
        cpu = time.thread_time() - cpu0
        reused = it.tls_info(layer).session_reused
        loop.run_until_complete(close(layer, inner))
        return {"cpu": cpu, "reused": float(reused)}

    return sample


def measure(rounds: int, per_round: int) -> dict[str, Any]:
    """One run: a fresh server process, the four variants (each primed with one full
    handshake) interleaved over ``rounds`` rounds of ``per_round`` connections each."""
    pki = bench_pki()
    policy = pki.policy(max_version=ssl.TLSVersion.TLSv1_3)
    plain = ssl.create_default_context(cadata=pki.roots_pem)
    plain.maximum_version = ssl.TLSVersion.TLSv1_3
    settings = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _configure(settings, policy, None)
    loop = asyncio.new_event_loop()
    out: dict[str, Any] = {"load_average_at_start": load_average()}
    try:
        with _server() as port:
            variants = {
                PLAIN: _app_managed(plain, port),
                SETTINGS: _app_managed(settings, port),
                SOCKET: _hardened_socket(it.create_ssl_context(policy), port),
                ASYNC: _hardened_asyncio(it.create_ssl_context(policy), port, loop),
            }
            timing = Interleaved().run(variants, rounds=rounds, per_round=per_round, warmup=3)
    finally:
        loop.close()
    out["load_average_at_end"] = load_average()
    out["client_cpu_us"] = {n: timing.summary(n, "cpu").as_dict(1e6, 1) for n in VARIANTS}
    out["resumed_share"] = {
        n: sum(timing.samples(n, "reused")) / len(timing.samples(n, "reused")) for n in VARIANTS
    }
    out["ratios"] = {
        f"{n} / {PLAIN}": timing.ratio(n, PLAIN, "cpu").as_dict() for n in VARIANTS[1:]
    }
    # The plain application must copy the session out (tls.session serialises and parses
    # it again) to resume at all; the handshake alone, without that copy, as a second
    # and stricter baseline.
    out["client_cpu_us"][BARE] = timing.summary(PLAIN, "cpu_without_session_copy").as_dict(1e6, 1)
    out["ratios_to_bare"] = {
        f"{n} / {BARE}": Ratio.of(
            [
                statistics.median(r[n]["cpu"])
                / statistics.median(r[PLAIN]["cpu_without_session_copy"])
                for r in timing.rounds
            ]
        ).as_dict()
        for n in (SOCKET, ASYNC)
    }
    return out


def _ratio(result: dict[str, Any], name: str) -> Ratio:
    r = result["ratios"][f"{name} / {PLAIN}"]
    return Ratio(r["value"], r["p25"], r["p75"], r["rounds"], r["min"], r["max"])


def run(smoke: bool) -> BenchResult:
    rounds, per_round = (2, 2) if smoke else (20, 5)
    result = measure(rounds, per_round)
    rows = [
        {
            "client": name,
            "resumed": f"{result['resumed_share'][name]:.0%}",
            "client CPU µs (median)": result["client_cpu_us"][name]["median"],
            "p25-p75 µs": (
                f"{result['client_cpu_us'][name]['p25']:.0f}-"
                f"{result['client_cpu_us'][name]['p75']:.0f}"
            ),
            "vs plain ssl": (
                "1" if name == PLAIN else f"{result['ratios'][f'{name} / {PLAIN}']['value']:.3f}"
            ),
        }
        for name in VARIANTS
    ]
    rows.insert(
        1,
        {
            "client": BARE,
            "resumed": f"{result['resumed_share'][PLAIN]:.0%}",
            "client CPU µs (median)": result["client_cpu_us"][BARE]["median"],
            "p25-p75 µs": (
                f"{result['client_cpu_us'][BARE]['p25']:.0f}-"
                f"{result['client_cpu_us'][BARE]['p75']:.0f}"
            ),
            "vs plain ssl": "-",
        },
    )
    headlines = [
        Headline.of_ratio(
            f"resumed TLS 1.3 connection, client CPU: {name} vs plain ssl",
            _ratio(result, name),
            target=f"≤ {TARGET}x" if name in (SOCKET, ASYNC) else None,
            met=_ratio(result, name).value <= TARGET if name in (SOCKET, ASYNC) else None,
        )
        for name in VARIANTS[1:]
    ]
    for name in (SOCKET, ASYNC):
        r = result["ratios_to_bare"][f"{name} / {BARE}"]
        headlines.append(
            Headline.of_ratio(
                f"resumed TLS 1.3 connection, client CPU: {name} vs the plain handshake "
                "without its session copy",
                Ratio(r["value"], r["p25"], r["p75"], r["rounds"], r["min"], r["max"]),
            )
        )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            "A TLS 1.3 server in its own process (RSA-2048 chain, two session tickets per "
            "connection); each connection resumes the previous one's session: TCP "
            "connect, resumed handshake, the server's greeting read (the new ticket comes "
            "before it), the session kept. Client CPU: `time.thread_time()` of the client "
            "thread over that (closing not counted). plain ssl: "
            "`create_default_context(cadata=roots)`, the application passing "
            "`tls.session` back as `wrap_socket(session=...)`; hardened settings: the same "
            "with `_configure` applied to a plain SSLContext; create_ssl_context: the "
            "context remembers and offers sessions itself, through `wrap_socket` and "
            "through the asyncio TLS layer the MQTT clients use (event loop in the calling "
            f"thread). {rounds} rounds x {per_round} connections per variant, interleaved; "
            "ratio = median of per-round ratios. Load average "
            f"{result['load_average_at_start']} at start, {result['load_average_at_end']} "
            "at end."
        ),
        tables=[
            Table(
                "Per resumed connection",
                ["client", "resumed", "client CPU µs (median)", "p25-p75 µs", "vs plain ssl"],
                rows,
            )
        ],
        headlines=headlines,
        data=result,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.resumed_handshake", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3, help="runs, a fresh server each (3)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per run (20)")
    parser.add_argument("--per-round", type=int, default=5, help="connections per round (5)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.runs < 3 or args.rounds < 3:
        parser.error("--runs and --rounds must be at least 3 (medians with a spread)")
    runs = []
    for i in range(args.runs):
        one = measure(args.rounds, args.per_round)
        runs.append(one)
        if not args.json:
            cpu = ", ".join(f"{n} {one['client_cpu_us'][n]['median']:.0f} µs" for n in VARIANTS)
            ratios = (
                ", ".join(
                    f"{n} {one['ratios'][f'{n} / {PLAIN}']['value']:.3f}x" for n in VARIANTS[1:]
                )
                + "; without the session copy: "
                + ", ".join(
                    f"{n} {one['ratios_to_bare'][f'{n} / {BARE}']['value']:.3f}x"
                    for n in (SOCKET, ASYNC)
                )
            )
            print(
                f"run {i + 1} (load {one['load_average_at_start']} -> "
                f"{one['load_average_at_end']}): {cpu}\n  vs plain ssl: {ratios}",
                flush=True,
            )
    summary = {}
    for name in VARIANTS[1:]:
        values = [r["ratios"][f"{name} / {PLAIN}"]["value"] for r in runs]
        summary[name] = {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
            "runs": values,
        }
    for name in (SOCKET, ASYNC):
        values = [r["ratios_to_bare"][f"{name} / {BARE}"]["value"] for r in runs]
        summary[f"{name} vs {BARE}"] = {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
            "runs": values,
        }
    if args.json:
        print(json.dumps({"summary": summary, "runs": runs}, indent=2))
        return 0
    print(f"\nclient CPU vs plain ssl, median of {args.runs} runs (min-max):")
    for name, s in summary.items():
        verdict = ""
        if name in (SOCKET, ASYNC):
            verdict = f" (target ≤ {TARGET}x: {'met' if s['median'] <= TARGET else 'MISSED'})"
        print(f"  {name}: {s['median']:.3f}x ({s['min']:.3f}-{s['max']:.3f}){verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
