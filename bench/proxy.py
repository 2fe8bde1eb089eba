"""What a proxy costs a device: connection set-up time and bytes on the wire through an
HTTP CONNECT proxy (tinyproxy) and a SOCKS5 proxy (Dante's danted), against a direct
connection, for every transport (MQTT, MQTT over WebSockets, AMQP, AMQP over WebSockets,
HTTPS) to the local hub.

One sample is one asyncio device client's ``connect()``: TCP (to the proxy, then its
tunnel), TLS with the hub (a full handshake: a new client, so no session to resume), the
WebSocket upgrade where there is one, and the protocol's authentication (MQTT CONNECT
and SUBSCRIBE, AMQP SASL, CBS and attach; HTTPS: the TLS connection only). Each round
measures every (transport, route) once, in a rotated order, so the routes of one
transport share the machine's weather; the ratio to direct is taken per round, and its
median and spread are reported. Bytes are counted by a TCP relay in front of the proxy
(or the hub, for direct), both directions, for a connect and a close, in separate
samples (the relay adds its own latency, so it is not in the timed samples).

Everything runs on loopback: the proxies' own work is what is measured, not a network.
::

    python -m bench.proxy                      # 15 rounds
    python -m bench.proxy --rounds 30 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/proxy.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import iothub_tls as it
from bench._machine import load_average
from bench._stats import summarize
from iothub_tls.aio import AmqpDeviceClient, HttpsDeviceClient, MqttDeviceClient
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.testing.proxies import Dante, TinyProxy
from iothub_tls.testing.relay import RecordRelay

HOST = "hub.iothub-tls.test"
ROUTES = ("direct", "http", "socks5")
#: transport -> (asyncio client class, keywords, the hub door it reaches)
TRANSPORTS: dict[str, tuple[Any, dict[str, Any], str]] = {
    "mqtt": (MqttDeviceClient, {}, "mqtt"),
    "mqtt-ws": (MqttDeviceClient, {"websockets": True}, "https"),
    "amqp": (AmqpDeviceClient, {}, "amqp"),
    "amqp-ws": (AmqpDeviceClient, {"websockets": True}, "https"),
    "https": (HttpsDeviceClient, {}, "https"),
}


@contextmanager
def _lab(tmp: Path) -> Iterator[tuple[LocalHub, TinyProxy, Dante]]:
    with ExitStack() as stack:
        hub = stack.enter_context(
            LocalHub(
                HubOptions(
                    state_dir=tmp / "hub", hostname=HOST, mqtt_port=0, amqp_port=0, https_port=0
                )
            )
        )
        tinyproxy = TinyProxy(tmp / "tinyproxy")
        socks = Dante(tmp / "dante")
        stack.enter_context(tinyproxy)
        stack.enter_context(socks)
        yield hub, tinyproxy, socks


class Bench:
    def __init__(self, hub: LocalHub, tinyproxy: TinyProxy, socks: Dante) -> None:
        self.hub = hub
        self.tinyproxy = tinyproxy
        self.socks = socks
        self.policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))
        self.connection_strings = {
            transport: hub.add_device(f"bench-{transport}").connection_string
            for transport in TRANSPORTS
        }

    def proxy_url(self, route: str, port: int | None = None) -> str | None:
        if route == "direct":
            return None
        proxy = self.tinyproxy if route == "http" else self.socks
        return f"{proxy.scheme}://127.0.0.1:{port or proxy.port}"

    def client(
        self, transport: str, route: str, *, port: int | None = None, proxy: str | None = None
    ) -> Any:
        cls, kwargs, door = TRANSPORTS[transport]
        return cls.from_connection_string(
            self.connection_strings[transport],
            policy=self.policy,
            host="127.0.0.1",
            port=port or self.hub.ports[door],
            proxy=proxy if proxy is not None else self.proxy_url(route),
            **kwargs,
        )

    async def connect_time(self, transport: str, route: str) -> float:
        client = self.client(transport, route)
        start = time.perf_counter()
        await client.connect()
        elapsed = time.perf_counter() - start
        info = client.tls_info
        await client.close()
        if info is None or info.session_reused or info.sni != HOST:
            raise AssertionError(f"{transport} via {route}: not a full handshake with the hub")
        return elapsed

    async def wire_bytes(self, transport: str, route: str) -> tuple[int, int]:
        """(device -> network, network -> device) bytes of a connect and a close."""
        _, _, door = TRANSPORTS[transport]
        if route == "direct":
            target = self.hub.ports[door]
        else:
            target = self.tinyproxy.port if route == "http" else self.socks.port
        with RecordRelay(target) as relay:
            if route == "direct":
                client = self.client(transport, route, port=relay.port)
            else:
                client = self.client(transport, route, proxy=self.proxy_url(route, relay.port))
            await client.connect()
            await client.close()
            await asyncio.get_running_loop().run_in_executor(None, relay.wait_idle, 5.0)
            up, down = relay.logs[0]
            return up.total_bytes, down.total_bytes


def run(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="itls-bench-proxy-") as tmp, _lab(Path(tmp)) as lab:
        bench = Bench(*lab)
        loop = asyncio.new_event_loop()
        try:
            times: dict[tuple[str, str], list[float]] = {
                (t, r): [] for t in TRANSPORTS for r in ROUTES
            }
            ratios: dict[tuple[str, str], list[float]] = {
                (t, r): [] for t in TRANSPORTS for r in ROUTES if r != "direct"
            }
            cells = [(t, r) for t in TRANSPORTS for r in ROUTES]
            for transport in TRANSPORTS:  # warm-up: imports, first connections
                for route in ROUTES:
                    loop.run_until_complete(bench.connect_time(transport, route))
            for n in range(rounds):
                shift = n % len(cells)
                this_round: dict[tuple[str, str], float] = {}
                for cell in cells[shift:] + cells[:shift]:
                    this_round[cell] = loop.run_until_complete(bench.connect_time(*cell))
                    times[cell].append(this_round[cell])
                for transport, route in ratios:
                    ratios[(transport, route)].append(
                        this_round[(transport, route)] / this_round[(transport, "direct")]
                    )
            wire: dict[tuple[str, str], list[tuple[int, int]]] = {cell: [] for cell in cells}
            for _ in range(3):
                for cell in cells:
                    wire[cell].append(loop.run_until_complete(bench.wire_bytes(*cell)))
        finally:
            loop.close()
    results: dict[str, Any] = {"rounds": rounds, "load_average": load_average(), "cells": []}
    for transport, route in cells:
        summary = summarize(times[(transport, route)])
        up = statistics.median(u for u, _ in wire[(transport, route)])
        down = statistics.median(d for _, d in wire[(transport, route)])
        direct_up = statistics.median(u for u, _ in wire[(transport, "direct")])
        direct_down = statistics.median(d for _, d in wire[(transport, "direct")])
        entry: dict[str, Any] = {
            "transport": transport,
            "route": route,
            "connect_ms": summary.as_dict(scale=1000.0, digits=2),
            "bytes_up": up,
            "bytes_down": down,
            "extra_bytes": (up + down) - (direct_up + direct_down),
        }
        if route != "direct":
            ratio = summarize(ratios[(transport, route)])
            entry["time_vs_direct"] = ratio.as_dict(digits=2)
        results["cells"].append(entry)
    return results


def render(results: dict[str, Any]) -> str:
    lines = [
        f"Connection set-up through proxies ({results['rounds']} rounds; "
        f"load average {results['load_average']})",
        "",
        "| transport | route | connect ms median [p25-p75] (min-max) | x direct median "
        "[p25-p75] | bytes up/down | extra bytes |",
        "|---|---|---|---|---|---|",
    ]
    for cell in results["cells"]:
        c = cell["connect_ms"]
        ratio = cell.get("time_vs_direct")
        x = f"{ratio['median']:.2f} [{ratio['p25']:.2f}-{ratio['p75']:.2f}]" if ratio else "1"
        lines.append(
            f"| {cell['transport']} | {cell['route']} | {c['median']:.2f} "
            f"[{c['p25']:.2f}-{c['p75']:.2f}] ({c['min']:.2f}-{c['max']:.2f}) | {x} | "
            f"{cell['bytes_up']:.0f}/{cell['bytes_down']:.0f} | {cell['extra_bytes']:+.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds (>= 3)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    results = run(args.rounds)
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
