"""MQTT QoS 1 publish throughput over TLS: the device client vs raw paho-mqtt.

Both use paho-mqtt underneath and a context from ``create_ssl_context`` with the same
policy; the difference is the client's own machinery (its network thread, command
queue, futures). Two patterns: pipelined (queue many messages, wait for every PUBACK;
paho keeps 20 in flight in both) and one at a time (each send waits for its PUBACK).
"""

from __future__ import annotations

import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any

from ._broker import mosquitto_binary, process_cpu_seconds, tls_mosquitto
from ._mqtt import RawPahoDevice, device, wait_all
from ._pki import bench_pki
from ._report import BenchResult, Headline, Table
from ._stats import Interleaved

NAME = "mqtt_throughput"
TITLE = "5. MQTT QoS 1 publish throughput"

PAYLOAD = b"\x7b" * 256
PAHO, CLIENT = "raw paho-mqtt", "MqttDeviceClient"


def _pipelined(
    send: Callable[[bytes], Any], count: int, broker_pid: int
) -> Callable[[], dict[str, float]]:
    def sample() -> dict[str, float]:
        broker0 = process_cpu_seconds(broker_pid)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        wait_all([send(PAYLOAD) for _ in range(count)])
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        broker = process_cpu_seconds(broker_pid) - broker0
        return {
            "per_msg": wall / count,
            "cpu_per_msg": cpu / count,
            "broker_per_msg": broker / count,
        }

    return sample


def _sequential(
    send: Callable[[bytes], None], count: int, broker_pid: int
) -> Callable[[], dict[str, float]]:
    def sample() -> dict[str, float]:
        broker0 = process_cpu_seconds(broker_pid)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(count):
            send(PAYLOAD)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        broker = process_cpu_seconds(broker_pid) - broker0
        return {
            "per_msg": wall / count,
            "cpu_per_msg": cpu / count,
            "broker_per_msg": broker / count,
        }

    return sample


def run(smoke: bool) -> BenchResult:
    if mosquitto_binary() is None:
        return BenchResult(NAME, TITLE, "", skipped="mosquitto is not installed")
    rounds, burst, single = (2, 5, 3) if smoke else (60, 100, 25)
    pki = bench_pki()
    policy = pki.policy(max_version=ssl.TLSVersion.TLSv1_3)
    run_id = secrets.token_hex(3)
    rows: list[dict[str, Any]] = []
    headlines: list[Headline] = []
    data: dict[str, Any] = {}
    with tls_mosquitto() as broker:
        assert broker.pid is not None
        pid = broker.pid
        raw = RawPahoDevice(broker.port, f"bench-paho-{run_id}", policy)
        client = device(broker.port, f"bench-client-{run_id}", policy)
        raw.connect()
        client.connect()
        try:
            patterns = {
                "pipelined": (
                    burst,
                    {
                        PAHO: _pipelined(raw.publish, burst, pid),
                        CLIENT: _pipelined(client.send_telemetry_async, burst, pid),
                    },
                ),
                "one at a time": (
                    single,
                    {
                        PAHO: _sequential(raw.send_telemetry, single, pid),
                        CLIENT: _sequential(client.send_telemetry, single, pid),
                    },
                ),
            }
            tls = f"{client.tls_info.version} {client.tls_info.cipher}"
            for pattern, (count, variants) in patterns.items():
                timing = Interleaved().run(variants, rounds=rounds, per_round=1, warmup=1)
                cell: dict[str, Any] = {}
                for name in variants:
                    per_msg = timing.summary(name, "per_msg")
                    cpu = timing.summary(name, "cpu_per_msg")
                    brk = timing.summary(name, "broker_per_msg")
                    rows.append(
                        {
                            "pattern": pattern,
                            "client": name,
                            "msgs per sample": count,
                            "msg/s (median)": round(1 / per_msg.median),
                            "msg/s p25-p75": f"{1 / per_msg.p75:.0f}-{1 / per_msg.p25:.0f}",
                            "client CPU µs/msg": round(cpu.median * 1e6, 1),
                            "broker CPU µs/msg": round(brk.median * 1e6, 1),
                        }
                    )
                    cell[name] = {
                        "messages_per_sample": count,
                        "seconds_per_message": per_msg.as_dict(1.0, 9),
                        "client_cpu_us_per_message": cpu.as_dict(1e6, 2),
                        "broker_cpu_us_per_message": brk.as_dict(1e6, 2),
                    }
                slower = timing.ratio(CLIENT, PAHO, "per_msg")
                cpu_ratio = timing.ratio(CLIENT, PAHO, "cpu_per_msg")
                cell["ratios"] = {
                    "client_over_paho_time_per_message": slower.as_dict(),
                    "client_over_paho_cpu_per_message": cpu_ratio.as_dict(),
                }
                data[pattern] = cell
                overhead = (slower.value - 1) * 100
                headlines.append(
                    Headline(
                        f"MqttDeviceClient overhead vs raw paho, {pattern} (time per message)",
                        overhead,
                        "%",
                        low=(slower.low - 1) * 100,
                        high=(slower.high - 1) * 100,
                        target="≤ 5 %",
                        met=overhead <= 5,
                    )
                )
                headlines.append(
                    Headline(
                        f"MqttDeviceClient extra client CPU per message vs raw paho, {pattern}",
                        (cpu_ratio.value - 1) * 100,
                        "%",
                        low=(cpu_ratio.low - 1) * 100,
                        high=(cpu_ratio.high - 1) * 100,
                    )
                )
        finally:
            client.close()
            raw.close()
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            f"One connection each ({tls}, Mosquitto on loopback), {len(PAYLOAD)}-byte "
            f"payloads on the device's telemetry topic, QoS 1. Pipelined: {burst} messages "
            "queued then every PUBACK awaited (paho's default 20 in flight in both); one at "
            f"a time: {single} sends that each wait for their PUBACK. {rounds} rounds, the "
            "two clients alternating in rotating order; time per message = wall time / "
            "messages; client CPU = `time.process_time()` (all threads); broker CPU from "
            "`/proc/PID/task/*/schedstat`. Overhead = median of the per-round "
            "time-per-message ratios - 1."
        ),
        tables=[
            Table(
                "QoS 1 publishing",
                [
                    "pattern",
                    "client",
                    "msgs per sample",
                    "msg/s (median)",
                    "msg/s p25-p75",
                    "client CPU µs/msg",
                    "broker CPU µs/msg",
                ],
                rows,
            )
        ],
        headlines=headlines,
        data=data,
    )
