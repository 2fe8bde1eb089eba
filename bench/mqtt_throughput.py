"""MQTT QoS 1 publish throughput over TLS: the device clients vs raw paho-mqtt.

Three clients publish to the same Mosquitto over TLS 1.3, each with a context from
``create_ssl_context`` with the same policy:

* ``raw paho-mqtt``: paho with ``tls_set_context`` and its own network thread
  (``loop_start``), what an application would write with paho alone;
* ``MqttDeviceClient``: the synchronous client, a facade that runs the asyncio client
  on the process's shared I/O thread (each call crosses to that thread and back);
* ``aio.MqttDeviceClient``: the asyncio client on an event loop run by the calling
  thread, as an asyncio application runs it.

Two patterns: one at a time (each send waits for its PUBACK: the round trip plus each
client's machinery) and pipelined (messages queued in bursts, then every PUBACK
awaited). A sample is 5,000 messages in both. ::

    python -m bench.mqtt_throughput                  # 3 runs, their median and spread
    python -m bench.mqtt_throughput --runs 5 --rounds 12 --json

``bench/run.py`` runs it once (one run of several interleaved rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import ssl
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/mqtt_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._broker import mosquitto_binary, process_cpu_seconds, tls_mosquitto
from bench._machine import load_average
from bench._mqtt import RawPahoDevice, aio_device, device, wait_all
from bench._pki import bench_pki
from bench._report import BenchResult, Headline, Table
from bench._stats import Interleaved, Ratio

NAME = "mqtt_throughput"
TITLE = "5. MQTT QoS 1 publish throughput"

PAYLOAD = b"\x7b" * 256
PAHO, CLIENT, AIO = "raw paho-mqtt", "MqttDeviceClient", "aio.MqttDeviceClient"
#: Messages per sample (both patterns).
MESSAGES = 5000
#: Pipelined: messages queued at once, then awaited; MqttOptions.queue_size (1,000 by
#: default) bounds what the device clients accept unacknowledged.
BURST = 500
PATTERNS = ("one at a time", "pipelined")
#: time per message, client over paho (issue 14)
TARGET = 1.05


Sample = Callable[[], dict[str, float]]


def _measured(
    run: Callable[[], None], count: int, broker_pid: int
) -> Callable[[], dict[str, float]]:
    def sample() -> dict[str, float]:
        broker0 = process_cpu_seconds(broker_pid)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        broker = process_cpu_seconds(broker_pid) - broker0
        return {
            "per_msg": wall / count,
            "cpu_per_msg": cpu / count,
            "broker_per_msg": broker / count,
        }

    return sample


def _sequential(send: Callable[[bytes], Any], count: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(count):
            send(PAYLOAD)

    return run


def _pipelined(send: Callable[[bytes], Any], count: int, burst: int) -> Callable[[], None]:
    def run() -> None:
        left = count
        while left > 0:
            n = min(burst, left)
            wait_all([send(PAYLOAD) for _ in range(n)])
            left -= n

    return run


class _AioDriver:
    """The asyncio client on a loop that this (the calling) thread runs for each sample."""

    def __init__(self, port: int, device_id: str, policy: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._make(port, device_id, policy))

    @staticmethod
    async def _make(port: int, device_id: str, policy: Any) -> Any:
        return aio_device(port, device_id, policy)

    def connect(self) -> None:
        self.loop.run_until_complete(self.client.connect())

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.client.close())
        finally:
            self.loop.close()

    def sequential(self, count: int) -> Callable[[], None]:
        client = self.client

        async def go() -> None:
            for _ in range(count):
                await client.send_telemetry(PAYLOAD)

        return lambda: self.loop.run_until_complete(go())

    def pipelined(self, count: int, burst: int) -> Callable[[], None]:
        client = self.client

        async def go() -> None:
            left = count
            while left > 0:
                n = min(burst, left)
                await asyncio.gather(*(client.send_telemetry(PAYLOAD) for _ in range(n)))
                left -= n

        return lambda: self.loop.run_until_complete(go())


def measure(rounds: int, count: int, burst: int) -> dict[str, Any]:
    """One run: a fresh broker and three connected clients, the two patterns each
    measured in ``rounds`` interleaved rounds (one sample of ``count`` messages per
    client per round, in rotating order)."""
    pki = bench_pki()
    policy = pki.policy(max_version=ssl.TLSVersion.TLSv1_3)
    run_id = secrets.token_hex(3)
    out: dict[str, Any] = {"load_average_at_start": load_average(), "patterns": {}}
    with tls_mosquitto() as broker:
        assert broker.pid is not None
        pid = broker.pid
        raw = RawPahoDevice(broker.port, f"bench-paho-{run_id}", policy)
        client = device(broker.port, f"bench-client-{run_id}", policy)
        aio = _AioDriver(broker.port, f"bench-aio-{run_id}", policy)
        raw.connect()
        client.connect()
        aio.connect()
        try:
            info = client.tls_info
            out["tls"] = f"{info.version} {info.cipher}"
            patterns: dict[str, dict[str, Sample]] = {
                "one at a time": {
                    PAHO: _measured(_sequential(raw.send_telemetry, count), count, pid),
                    CLIENT: _measured(_sequential(client.send_telemetry, count), count, pid),
                    AIO: _measured(aio.sequential(count), count, pid),
                },
                "pipelined": {
                    PAHO: _measured(_pipelined(raw.publish, count, burst), count, pid),
                    CLIENT: _measured(
                        _pipelined(client.send_telemetry_async, count, burst), count, pid
                    ),
                    AIO: _measured(aio.pipelined(count, burst), count, pid),
                },
            }
            for pattern, variants in patterns.items():
                timing = Interleaved().run(variants, rounds=rounds, per_round=1, warmup=1)
                cell: dict[str, Any] = {}
                for name in variants:
                    cell[name] = {
                        "seconds_per_message": timing.summary(name, "per_msg").as_dict(1.0, 9),
                        "client_cpu_us_per_message": timing.summary(name, "cpu_per_msg").as_dict(
                            1e6, 2
                        ),
                        "broker_cpu_us_per_message": timing.summary(name, "broker_per_msg").as_dict(
                            1e6, 2
                        ),
                    }
                cell["ratios"] = {
                    f"{name} / {PAHO}": {
                        "time_per_message": timing.ratio(name, PAHO, "per_msg").as_dict(),
                        "cpu_per_message": timing.ratio(name, PAHO, "cpu_per_msg").as_dict(),
                    }
                    for name in (CLIENT, AIO)
                }
                out["patterns"][pattern] = cell
        finally:
            aio.close()
            client.close()
            raw.close()
    out["load_average_at_end"] = load_average()
    return out


def _ratio(cell: dict[str, Any], name: str, metric: str = "time_per_message") -> Ratio:
    r = cell["ratios"][f"{name} / {PAHO}"][metric]
    return Ratio(r["value"], r["p25"], r["p75"], r["rounds"], r["min"], r["max"])


def run(smoke: bool) -> BenchResult:
    if mosquitto_binary() is None:
        return BenchResult(NAME, TITLE, "", skipped="mosquitto is not installed")
    rounds, count, burst = (2, 20, 10) if smoke else (9, MESSAGES, BURST)
    result = measure(rounds, count, burst)
    rows: list[dict[str, Any]] = []
    headlines: list[Headline] = []
    for pattern in PATTERNS:
        cell = result["patterns"][pattern]
        for name in (PAHO, CLIENT, AIO):
            per_msg, cpu, brk = (
                cell[name][k]
                for k in (
                    "seconds_per_message",
                    "client_cpu_us_per_message",
                    "broker_cpu_us_per_message",
                )
            )
            rows.append(
                {
                    "pattern": pattern,
                    "client": name,
                    "msgs per sample": count,
                    "µs/msg (median)": round(per_msg["median"] * 1e6, 1),
                    "µs/msg p25-p75": f"{per_msg['p25'] * 1e6:.1f}-{per_msg['p75'] * 1e6:.1f}",
                    "client CPU µs/msg": cpu["median"],
                    "broker CPU µs/msg": brk["median"],
                }
            )
        for name in (CLIENT, AIO):
            slower = _ratio(cell, name)
            one = pattern == "one at a time"
            headlines.append(
                Headline.of_ratio(
                    f"{name} overhead vs raw paho, {pattern} (time per message)",
                    slower,
                    target=f"≤ {TARGET}x" if one else None,
                    met=slower.value <= TARGET if one else None,
                )
            )
            headlines.append(
                Headline.of_ratio(
                    f"{name} client CPU per message vs raw paho, {pattern}",
                    _ratio(cell, name, "cpu_per_message"),
                )
            )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            f"One connection each ({result['tls']}, Mosquitto on loopback), "
            f"{len(PAYLOAD)}-byte payloads on the device's telemetry topic, QoS 1. One at "
            f"a time: {count} sends per sample, each waiting for its PUBACK. Pipelined: "
            f"{count} messages per sample in bursts of {burst} queued at once, every PUBACK "
            "awaited before the next burst. raw paho-mqtt: `tls_set_context` and its "
            "network thread; MqttDeviceClient: the synchronous facade (shared I/O thread); "
            "aio.MqttDeviceClient: the asyncio client on a loop run by the calling thread. "
            f"{rounds} rounds, the three clients in rotating order; time per message = wall "
            "time / messages; client CPU = `time.process_time()` (all threads); broker CPU "
            "from `/proc/PID/task/*/schedstat`. Ratio = median of the per-round ratios "
            f"(spread: their IQR). Load average {result['load_average_at_start']} at start, "
            f"{result['load_average_at_end']} at end."
        ),
        tables=[
            Table(
                "QoS 1 publishing",
                [
                    "pattern",
                    "client",
                    "msgs per sample",
                    "µs/msg (median)",
                    "µs/msg p25-p75",
                    "client CPU µs/msg",
                    "broker CPU µs/msg",
                ],
                rows,
            )
        ],
        headlines=headlines,
        data=result,
    )


def _across(runs: list[dict[str, Any]], pattern: str, name: str, metric: str) -> dict[str, Any]:
    values = [r["patterns"][pattern]["ratios"][f"{name} / {PAHO}"][metric]["value"] for r in runs]
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": [round(v, 3) for v in values],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mqtt_throughput", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3, help="runs, a fresh broker each (3)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per run (9)")
    parser.add_argument("--messages", type=int, default=MESSAGES, help="messages per sample")
    parser.add_argument("--burst", type=int, default=BURST, help="pipelined burst size")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if mosquitto_binary() is None:
        print("mosquitto is not installed", file=sys.stderr)
        return 2
    if args.runs < 3 or args.rounds < 3:
        parser.error("--runs and --rounds must be at least 3 (medians with a spread)")
    runs = []
    for i in range(args.runs):
        runs.append(measure(args.rounds, args.messages, args.burst))
        if not args.json:
            one = runs[-1]
            print(
                f"run {i + 1}: load {one['load_average_at_start']} -> {one['load_average_at_end']}",
                flush=True,
            )
            for pattern in PATTERNS:
                cell = one["patterns"][pattern]
                parts = []
                for name in (PAHO, CLIENT, AIO):
                    us = cell[name]["seconds_per_message"]["median"] * 1e6
                    parts.append(f"{name} {us:.1f} µs/msg")
                for name in (CLIENT, AIO):
                    r = cell["ratios"][f"{name} / {PAHO}"]["time_per_message"]
                    parts.append(f"{name}/paho {r['value']:.3f} ({r['p25']:.3f}-{r['p75']:.3f})")
                print(f"  {pattern}: " + "; ".join(parts), flush=True)
    summary = {
        pattern: {
            name: {
                "time_per_message": _across(runs, pattern, name, "time_per_message"),
                "cpu_per_message": _across(runs, pattern, name, "cpu_per_message"),
            }
            for name in (CLIENT, AIO)
        }
        for pattern in PATTERNS
    }
    document = {
        "messages_per_sample": args.messages,
        "rounds_per_run": args.rounds,
        "summary": summary,
        "runs": runs,
    }
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"\nmedian of {args.runs} runs (min-max), client / raw paho:")
    for pattern in PATTERNS:
        for name in (CLIENT, AIO):
            t = summary[pattern][name]["time_per_message"]
            c = summary[pattern][name]["cpu_per_message"]
            met = " (target ≤ 1.05x: " + ("met)" if t["median"] <= TARGET else "MISSED)")
            print(
                f"  {pattern}, {name}: time {t['median']:.3f}x ({t['min']:.3f}-{t['max']:.3f})"
                f"{met if pattern == 'one at a time' else ''}; CPU {c['median']:.3f}x "
                f"({c['min']:.3f}-{c['max']:.3f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
