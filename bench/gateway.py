"""A gateway's devices through a broker restart: N MQTT devices in one process.

Two stacks, measured side by side in the same run against the same Mosquitto:

* ``MqttDeviceClient`` — the product's synchronous client; every client of the process
  shares one asyncio I/O thread (and one callback thread);
* ``paho + one epoll loop`` — raw paho-mqtt clients driven by one selector thread
  (:mod:`bench._eventloop`), reconnected after a loss with the same back-off
  (:class:`iothub_tls.RetryPolicy` defaults, full jitter) from a pool of 8 threads
  (paho's ``reconnect()`` blocks for the TCP and TLS handshake).

Each measurement is a fresh interpreter (``probe``), driven by the parent through its
standard input and output:

1. connect N devices (32 caller threads); client CPU and wall time per device, RSS and
   threads per device (the caller threads excluded);
2. idle for ``IDLE_S`` seconds: client CPU share of one core;
3. the parent stops the broker; each device queues one QoS 1 message while it is down;
   the parent starts the broker again (its persistence keeps the subscriber's session);
   time until all N are back, failed reconnection attempts, and whether every queued
   message arrives: an independent subscriber on the broker counts them;
4. all close.

Mosquitto's log is read afterwards for protocol errors. Run it with
``python -m bench.gateway [--sizes 1000,2000,5000] [--rounds 3]``; ``bench/run.py``
runs it at N = 200 (and ``--smoke`` at N = 20), one round.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from ._report import BenchResult, Headline, Table
from ._stats import Ratio

_REPO = Path(__file__).resolve().parent.parent
NAME = "gateway"
TITLE = "6. Gateway: a broker restart under N devices"
STACKS = ("client", "paho")
IDLE_S = 10.0
CALLERS = 32
KEY = "c2VjcmV0LWtleS1mb3ItYmVuY2hlcw=="  # the broker is anonymous: never checked


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _expect(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise RuntimeError(f"expected {word!r} from the parent, got {line!r}")


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failed_attempts = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "attempt" in record.getMessage():
            self.failed_attempts += 1


# -- the product's client -------------------------------------------------------------------


def _product(cfg: dict[str, Any]) -> dict[str, Any]:
    import iothub_tls as it
    from iothub_tls.mqtt import MqttDeviceClient, MqttOptions

    warnings = _Warnings()
    logging.getLogger("iothub_tls").addHandler(warnings)
    policy = it.TlsPolicy(roots=it.RootSet.from_pem(cfg["roots_pem"].encode()))
    options = MqttOptions(queue_size=10, connect_timeout=30, handshake_timeout=30)
    clients = [
        MqttDeviceClient.from_symmetric_key(
            cfg["host"], f"{cfg['prefix']}-{i}", KEY, policy=policy, host="127.0.0.1",
            port=cfg["port"], options=options,
        )
        for i in range(cfg["n"])
    ]  # fmt: skip

    def connect_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(CALLERS) as pool:
            list(pool.map(lambda c: c.connect(), clients))

    def connected() -> int:
        return sum(c.connected for c in clients)

    def send_all() -> Callable[[float], int]:
        futures = [c.send_telemetry_async(f"{c.device_id}".encode()) for c in clients]

        def settled(timeout: float) -> int:
            done, _ = concurrent.futures.wait(futures, timeout)
            return sum(1 for f in done if f.exception() is None)

        return settled

    result = _phases(cfg, connect_all, connected, send_all)
    result["failed_attempts"] = warnings.failed_attempts
    for c in clients:
        c.close()
    return result


# -- paho on one epoll loop, with the same back-off ----------------------------------------


def _paho(cfg: dict[str, Any]) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    import iothub_tls as it

    from ._eventloop import EventLoop

    policy = it.TlsPolicy(roots=it.RootSet.from_pem(cfg["roots_pem"].encode()))
    loop = EventLoop()
    reconnector = concurrent.futures.ThreadPoolExecutor(8)
    scheduler = _Scheduler(reconnector)
    failed = [0]
    lock = threading.Lock()

    class Device:
        def __init__(self, name: str) -> None:
            kwargs: dict[str, Any] = {"client_id": name, "clean_session": False}
            if hasattr(mqtt, "CallbackAPIVersion"):
                self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
            else:  # paho-mqtt 1.6
                self.client = mqtt.Client(**kwargs)
            self.client.tls_set_context(it.create_ssl_context(policy))
            self.client.username_pw_set(f"{cfg['host']}/{name}/?api-version=2021-04-12", "x")
            self.client.on_connect = self._on_connect
            self.client.on_disconnect = self._on_disconnect
            self.client.on_publish = self._on_publish
            self.up = threading.Event()
            self.acked: set[int] = set()
            self.attempt = 0
            self.name = name
            self.sock: Any = None

        def _on_connect(self, *args: Any) -> None:
            self.attempt = 0
            self.up.set()

        def _on_publish(self, _c: Any, _u: Any, mid: int, *rest: Any) -> None:
            self.acked.add(mid)

        def _on_disconnect(self, *args: Any) -> None:  # loop thread
            if not self.up.is_set():
                return
            self.up.clear()
            if self.sock is not None:  # paho closed it: stop watching it
                try:
                    loop._selector.unregister(self.sock)
                except (KeyError, ValueError, OSError):
                    pass
                self.sock = None
            self._schedule()

        def _watch(self) -> None:
            self.sock = self.client.socket()
            loop.add(self)

        def connect(self) -> None:
            # (keep-alive long: this loop sends no PINGREQ, the product's client does)
            self.client.connect("localhost", cfg["port"], keepalive=600)
            self._watch()
            if not self.up.wait(30):
                raise TimeoutError("no CONNACK")

        def _schedule(self) -> None:
            self.attempt += 1
            delay = it.RetryPolicy().delay(self.attempt, random.random())
            scheduler.at(time.monotonic() + delay, self._reconnect)

        def _reconnect(self) -> None:  # on a pool thread: paho's reconnect() blocks
            try:
                self.client.reconnect()
                self._watch()
            except Exception:
                with lock:
                    failed[0] += 1
                self._schedule()

        def on_readable(self) -> None:
            self.client.loop_read()
            sock = self.client.socket()
            while sock is not None and getattr(sock, "pending", lambda: 0)():
                self.client.loop_read()
                sock = self.client.socket()
            if self.client.want_write():
                self.client.loop_write()

    devices = [Device(f"{cfg['prefix']}-{i}") for i in range(cfg["n"])]

    def connect_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(CALLERS) as pool:
            list(pool.map(lambda d: d.connect(), devices))

    def connected() -> int:
        return sum(d.up.is_set() for d in devices)

    def send_all() -> Callable[[float], int]:
        mids = {d: d.client.publish(f"devices/{d.name}/messages/events/", d.name, 1).mid
                for d in devices}  # fmt: skip

        def settled(timeout: float) -> int:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = sum(1 for d, mid in mids.items() if mid in d.acked)
                if done == len(mids):
                    return done
                time.sleep(0.1)
            return sum(1 for d, mid in mids.items() if mid in d.acked)

        return settled

    result = _phases(cfg, connect_all, connected, send_all)
    result["failed_attempts"] = failed[0]
    scheduler.stop()
    reconnector.shutdown(wait=False, cancel_futures=True)
    for d in devices:
        d.up.clear()
    loop.close()
    return result


class _Scheduler:
    """Runs callables on a pool at given times, from one timer thread (a reconnection's
    back-off wait must not hold a pool thread)."""

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        import heapq

        self._heapq = heapq
        self._pool = pool
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._count = 0
        self._cond = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._run, daemon=True).start()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        with self._cond:
            self._count += 1
            self._heapq.heappush(self._due, (when, self._count, fn))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    self._pool.submit(self._heapq.heappop(self._due)[2])
                timeout = self._due[0][0] - now if self._due else None
                self._cond.wait(timeout)


# -- the phases, the same for both stacks ---------------------------------------------------


def _phases(
    cfg: dict[str, Any],
    connect_all: Callable[[], None],
    connected: Callable[[], int],
    send_all: Callable[[], Callable[[float], int]],
) -> dict[str, Any]:
    n = cfg["n"]
    rss0, threads0 = _rss_kib(), _threads()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    connect_all()
    result: dict[str, Any] = {
        "connect_wall_ms_per_device": (time.perf_counter() - wall0) * 1000 / n,
        "connect_cpu_ms_per_device": (time.process_time() - cpu0) * 1000 / n,
    }
    time.sleep(1.0)  # let the caller threads end
    result["rss_kib_per_device"] = (_rss_kib() - rss0) / n
    result["threads"] = _threads()
    result["threads_added"] = _threads() - threads0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(cfg["idle_s"])
    result["idle_core_share"] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    _emit(phase="ready")
    _expect("stopped")
    deadline = time.monotonic() + 60
    while connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    settled = send_all()
    _emit(phase="queued")
    _expect("started")
    began = time.perf_counter()
    deadline = time.monotonic() + cfg["storm_timeout"]
    while connected() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    back = connected()
    result["all_back_s"] = time.perf_counter() - began if back == n else None
    result["back"] = back
    result["storm_cpu_s"] = time.process_time()
    result["acknowledged"] = settled(60.0)
    return result


def probe() -> None:
    cfg = json.loads(sys.stdin.readline())
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = _product(cfg) if cfg["stack"] == "client" else _paho(cfg)
    _emit(phase="result", **result)


# -- the parent -----------------------------------------------------------------------------


def _broker(workdir: Path) -> Any:
    from iothub_tls.testing.brokers import Mosquitto, MosquittoListener

    from ._pki import bench_pki

    pki = bench_pki()
    cert, key = pki.rsa_leaf.write(workdir / "pki", "server")
    listeners = [MosquittoListener(tls=True, certfile=cert, keyfile=key), MosquittoListener()]
    return Mosquitto(
        listeners,
        persistence=True,
        workdir=workdir / "broker",
        extra_config=["set_tcp_nodelay true", "max_queued_messages 100000"],
    )


def _subscriber(port: int, prefix: str) -> tuple[Any, list[bytes], threading.Event]:
    import paho.mqtt.client as mqtt

    got: list[bytes] = []
    ready = threading.Event()
    kwargs: dict[str, Any] = {"client_id": f"{prefix}-observer", "clean_session": False}
    if hasattr(mqtt, "CallbackAPIVersion"):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
    else:
        client = mqtt.Client(**kwargs)

    def on_connect(c: Any, *args: Any) -> None:
        c.subscribe("devices/+/messages/events/#", 1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *args: ready.set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic.startswith(f"devices/{prefix}-"):  # this run's devices only
            got.append(bytes(msg.payload))

    client.on_message = on_message
    client.reconnect_delay_set(0.05, 0.2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client, got, ready


def measure(
    stack: str, n: int, *, idle_s: float = IDLE_S, storm_timeout: float = 180.0
) -> dict[str, Any]:
    from ._pki import HOST, bench_pki

    workdir = Path(tempfile.mkdtemp(prefix="itls-storm-"))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the broker inherits it
    broker = _broker(workdir)
    broker.start()
    prefix = f"s{random.randrange(1 << 30):x}"
    plain_port = broker.ports[1]
    observer, got, ready = _subscriber(plain_port, prefix)
    ready.wait(10)
    env = dict(os.environ, PYTHONPATH=str(_REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", "from bench.gateway import probe; probe()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=_REPO, env=env,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    cfg = {
        "stack": stack, "n": n, "port": broker.ports[0], "host": HOST, "prefix": prefix,
        "roots_pem": bench_pki().roots_pem, "idle_s": idle_s, "storm_timeout": storm_timeout,
    }  # fmt: skip
    child.stdin.write(json.dumps(cfg) + "\n")
    child.stdin.flush()
    result: dict[str, Any] = {}
    try:
        for line in child.stdout:
            event = json.loads(line)
            if event["phase"] == "ready":
                broker.stop()
                child.stdin.write("stopped\n")
                child.stdin.flush()
            elif event["phase"] == "queued":
                broker.start()
                child.stdin.write("started\n")
                child.stdin.flush()
            elif event["phase"] == "result":
                result = event
                break
        child.wait(120)
        time.sleep(1.0)
        result["received_by_subscriber"] = len(set(got))
        log = broker.log_path.read_text(errors="replace")
        lines = log.splitlines()
        errors = [i for i, line in enumerate(lines) if "protocol error" in line.lower()]
        result["broker_protocol_errors"] = len(errors)
        # the first few with the two lines before each: what the broker saw first
        result["broker_protocol_error_lines"] = [
            " | ".join(lines[max(0, i - 2) : i + 1]) for i in errors[:3]
        ]
    finally:
        if child.poll() is None:
            child.kill()
        observer.loop_stop()
        broker.stop()
    result.update(stack=stack, n=n)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,2000,5000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=IDLE_S)
    parser.add_argument("--out", type=Path, default=_REPO / "bench" / "results" / "gateway.json")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    runs = run_rounds(sizes, args.rounds, args.idle)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    headlines, tables = report(runs)
    args.out.write_text(
        json.dumps(
            {"runs": runs, "headlines": [h.__dict__ for h in headlines], "medians": tables[0].rows},
            indent=1,
        )
    )
    _summary(runs)
    for h in headlines:
        verdict = "" if h.met is None else ("  met" if h.met else "  MISSED")
        print(f"{h.measure}: {h.text()} [{h.spread()}] {h.target or ''}{verdict}")
    return 0


#: Targets of the gateway design, as (key, target text, test on the client/paho ratio).
RATIO_TARGETS: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    ("connect_cpu_ms_per_device", "client CPU per connect", "≤ 1.1x", lambda r: r <= 1.1),
    ("rss_kib_per_device", "resident memory per device", "≤ 1.0x", lambda r: r <= 1.0),
    ("all_back_s", "broker restart, time until all are back", "≤ 1.5x", lambda r: r <= 1.5),
)


def run_rounds(sizes: list[int], rounds: int, idle_s: float) -> list[dict[str, Any]]:
    """Every size, ``rounds`` times, the two stacks one after the other in each round
    (in a rotated order, so neither always runs on a warmer machine)."""
    runs: list[dict[str, Any]] = []
    for n in sizes:
        for round_ in range(rounds):
            order = STACKS if round_ % 2 == 0 else STACKS[::-1]
            for stack in order:
                result = measure(stack, n, idle_s=idle_s)
                result["round"] = round_
                runs.append(result)
                print(json.dumps(result), flush=True)
    return runs


def report(runs: list[dict[str, Any]]) -> tuple[list[Headline], list[Table]]:
    """Headlines (client/paho ratios per round, their median and spread, for each size)
    and one table of medians per size and stack."""
    headlines: list[Headline] = []
    rows: list[dict[str, Any]] = []
    for n in sorted({r["n"] for r in runs}):
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r in runs:
            if r["n"] == n:
                by_round.setdefault(r["round"], {})[r["stack"]] = r
        for key, label, target, met in RATIO_TARGETS:
            ratios = [
                pair["client"][key] / pair["paho"][key]
                for pair in by_round.values()
                if len(pair) == 2 and pair["client"].get(key) and pair["paho"].get(key)
            ]
            if ratios:
                ratio = Ratio.of(ratios)
                headlines.append(
                    Headline.of_ratio(
                        f"N={n}: {label}, client vs paho", ratio, target=target,
                        met=met(ratio.value),
                    )
                )  # fmt: skip
            else:
                headlines.append(
                    Headline(f"N={n}: {label}, client vs paho", 0.0, "x", target=target,
                             met=False, note="a stack did not finish: see the table")
                )  # fmt: skip
        client = [r for r in runs if r["n"] == n and r["stack"] == "client"]
        threads = max(r["threads"] for r in client)
        headlines.append(
            Headline(f"N={n}: client threads", threads, "threads", target="≤ 4",
                     met=threads <= 4)
        )  # fmt: skip
        idle = median(r["idle_core_share"] for r in client) * 100
        headlines.append(
            Headline(f"N={n}: client idle CPU", idle, "% of a core",
                     target="≤ 1 % at N=2000" if n == 2000 else None,
                     met=idle <= 1.0 if n == 2000 else None)
        )  # fmt: skip
        lost = sum(r["n"] - r.get("received_by_subscriber", 0) for r in client)
        errors = sum(r.get("broker_protocol_errors", 0) for r in client)
        headlines.append(
            Headline(f"N={n}: QoS 1 messages lost in the restart, client", lost, "messages",
                     target="0", met=lost == 0,
                     note=f"{errors} protocol errors in Mosquitto's log")
        )  # fmt: skip
        for stack in STACKS:
            mine = [r for r in runs if r["n"] == n and r["stack"] == stack]
            row: dict[str, Any] = {"N": n, "stack": stack, "rounds": len(mine)}
            for key in ("connect_cpu_ms_per_device", "rss_kib_per_device", "threads",
                        "idle_core_share", "all_back_s", "failed_attempts"):  # fmt: skip
                numbers = [r[key] for r in mine if isinstance(r.get(key), int | float)]
                row[key] = round(median(numbers), 4) if numbers else None
            row["lost"] = sum(r["n"] - r.get("received_by_subscriber", 0) for r in mine)
            row["protocol_errors"] = sum(r.get("broker_protocol_errors", 0) for r in mine)
            rows.append(row)
    columns = list(rows[0]) if rows else []
    return headlines, [Table("medians per size and stack", columns, rows)]


def run(smoke: bool) -> BenchResult:
    """The harness's entry (``bench/run.py``): one round at a small N; the published
    figures come from ``python -m bench.gateway`` (1,000 to 5,000 devices, 3 rounds)."""
    sizes, idle_s = ([20], 1.0) if smoke else ([200], 5.0)
    runs = run_rounds(sizes, 1, idle_s)
    headlines, tables = report(runs)
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=__doc__ or "",
        tables=tables,
        headlines=headlines,
        notes=[f"N={sizes[0]}, one round; see docs/performance.md for 1,000-5,000 devices"],
        data={"runs": runs},
    )


def _summary(runs: list[dict[str, Any]]) -> None:
    keys = ("connect_cpu_ms_per_device", "rss_kib_per_device", "threads", "idle_core_share",
            "all_back_s", "failed_attempts", "acknowledged", "received_by_subscriber",
            "broker_protocol_errors")  # fmt: skip
    for n in sorted({r["n"] for r in runs}):
        print(f"N = {n}")
        for key in keys:
            cells = []
            for stack in ("client", "paho"):
                values = [r.get(key) for r in runs if r["n"] == n and r["stack"] == stack]
                numbers = [v for v in values if isinstance(v, int | float)]
                if not numbers:
                    cells.append(f"{stack}: {values}")
                    continue
                cells.append(
                    f"{stack}: {median(numbers):.4g} [{min(numbers):.4g}-{max(numbers):.4g}]"
                    + (
                        ""
                        if len(numbers) == len(values)
                        else f" ({len(values) - len(numbers)} none)"
                    )
                )
            print(f"  {key:28} " + " | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
