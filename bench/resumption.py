"""Session resumption: what a reconnect costs, resumed vs full, through the MQTT client.

An ``MqttDeviceClient`` keeps one hardened context for its lifetime, so ``close()`` then
``connect()`` offers the remembered TLS session (TLS 1.2 session ticket / id, TLS 1.3
PSK ticket). The twin with ``session_resumption=False`` does a full handshake every time.
Both talk to Mosquitto presenting an RSA-2048 chain. A reconnect here is the whole
device connect: TCP, TLS, MQTT CONNECT/CONNACK and the four subscriptions the client
makes, then a clean DISCONNECT.
"""

from __future__ import annotations

import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any

from iothub_tls.testing.relay import RecordRelay

from ._broker import mosquitto_binary, process_cpu_seconds, tls_mosquitto
from ._mqtt import device
from ._pki import bench_pki
from ._report import BenchResult, Headline, Table
from ._stats import Interleaved, ratio_of_runs, summarize

NAME = "resumption"
TITLE = "3. Session resumption (MQTT reconnect)"

VERSIONS = {"TLS 1.2": ssl.TLSVersion.TLSv1_2, "TLS 1.3": ssl.TLSVersion.TLSv1_3}
FULL, RESUMED = "full", "resumed"


def _clients(port: int, version: ssl.TLSVersion, tag: str) -> dict[str, Any]:
    pki = bench_pki()
    run_id = secrets.token_hex(3)
    return {
        FULL: device(
            port,
            f"bench-{tag}-full-{run_id}",
            pki.policy(max_version=version, session_resumption=False),
        ),
        RESUMED: device(port, f"bench-{tag}-resumed-{run_id}", pki.policy(max_version=version)),
    }


def _wire(port: int, version: ssl.TLSVersion, tag: str, repeats: int) -> dict[str, Any]:
    """Bytes each way per reconnect, through the record-parsing relay."""
    out: dict[str, Any] = {}
    with RecordRelay(port) as relay:
        clients = _clients(relay.port, version, tag)
        for name, client in clients.items():
            client.connect()  # the first connection (a full handshake for both)
            client.close()
            relay.wait_idle()
            down, up, reused = [], [], []
            for _ in range(repeats):
                index = len(relay.logs)
                client.connect()
                reused.append(client.tls_info.session_reused)
                client.close()
                relay.wait_idle()
                c2s, s2c = relay.logs[index]
                down.append(s2c.total_bytes)
                up.append(c2s.total_bytes)
            out[name] = {"down": down, "up": up, "reused": reused}
    return out


def _sampler(client: Any, broker_pid: int) -> Callable[[], dict[str, float]]:
    def sample() -> dict[str, float]:
        broker0 = process_cpu_seconds(broker_pid)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        client.connect()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        reused = client.tls_info.session_reused
        client.close()
        broker = process_cpu_seconds(broker_pid) - broker0
        return {"wall": wall, "cpu": cpu, "broker_cpu": broker, "reused": float(reused)}

    return sample


def run(smoke: bool) -> BenchResult:
    if mosquitto_binary() is None:
        return BenchResult(NAME, TITLE, "", skipped="mosquitto is not installed")
    rounds, per_round, wire_repeats = (2, 2, 2) if smoke else (20, 5, 5)
    rows: list[dict[str, Any]] = []
    headlines: list[Headline] = []
    data: dict[str, Any] = {}
    with tls_mosquitto() as broker:
        assert broker.pid is not None
        broker_pid = broker.pid
        for vname, version in VERSIONS.items():
            tag = vname.replace(" ", "").replace(".", "")
            wire = _wire(broker.port, version, tag, wire_repeats)
            clients = _clients(broker.port, version, tag)
            for client in clients.values():  # prime: the resumed client now holds a session
                client.connect()
                client.close()
            timing = Interleaved().run(
                {name: _sampler(c, broker_pid) for name, c in clients.items()},
                rounds=rounds,
                per_round=per_round,
                warmup=1,
            )
            cell: dict[str, Any] = {}
            for name in (FULL, RESUMED):
                w = wire[name]
                wall, cpu = timing.summary(name, "wall"), timing.summary(name, "cpu")
                broker_cpu = timing.summary(name, "broker_cpu")
                reused = timing.samples(name, "reused") + [float(r) for r in w["reused"]]
                share = sum(reused) / len(reused)
                rows.append(
                    {
                        "TLS": vname,
                        "reconnect": name,
                        "resumed": f"{share:.0%}",
                        "server→client B": summarize(w["down"]).median,
                        "client→server B": summarize(w["up"]).median,
                        "connect ms (p25-p75)": (
                            f"{wall.median * 1e3:.2f} ({wall.p25 * 1e3:.2f}-{wall.p75 * 1e3:.2f})"
                        ),
                        "client CPU ms (p25-p75)": (
                            f"{cpu.median * 1e3:.2f} ({cpu.p25 * 1e3:.2f}-{cpu.p75 * 1e3:.2f})"
                        ),
                        "broker CPU ms (p25-p75)": (
                            f"{broker_cpu.median * 1e3:.2f} "
                            f"({broker_cpu.p25 * 1e3:.2f}-{broker_cpu.p75 * 1e3:.2f})"
                        ),
                    }
                )
                cell[name] = {
                    "resumed_share": share,
                    "bytes_server_to_client": summarize(w["down"]).as_dict(digits=0),
                    "bytes_client_to_server": summarize(w["up"]).as_dict(digits=0),
                    "connect_ms": wall.as_dict(1e3, 3),
                    "client_process_cpu_ms": cpu.as_dict(1e3, 3),
                    "broker_cpu_ms": broker_cpu.as_dict(1e3, 3),
                }
            down = ratio_of_runs(list(zip(wire[RESUMED]["down"], wire[FULL]["down"], strict=True)))
            latency = timing.ratio(RESUMED, FULL, "wall")
            cpu_ratio = timing.ratio(RESUMED, FULL, "cpu")
            broker_ratio = timing.ratio(RESUMED, FULL, "broker_cpu")
            all_resumed = all(timing.samples(RESUMED, "reused")) and all(wire[RESUMED]["reused"])
            cell["ratios"] = {
                "resumed_over_full_bytes_server_to_client": down.as_dict(),
                "resumed_over_full_connect_latency": latency.as_dict(),
                "resumed_over_full_client_cpu": cpu_ratio.as_dict(),
                "resumed_over_full_broker_cpu": broker_ratio.as_dict(),
                "every_reconnect_resumed": all_resumed,
            }
            data[vname] = cell
            headlines.append(
                Headline.of_ratio(
                    f"{vname}: resumed reconnect, server→client bytes, % of full",
                    down,
                    percent=True,
                    target="≤ 35 %",
                    met=down.value <= 0.35 and all_resumed,
                    note="whole MQTT connect incl. CONNECT/SUBSCRIBE/DISCONNECT",
                )
            )
            headlines.append(
                Headline.of_ratio(
                    f"{vname}: resumed reconnect latency, % of full", latency, percent=True
                )
            )
            headlines.append(
                Headline.of_ratio(
                    f"{vname}: resumed reconnect client CPU, % of full", cpu_ratio, percent=True
                )
            )
            headlines.append(
                Headline.of_ratio(
                    f"{vname}: resumed reconnect broker CPU, % of full",
                    broker_ratio,
                    percent=True,
                )
            )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            "MqttDeviceClient → Mosquitto 2.0 (TLS listener, RSA-2048 chain, "
            "`set_tcp_nodelay true`) on loopback; reconnect = `close()` then `connect()` "
            "(TCP + TLS + CONNECT/CONNACK + 4 SUBSCRIBE/SUBACK). 'full' uses "
            "`session_resumption=False`. Bytes: through a TLS-record-parsing relay, "
            f"{wire_repeats} reconnects each after a priming connection. Latency: wall time "
            "of `connect()`; client CPU: `time.process_time()` over it (every thread of "
            "the device process); broker CPU: Mosquitto's scheduler run time "
            f"(`/proc/PID/task/*/schedstat`) over connect + close. {rounds} rounds x "
            f"{per_round} reconnects per variant, "
            "interleaved, directly to the broker (the relay adds Nagle delays)."
        ),
        tables=[
            Table(
                "Per reconnect (medians)",
                [
                    "TLS",
                    "reconnect",
                    "resumed",
                    "server→client B",
                    "client→server B",
                    "connect ms (p25-p75)",
                    "client CPU ms (p25-p75)",
                    "broker CPU ms (p25-p75)",
                ],
                rows,
            )
        ],
        headlines=headlines,
        notes=[
            "Mosquitto runs with `set_tcp_nodelay true`: with Nagle on, the broker's small "
            "post-handshake writes (TLS 1.3 session tickets, CONNACK) wait for the "
            "client's delayed ACK and a full TLS 1.3 connect takes ~50 ms instead of ~8 ms "
            "on loopback.",
        ],
        data=data,
    )
