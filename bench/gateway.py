"""Gateway scale: N concurrent device connections from one process.

A gateway holds one connection per downstream device, each with its own hardened
context (a context carries the device's identity and remembers its TLS session). Two
ways to hold them are measured:

* ``MqttDeviceClient``: the product's client, one network thread per device (its
  callback thread starts only with the first callback, and the devices here register
  none);
* ``paho + one epoll loop``: paho clients driven by a single event-loop thread
  (:mod:`bench._eventloop`), the lean way a gateway can be built on the same context.

Each measurement runs in a fresh interpreter so its resident memory says what N
connections cost and nothing else:

1. one device connects and closes (imports, first-use allocations), RSS is read;
2. N devices are made and connected concurrently (``WORKERS`` callers); setup rate =
   N / wall time; RSS growth / N = memory per connection;
3. all close, then all reconnect at once (a reconnect storm after an outage): with
   resumption the reconnects resume, without it they are full handshakes.

Client CPU is ``time.process_time()``; broker CPU comes from Mosquitto's scheduler
accounting; RSS from ``/proc/self/status``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._broker import mosquitto_binary, process_cpu_seconds, raise_fd_limit, tls_mosquitto
from ._pki import bench_pki
from ._report import BenchResult, Headline, Table

NAME = "gateway"
TITLE = "6. Gateway scale"

WORKERS = 8
CLIENT, LOOP = "MqttDeviceClient", "paho + one epoll loop"
STACKS = {CLIENT: "client", LOOP: "eventloop"}
_REPO = Path(__file__).resolve().parent.parent
_METRICS = (
    "connect_s",
    "reconnect_s",
    "kib_per_connection",
    "threads_per_connection",
    "broker_cpu_connect_s",
    "broker_cpu_reconnect_s",
    "client_cpu_connect_s",
    "client_cpu_reconnect_s",
)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


class _WarningCounter(logging.Handler):
    """Counts the client's warning messages (the cause of a failure often shows there)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen[record.getMessage()[:200]] += 1

    def most_common(self, n: int) -> list[tuple[str, int]]:
        return self.seen.most_common(n)


def _all(pool: concurrent.futures.Executor, fn: Callable[[Any], None], items: list[Any]) -> float:
    """Run ``fn`` on every item through the pool; the wall time. The first failure is
    raised after every call has finished."""
    began = time.perf_counter()
    futures = [pool.submit(fn, item) for item in items]
    concurrent.futures.wait(futures)
    elapsed = time.perf_counter() - began
    for future in futures:
        future.result()
    return elapsed


def probe() -> None:
    """One measurement, in a fresh interpreter; configuration as JSON on stdin, the
    result as JSON on stdout."""
    import iothub_tls as it

    from ._eventloop import EventLoop, PahoDevice
    from ._mqtt import device

    cfg = json.loads(sys.stdin.read())
    n, port, broker = int(cfg["n"]), int(cfg["port"]), int(cfg["broker_pid"])
    policy = it.TlsPolicy(
        roots=it.RootSet.from_pem(cfg["roots_pem"].encode()),
        session_resumption=bool(cfg["resumption"]),
    )
    run_id = secrets.token_hex(3)
    loop = EventLoop() if cfg["stack"] == "eventloop" else None
    warnings = _WarningCounter()
    logging.getLogger("iothub_tls").addHandler(warnings)

    def make(name: str) -> Any:
        if loop is not None:
            return PahoDevice(loop, port, name, policy)
        return device(port, name, policy)

    warm = make(f"gw-{run_id}-warm")
    warm.connect()
    warm.close()
    result: dict[str, Any] = {"n": n, "resumption": bool(cfg["resumption"]), "stack": cfg["stack"]}
    with concurrent.futures.ThreadPoolExecutor(min(WORKERS, n)) as pool:
        # Start every pool thread now, so they are not counted as the devices' cost.
        _all(pool, lambda _: time.sleep(0.05), list(range(min(WORKERS, n))))
        gc.collect()
        rss0 = _rss_kib()
        threads0 = threading.active_count()
        made0 = time.perf_counter()
        clients = [make(f"gw-{run_id}-{i}") for i in range(n)]
        result["create_s"] = time.perf_counter() - made0
        try:
            broker0, cpu0 = process_cpu_seconds(broker), time.process_time()
            result["connect_s"] = _all(pool, lambda c: c.connect(), clients)
            result["broker_cpu_connect_s"] = process_cpu_seconds(broker) - broker0
            result["client_cpu_connect_s"] = time.process_time() - cpu0
            gc.collect()
            result["kib_per_connection"] = (_rss_kib() - rss0) / n
            result["threads_per_connection"] = (threading.active_count() - threads0) / n
            result["close_s"] = _all(pool, lambda c: c.close(), clients)
            broker0, cpu0 = process_cpu_seconds(broker), time.process_time()
            result["reconnect_s"] = _all(pool, lambda c: c.connect(), clients)
            result["broker_cpu_reconnect_s"] = process_cpu_seconds(broker) - broker0
            result["client_cpu_reconnect_s"] = time.process_time() - cpu0
            result["resumed_on_reconnect"] = sum(
                1 for c in clients if c.tls_info is not None and c.tls_info.session_reused
            )
        except Exception as exc:  # the measured outcome: report it, do not crash
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["connected_when_failed"] = sum(
                1 for c in clients if getattr(c, "connected", c.tls_info is not None)
            )
            result["open_fds"] = len(os.listdir("/proc/self/fd"))
            result["warnings"] = warnings.most_common(3)
        for c in clients:
            try:
                c.close()
            except Exception:  # best effort after a failure
                continue
    if loop is not None:
        loop.close()
    print(json.dumps(result))


def _measure(port: int, broker_pid: int, n: int, stack: str, resumption: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    config = {
        "n": n,
        "port": port,
        "broker_pid": broker_pid,
        "stack": stack,
        "resumption": resumption,
        "roots_pem": bench_pki().roots_pem,
    }
    done = subprocess.run(
        [sys.executable, "-c", "from bench.gateway import probe; probe()"],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        cwd=_REPO,
        env=env,
        timeout=300,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"gateway probe N={n} {stack} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def _cause(bad: dict[str, Any]) -> str:
    """The error, and the client's most frequent warning (often the real cause)."""
    text = f"{_first_line(str(bad.get('error', '?')))[:120]}"
    warnings = bad.get("warnings") or []
    if warnings:
        message, count = warnings[0]
        text += f"; logged {count}x: {message!r}"
    return text + f"; {bad.get('open_fds', '?')} descriptors open"


def run(smoke: bool) -> BenchResult:
    if mosquitto_binary() is None:
        return BenchResult(NAME, TITLE, "", skipped="mosquitto is not installed")
    plan = {3: 1} if smoke else {10: 3, 100: 2, 500: 1}
    fd_limit = raise_fd_limit(max(plan) * 4 + 256)
    runs: dict[tuple[str, int, bool], list[dict[str, Any]]] = {}
    cells = [(stack, res) for stack in STACKS for res in (True, False)]
    with tls_mosquitto() as broker:
        assert broker.pid is not None
        for n, repeats in plan.items():
            for r in range(repeats):
                order = cells if r % 2 == 0 else list(reversed(cells))
                for stack, resumption in order:
                    runs.setdefault((stack, n, resumption), []).append(
                        _measure(broker.port, broker.pid, n, STACKS[stack], resumption)
                    )
    rows: list[dict[str, Any]] = []
    summary: dict[tuple[str, int, bool], dict[str, float]] = {}
    failures: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for (stack, n, resumption), results in runs.items():
        good = [r for r in results if "error" not in r]
        if len(good) < len(results):
            failures[(stack, n, resumption)] = next(r for r in results if "error" in r)
        row: dict[str, Any] = {"stack": stack, "N": n, "resumption": resumption}
        if not good:
            bad = failures[(stack, n, resumption)]
            row["connect /s"] = f"FAILED after {bad.get('connected_when_failed', '?')} devices"
            rows.append(row)
            continue
        m = {key: _median([r[key] for r in good]) for key in _METRICS}
        m["create_s"] = _median([r["create_s"] for r in good])
        summary[(stack, n, resumption)] = m
        resumed = min(r["resumed_on_reconnect"] for r in good) / n
        row.update(
            {
                "runs": len(good),
                "connect /s": round(n / m["connect_s"]),
                "reconnect /s": round(n / m["reconnect_s"]),
                "reconnects resumed": f"{resumed:.0%}",
                "KiB RSS per connection": round(m["kib_per_connection"], 1),
                "threads per connection": round(m["threads_per_connection"], 2),
                "client CPU ms per connect": round(m["client_cpu_connect_s"] / n * 1e3, 2),
                "broker CPU ms per connect": round(m["broker_cpu_connect_s"] / n * 1e3, 2),
                "client CPU ms per reconnect": round(m["client_cpu_reconnect_s"] / n * 1e3, 2),
                "broker CPU ms per reconnect": round(m["broker_cpu_reconnect_s"] / n * 1e3, 2),
            }
        )
        rows.append(row)
    headlines = _headlines(plan, summary, failures)
    notes = _notes(plan, summary, failures, fd_limit)
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            "Each cell is a fresh Python process holding N device connections to Mosquitto "
            "(TLS 1.3, RSA-2048 chain) on loopback, each device with its own hardened "
            f"context, connected by {WORKERS} concurrent callers; runs per cell: "
            + ", ".join(f"N={n}: {r}" for n, r in plan.items())
            + " (cells in alternating order). Connect = each device's first connection "
            "(a full handshake: a new context has no session); reconnect = all devices "
            "close, then reconnect at once. RSS = VmRSS growth from before the N devices "
            "were made to all connected, / N. Client CPU = `time.process_time()` of the "
            "gateway process; broker CPU = Mosquitto's `/proc/PID/task/*/schedstat`."
        ),
        tables=[
            Table(
                "Medians per cell",
                [
                    "stack",
                    "N",
                    "resumption",
                    "runs",
                    "connect /s",
                    "reconnect /s",
                    "reconnects resumed",
                    "KiB RSS per connection",
                    "threads per connection",
                    "client CPU ms per connect",
                    "broker CPU ms per connect",
                    "client CPU ms per reconnect",
                    "broker CPU ms per reconnect",
                ],
                rows,
            )
        ],
        headlines=headlines,
        notes=notes,
        data={
            "runs": {f"{s} N={n} resumption={r}": v for (s, n, r), v in runs.items()},
            "medians": {f"{s} N={n} resumption={r}": v for (s, n, r), v in summary.items()},
        },
    )


def _headlines(
    plan: dict[int, int],
    summary: dict[tuple[str, int, bool], dict[str, float]],
    failures: dict[tuple[str, int, bool], dict[str, Any]],
) -> list[Headline]:
    out: list[Headline] = []
    biggest = max(plan)
    for stack in STACKS:
        for resumption in (True, False):
            key = (stack, biggest, resumption)
            label = f"{stack}, N={biggest}, {'with' if resumption else 'without'} resumption"
            if key not in summary:
                bad = failures.get(key, {})
                out.append(
                    Headline(
                        f"{label}: devices connected before the client failed",
                        float(bad.get("connected_when_failed", 0)),
                        "devices",
                        target=f"{biggest}",
                        met=False,
                        note=_cause(bad),
                    )
                )
                continue
            m = summary[key]
            out.append(
                Headline(
                    f"{label}: first-connect rate",
                    biggest / m["connect_s"],
                    "conn/s",
                    note=f"reconnect storm {biggest / m['reconnect_s']:.0f} conn/s",
                )
            )
            out.append(
                Headline(f"{label}: resident memory per connection", m["kib_per_connection"], "KiB")
            )
    for stack in STACKS:
        on, off = summary.get((stack, biggest, True)), summary.get((stack, biggest, False))
        if on and off:
            out.append(
                Headline(
                    f"{stack}, N={biggest}: reconnect storm time, resumed % of full",
                    on["reconnect_s"] / off["reconnect_s"] * 100,
                    "%",
                    note=(
                        "broker CPU per reconnect "
                        f"{on['broker_cpu_reconnect_s'] / biggest * 1e3:.2f} vs "
                        f"{off['broker_cpu_reconnect_s'] / biggest * 1e3:.2f} ms"
                    ),
                )
            )
    return out


def _notes(
    plan: dict[int, int],
    summary: dict[tuple[str, int, bool], dict[str, float]],
    failures: dict[tuple[str, int, bool], dict[str, Any]],
    fd_limit: int,
) -> list[str]:
    notes: list[str] = []
    sizes = sorted(plan)
    for stack in STACKS:
        for resumption in (True, False):
            have = [n for n in sizes if (stack, n, resumption) in summary]
            if len(have) < 2:
                continue
            lo_n, hi_n = have[0], have[-1]
            lo, hi = summary[(stack, lo_n, resumption)], summary[(stack, hi_n, resumption)]
            per_lo, per_hi = lo["connect_s"] / lo_n * 1e3, hi["connect_s"] / hi_n * 1e3
            notes.append(
                f"{stack}, {'with' if resumption else 'without'} resumption, N={lo_n} → "
                f"N={hi_n}: wall time per connection {per_lo:.2f} → {per_hi:.2f} ms, "
                f"memory per connection {lo['kib_per_connection']:.0f} → "
                f"{hi['kib_per_connection']:.0f} KiB."
            )
    for (stack, n, resumption), bad in sorted(failures.items()):
        notes.append(
            f"{stack}, N={n}, resumption={resumption} failed after "
            f"{bad.get('connected_when_failed', '?')} devices connected: {_cause(bad)}."
        )
    notes.append(
        f"Open-file limit during the run: {fd_limit}; {WORKERS} concurrent connect() callers."
    )
    return notes
