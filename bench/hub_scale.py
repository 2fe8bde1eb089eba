"""How many idle device connections one local hub holds: ``iothub-tls serve`` in its
own process, N authenticated MQTT devices (SAS tokens) connected from one client
process, then the hub restarted and every device back.

::

    python -m bench.hub_scale                              # N = 1000, 2000, 5000; 3 runs
    python -m bench.hub_scale --before /tmp/hub-before     # and another tree's hub, same runs
    python -m bench.hub_scale --sizes 100 --runs 1 --json  # a quick look

``--before DIR`` names a directory holding another version's ``iothub_tls`` package
(``git archive COMMIT iothub_tls | tar -x -C DIR``): its ``serve`` is run in exactly the
same conditions, interleaved with this tree's, and the report gives each measure's
ratio before / after per run (median and range).

One run, for one hub and one N:

1. a state directory with N registered SAS devices (written once, shared by every run);
2. ``serve`` with the MQTT door only, ``--max-connections`` above N (serve raises its
   own open-file limit);
3. N devices connect from this process's one asyncio loop (raw MQTT CONNECT over TLS,
   the codec of :mod:`iothub_tls.mqtt.packets`, at most ``--at-once`` handshakes in flight,
   as a gateway's handshake gate does): *accept s* is the time until every CONNACK,
   *accept cpu ms* the hub's CPU time for it per device (all its threads);
4. held idle (MQTT keep-alive 1177 s, no traffic): the hub's threads and RSS from
   ``/proc/PID/status`` (and the RSS it grew by per device since it started), its CPU
   over ``--idle`` seconds (scheduler accounting of all its threads), as % of one core;
5. the hub is stopped (SIGTERM; *stop s* until it exited, killed after 20 s) and
   started again on the same port; each device reconnects as soon as it sees its
   connection end (retrying every 0.2-0.5 s while the port is closed): *back s* is the
   time from the new hub's start-up banner until every device has its CONNACK again
   (*back cpu ms*: the new hub's CPU per device meanwhile); threads and RSS are read
   again then.

Medians of ``--runs`` runs, with their range.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/hub_scale.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._broker import process_cpu_seconds, raise_fd_limit
from bench._stats import Ratio, summarize
from iothub_tls.auth import generate_sas_token
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.mqtt import conventions as mqttc
from iothub_tls.mqtt import packets

_REPO = Path(__file__).resolve().parent.parent
HOSTNAME = "localhost"
#: IoT Hub's largest MQTT keep-alive: the devices stay silent for the whole run.
KEEPALIVE = 1177
#: How long serve has to exit after SIGTERM before it is killed.
STOP_WAIT = 20.0
MEASURES = (
    "accept_s",
    "accept_cpu_ms",
    "threads",
    "rss_mib",
    "rss_per_device_kib",
    "idle_cpu_pct",
    "stop_s",
    "back_s",
    "back_cpu_ms",
    "threads_back",
    "rss_back_mib",
)


# -- the hub process -------------------------------------------------------------------------


def _status(pid: int) -> tuple[int, float]:
    """(threads, RSS in MiB) of process ``pid``."""
    threads, rss = -1, -1.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return threads, rss


class Serve:
    """``iothub-tls serve`` from ``tree`` in a subprocess, MQTT door only."""

    def __init__(self, tree: Path, state: Path, port: int, max_connections: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(tree)
        command = [
            sys.executable, "-m", "iothub_tls", "serve", "--state", str(state),
            "--hostname", HOSTNAME, "--mqtt-port", str(port), "--amqp-port", "off",
            "--https-port", "off", "--max-connections", str(max_connections),
            "--log", str(state / f"connections-{os.getpid()}.jsonl"), "--log-backups", "1",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree,  # `python -m` looks in the working directory first
        )
        banner = ""
        assert self.proc.stderr is not None
        while "Ctrl-C stops" not in banner:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"serve from {tree} did not start:\n{banner}")
            banner += line
        self.ready = time.monotonic()
        found = re.search(r"^MQTT\s+\S+:(\d+)", banner, re.M)
        assert found is not None, banner
        self.port = int(found[1])
        # Keep reading what it writes (warnings, statistics at exit): a full pipe would
        # block it. The last lines are kept for an error report.
        self.errors: collections.deque[str] = collections.deque(maxlen=50)
        self._drain = threading.Thread(target=self._read_errors, daemon=True)
        self._drain.start()

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.errors.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, wait: float = STOP_WAIT) -> tuple[float, bool]:
        """SIGTERM (as a service manager stops it), then SIGKILL after ``wait`` s;
        (seconds until it exited, whether it had to be killed). Not SIGINT: a shell
        starts background jobs with SIGINT ignored, and serve would inherit that."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        killed = False
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            killed = True
            self.proc.kill()
            self.proc.wait()
            tail = "".join(self.errors)
            print(f"  serve did not exit within {wait:g} s of SIGTERM: killed\n{tail}",
                  file=sys.stderr, flush=True)  # fmt: skip
        self._drain.join(5)
        return time.monotonic() - began, killed


# -- the devices ---------------------------------------------------------------------------------


class _Link(asyncio.Protocol):
    def __init__(self, connect: bytes) -> None:
        self.connect = connect
        self.decoder = packets.Decoder(from_server=True)
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.connect)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        for packet in self.decoder.feed(data):
            if isinstance(packet, packets.ConnAck) and not self.connack.done():
                self.connack.set_result(packet.return_code)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class Fleet:
    """N devices that stay connected: each reconnects whenever its connection ends."""

    port: int
    ctx: ssl.SSLContext
    keys: dict[str, str]
    at_once: int
    connected: int = 0
    links: dict[str, _Link] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: bool = False

    def start(self) -> None:
        gate = asyncio.Semaphore(self.at_once)
        self.tasks = [asyncio.create_task(self._keep(d, gate)) for d in self.keys]

    async def _keep(self, device_id: str, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            token = generate_sas_token(f"{HOSTNAME}/devices/{device_id}", self.keys[device_id])
            connect = packets.connect(
                device_id,
                username=mqttc.username(HOSTNAME, device_id),
                password=token.encode(),
                keepalive=KEEPALIVE,
            )
            async with gate:
                try:
                    _, link = await loop.create_connection(
                        functools.partial(_Link, connect),
                        "127.0.0.1",
                        self.port,
                        ssl=self.ctx,
                        server_hostname=HOSTNAME,
                    )
                    code = await asyncio.wait_for(link.connack, 60)
                except (OSError, ConnectionError, asyncio.TimeoutError):
                    code = None
            if code is None:
                await asyncio.sleep(0.2 + random.random() * 0.3)  # jitter
                continue
            if code != 0:
                raise RuntimeError(f"{device_id} refused by the hub: CONNACK {code}")
            self.links[device_id] = link
            self.connected += 1
            await link.closed
            self.connected -= 1

    async def until_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.connected < len(self.keys):
            for task in self.tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.connected} of {len(self.keys)} devices connected")
            await asyncio.sleep(0.02)

    async def until_none(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.connected} devices did not see the hub stop")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.stopping = True
        for link in self.links.values():
            if link.transport is not None:
                link.transport.abort()  # type: ignore[attr-defined]
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# -- one run ---------------------------------------------------------------------------------------


def prepare_state(state: Path, devices: int) -> tuple[dict[str, str], Path]:
    """A state directory (PKI, registry) with ``devices`` SAS devices; their keys."""
    hub = LocalHub(HubOptions(state, hostname=HOSTNAME))
    keys = {}
    for n in range(devices):
        device = hub.registry.get(f"dev-{n}") or hub.registry.add_sas_device(f"dev-{n}")
        assert device.primary_key is not None
        keys[device.device_id] = device.primary_key
    hub.registry.save()
    return keys, hub.root_pem_path


async def one_run(
    tree: Path, state: Path, keys: dict[str, str], root: Path, at_once: int, idle: float
) -> dict[str, float]:
    ctx = ssl.create_default_context(cafile=str(root))
    hub = Serve(tree, state, 0, len(keys) + 100)
    fleet = Fleet(hub.port, ctx, keys, at_once)
    try:
        _, rss_empty = _status(hub.pid)
        cpu_empty = process_cpu_seconds(hub.pid)
        began = time.monotonic()
        fleet.start()
        await fleet.until_all(600)
        accept_s = time.monotonic() - began
        accept_cpu = process_cpu_seconds(hub.pid) - cpu_empty
        await asyncio.sleep(2.0)  # settle: the last connections' bookkeeping
        threads, rss = _status(hub.pid)
        cpu0, t0 = process_cpu_seconds(hub.pid), time.monotonic()
        await asyncio.sleep(idle)
        idle_cpu = (process_cpu_seconds(hub.pid) - cpu0) / (time.monotonic() - t0) * 100

        # Stopped, every device sees its connection end and starts reconnecting (the
        # loop keeps running meanwhile: stop and start wait on other threads).
        stop_s, killed = await asyncio.to_thread(hub.stop)
        await fleet.until_none(60)
        hub = await asyncio.to_thread(Serve, tree, state, fleet.port, len(keys) + 100)
        cpu_started = process_cpu_seconds(hub.pid)
        await fleet.until_all(600)
        back_s = time.monotonic() - hub.ready
        back_cpu = process_cpu_seconds(hub.pid) - cpu_started
        await asyncio.sleep(2.0)
        threads_back, rss_back = _status(hub.pid)
    finally:
        await fleet.close()
        hub.stop()
    return {
        "accept_s": accept_s,
        "accept_cpu_ms": accept_cpu * 1000 / len(keys),
        "threads": threads,
        "rss_mib": rss,
        "rss_per_device_kib": (rss - rss_empty) * 1024 / len(keys),
        "idle_cpu_pct": idle_cpu,
        "stop_s": stop_s,
        "killed": float(killed),
        "back_s": back_s,
        "back_cpu_ms": back_cpu * 1000 / len(keys),
        "threads_back": threads_back,
        "rss_back_mib": rss_back,
    }


def run(
    sizes: list[int], runs: int, trees: dict[str, Path], at_once: int, idle: float
) -> dict[str, Any]:
    raise_fd_limit(max(sizes) * 2 + 512)
    names = list(trees)
    samples: dict[int, dict[str, list[dict[str, float]]]] = {
        n: {name: [] for name in names} for n in sizes
    }
    with tempfile.TemporaryDirectory(prefix="hub-scale-") as tmp:
        state = Path(tmp)
        keys, root = prepare_state(state, max(sizes))
        for r in range(runs):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in sizes:
                subset = {f"dev-{i}": keys[f"dev-{i}"] for i in range(n)}
                for name in order:
                    print(f"run {r + 1}/{runs}: {name}, {n} devices", file=sys.stderr, flush=True)
                    result = asyncio.run(one_run(trees[name], state, subset, root, at_once, idle))
                    samples[n][name].append(result)
                    print(f"  {json.dumps({k: round(v, 2) for k, v in result.items()})}",
                          file=sys.stderr, flush=True)  # fmt: skip
    return {"sizes": sizes, "runs": runs, "trees": {k: str(v) for k, v in trees.items()},
            "at_once": at_once, "idle_s": idle, "samples": samples}  # fmt: skip


def _summary(values: list[float]) -> dict[str, float]:
    s = summarize(values)
    return {"median": s.median, "min": s.low, "max": s.high}


def summarize_result(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, by_tree in result["samples"].items():
        row: dict[str, Any] = {}
        for name, runs in by_tree.items():
            row[name] = {m: _summary([run[m] for run in runs]) for m in MEASURES}
            row[name]["killed"] = sum(int(run["killed"]) for run in runs)
        if "before" in by_tree and "after" in by_tree:
            pairs = list(zip(by_tree["before"], by_tree["after"], strict=True))
            row["before/after"] = {
                m: Ratio.of([b[m] / a[m] for b, a in pairs if a[m]]).as_dict(2)
                for m in MEASURES
                if all(a[m] for _, a in pairs)
            }
        out[str(n)] = row
    return out


def render(result: dict[str, Any]) -> str:
    summary = summarize_result(result)
    names = list(result["trees"])
    lines = [
        f"idle MQTT devices on one local hub ({result['runs']} runs, median (min-max); "
        f"{result['at_once']} handshakes at once from one client process; CPU over "
        f"{result['idle_s']:g} s idle)",
        "",
    ]
    header = "| devices | measure | " + " | ".join(names)
    if "before/after" in next(iter(summary.values())):
        header += " | before / after"
    lines += [header + " |", "|" + "---|" * (header.count("|") - 1)]
    for n, row in summary.items():
        for m in MEASURES:
            cells = ["{median:.4g} ({min:.4g}-{max:.4g})".format(**row[name][m]) for name in names]
            ratio = row.get("before/after", {}).get(m)
            if "before/after" in row:
                cells.append(
                    f"{ratio['value']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"
                    if ratio
                    else "-"
                )
            lines.append(f"| {n} | {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for n, row in summary.items():
        for name in names:
            if row[name]["killed"]:
                lines.append(
                    f"{name}, {n} devices: serve did not exit within {STOP_WAIT:g} s of "
                    f"SIGTERM (killed) in {row[name]['killed']} of {result['runs']} runs"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hub_scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", default="1000,2000,5000", help="device counts (comma-separated)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--before", type=Path, help="a directory holding another version's iothub_tls package"
    )
    parser.add_argument("--at-once", type=int, default=64, help="handshakes in flight at once")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    trees = {"after": _REPO}
    if args.before is not None:
        if not (args.before / "iothub_tls" / "cli" / "serve.py").exists():
            parser.error(f"{args.before} holds no iothub_tls package with a serve command")
        trees = {"before": args.before.resolve(), "after": _REPO}
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    result = run(sizes, args.runs, trees, args.at_once, args.idle)
    if args.json:
        print(json.dumps({**result, "summary": summarize_result(result)}, indent=2))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
