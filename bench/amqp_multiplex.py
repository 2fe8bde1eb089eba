"""AMQP multiplexing: N SAS devices over one connection (:class:`AmqpGateway`) against N
separate device clients, side by side in one run.

::

    python -m bench.amqp_multiplex                 # N = 1000; 3 runs
    python -m bench.amqp_multiplex --smoke         # tiny sizes: checks the harness only
    python -m bench.amqp_multiplex --n 500 --runs 5 --out /tmp/mux

Three stacks, each measured in a fresh interpreter, in rotated order every run:

* ``gateway``: one :class:`iothub_tls.aio.AmqpGateway` with N devices (up to 1,000 per
  connection: one connection here);
* ``separate``: N :class:`iothub_tls.aio.AmqpDeviceClient` on the same event loop, with
  one shared :class:`~iothub_tls.aio.HandshakeGate` (the fair baseline: asyncio clients,
  no thread per connection, as the library recommends for many devices in one process);
* ``single``: one :class:`~iothub_tls.aio.AmqpDeviceClient` alone on its connection
  (the throughput reference).

The local hub (:class:`iothub_tls.hub.hub.LocalHub`) runs in a process of its own
(:func:`bench.amqp_gateway.hub_main`), so its CPU is not counted. Measured per stack:

1. TLS handshakes made to bring the N devices online (the clients' own count: a gateway
   counts its connections' handshakes; a separate client makes one per connection);
2. client CPU (``time.process_time()`` of the measuring process) from nothing to all N
   online, and RSS growth over the same span / N (``/proc/self/status``), after a
   warm-up device connected and closed (imports, first context);
3. summed telemetry throughput: every device sends ``PER_DEVICE`` messages one after
   the other, all devices at once, against ``single``: one device sending N x
   ``PER_DEVICE`` messages with ``WINDOW`` in flight;
4. the hub's AMQP door stopped and started on the same port: the time until every device
   is connected again (default ``AmqpOptions.retry``: first wait up to 0.5 s, jitter),
   and the handshakes that took.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/amqp_multiplex.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import BenchResult, Headline, Table
from bench._stats import Ratio
from bench.amqp_gateway import Hub, raise_fd_limit, restart_door, rss_kib

NAME = "amqp_multiplex"
TITLE = "AMQP multiplexing: AmqpGateway vs a client per device"

HOST = "hub.iothub-tls.test"
GATEWAY, SEPARATE, SINGLE = "gateway", "separate", "single"
STACKS = (GATEWAY, SEPARATE, SINGLE)
N = 1000
RUNS = 3
PER_DEVICE = 3
WINDOW = 100
RECOVERY_LIMIT = 180.0
_REPO = Path(__file__).resolve().parent.parent


# -- one measurement, in a fresh interpreter --------------------------------------------------


async def _all_back(devices: list[Any], since: float) -> float:
    loop = asyncio.get_running_loop()
    while True:
        if all(d.reconnect_count >= 1 and d.connected for d in devices):
            return loop.time() - since
        if loop.time() - since > RECOVERY_LIMIT:
            back = sum(1 for d in devices if d.reconnect_count >= 1 and d.connected)
            raise TimeoutError(f"only {back} of {len(devices)} devices were back in time")
        await asyncio.sleep(0.01)


async def _send_each(devices: list[Any], per_device: int) -> float:
    """Every device sends ``per_device`` messages in turn, all devices at once; msgs/s."""

    async def one(device: Any) -> None:
        for k in range(per_device):
            await device.send_telemetry(b'{"t": 21.5}', {"k": str(k)})

    began = time.perf_counter()
    await asyncio.gather(*(one(d) for d in devices))
    return len(devices) * per_device / (time.perf_counter() - began)


async def _probe(cfg: dict[str, Any]) -> dict[str, Any]:
    import iothub_tls as it
    from iothub_tls.aio import AmqpDeviceClient, AmqpGateway, HandshakeGate

    stack, n, hub = cfg["stack"], int(cfg["n"]), cfg["hub"]
    per_device, window = int(cfg["per_device"]), int(cfg["window"])
    policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(hub["root"]))
    where = {"host": "127.0.0.1", "port": hub["port"]}
    loop = asyncio.get_running_loop()
    result: dict[str, Any] = {"stack": stack, "n": n, "package": it.__file__}

    # warm-up: imports, the first context, the loop's resolver
    warm = AmqpDeviceClient.from_connection_string(hub["warm"], policy=policy, **where)
    await warm.connect()
    if stack == SINGLE:
        total = n * per_device
        began = time.perf_counter()
        pending: set[asyncio.Future[None]] = set()
        for k in range(total):
            if len(pending) >= window:
                _, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
            pending.add(asyncio.ensure_future(warm.send_telemetry(b'{"t": 21.5}', {"k": str(k)})))
        await asyncio.gather(*pending)
        result["msgs_per_s"] = total / (time.perf_counter() - began)
        await warm.close()
        return result
    await warm.close()

    gc.collect()
    rss0, cpu0, began = rss_kib(), time.process_time(), loop.time()
    gateway: Any = None
    if stack == GATEWAY:
        gateway = AmqpGateway(HOST, policy=policy, **where)
        devices = list(await asyncio.gather(*(gateway.add_device(cs) for cs in hub["devices"][:n])))
    else:
        gate = HandshakeGate()
        devices = [
            AmqpDeviceClient.from_connection_string(cs, policy=policy, gate=gate, **where)
            for cs in hub["devices"][:n]
        ]
        await asyncio.gather(*(d.connect() for d in devices))
    result["online_s"] = loop.time() - began
    result["client_cpu_ms"] = (time.process_time() - cpu0) * 1e3
    gc.collect()
    result["kib_per_device"] = (rss_kib() - rss0) / n
    handshakes = (
        (lambda: gateway.handshakes)
        if gateway is not None
        else (lambda: sum(1 + d.reconnect_count for d in devices))
    )
    result["handshakes"] = handshakes()
    try:
        result["msgs_per_s"] = await _send_each(devices, per_device)
        cpu0, began = time.process_time(), loop.time()
        result["door_restart_s"] = await asyncio.to_thread(restart_door, hub["control"])
        result["recover_s"] = await _all_back(devices, began)
        result["client_cpu_ms_reconnect"] = (time.process_time() - cpu0) * 1e3
        result["handshakes_restart"] = handshakes() - result["handshakes"]
        result["resumed"] = sum(
            1 for d in devices if d.tls_info is not None and d.tls_info.session_reused
        )
    except Exception as exc:  # the measured outcome: report it, do not crash
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if gateway is not None:
            await gateway.close()
        else:
            await asyncio.gather(*(d.close() for d in devices))
    return result


def probe() -> None:
    """Measure one stack; configuration as JSON on stdin, the result as JSON on stdout."""
    cfg = json.loads(sys.stdin.read())
    raise_fd_limit(4 * int(cfg["n"]) + 512)
    print(json.dumps(asyncio.run(_probe(cfg))))


def _measure(cfg: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", "from bench.amqp_multiplex import probe; probe()"],
        input=json.dumps(cfg),
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        env=env,
        timeout=900,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"probe {cfg['stack']} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(_REPO.resolve()):
        raise RuntimeError(f"the probe measured {result['package']}, not this tree")
    return result


# -- the run ----------------------------------------------------------------------------------


def run(
    smoke: bool = False,
    *,
    n: int | None = None,
    runs: int | None = None,
    per_device: int = PER_DEVICE,
) -> BenchResult:
    n = n or (5 if smoke else N)
    runs = runs or (1 if smoke else RUNS)
    per_device = 2 if smoke else per_device
    raise_fd_limit(4 * n + 512)
    results: dict[str, list[dict[str, Any]]] = {stack: [] for stack in STACKS}
    hub = Hub(n)
    try:
        for r in range(runs):
            order = STACKS[r % 3 :] + STACKS[: r % 3]
            for stack in order:
                cfg = {
                    "stack": stack,
                    "n": n,
                    "hub": hub.info,
                    "per_device": per_device,
                    "window": WINDOW,
                }
                measured = _measure(cfg)
                results[stack].append(measured)
                print(f"   {stack} run {r + 1}: {_brief(measured)}", flush=True)
    finally:
        hub.close()
    return _result(results, n, runs, per_device)


def _brief(m: dict[str, Any]) -> str:
    if "error" in m:
        return f"FAILED ({m['error']})"
    if m["stack"] == SINGLE:
        return f"{m['msgs_per_s']:.0f} msgs/s"
    return (
        f"{m['handshakes']} handshakes, online in {m['online_s']:.2f} s, "
        f"{m['client_cpu_ms']:.0f} ms CPU, {m['kib_per_device']:.1f} KiB/device, "
        f"{m['msgs_per_s']:.0f} msgs/s, all back in {m['recover_s']:.2f} s "
        f"({m['handshakes_restart']} handshakes)"
    )


def _cell(values: list[float], digits: int = 2) -> str:
    mid = statistics.median(values)
    return f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _ratios(top: list[dict[str, Any]], bottom: list[dict[str, Any]], key: str) -> Ratio | None:
    """Per-run ratio top[key] / bottom[key] (runs paired in order), their median."""
    pairs = [
        float(a[key]) / float(b[key])
        for a, b in zip(top, bottom, strict=False)
        if "error" not in a and "error" not in b and float(b[key]) > 0
    ]
    return Ratio.of(pairs) if pairs else None


def _result(
    results: dict[str, list[dict[str, Any]]], n: int, runs: int, per_device: int
) -> BenchResult:
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    for stack in (GATEWAY, SEPARATE):
        good = [m for m in results[stack] if "error" not in m]
        notes += [f"{stack}: a run failed: {m['error']}" for m in results[stack] if "error" in m]
        row: dict[str, Any] = {"stack": stack, "N": n, "runs": f"{len(good)}/{runs}"}
        if good:

            def col(key: str, digits: int = 2, good: list[dict[str, Any]] = good) -> str:
                return _cell([float(m[key]) for m in good], digits)

            row.update(
                {
                    "TLS handshakes": col("handshakes", 0),
                    "online s": col("online_s"),
                    "client CPU ms": col("client_cpu_ms", 0),
                    "RSS KiB/device": col("kib_per_device", 1),
                    "summed msgs/s": col("msgs_per_s", 0),
                    "all back s": col("recover_s"),
                    "handshakes on restart": col("handshakes_restart", 0),
                    "resumed": min(int(m["resumed"]) for m in good),
                }
            )
        rows.append(row)
    single = [m for m in results[SINGLE] if "error" not in m]
    rows.append(
        {
            "stack": "single device",
            "N": 1,
            "runs": f"{len(single)}/{runs}",
            "summed msgs/s": _cell([m["msgs_per_s"] for m in single], 0) if single else "-",
        }
    )
    gw, sep = results[GATEWAY], results[SEPARATE]
    headlines: list[Headline] = []
    good_gw = [m for m in gw if "error" not in m]
    good_sep = [m for m in sep if "error" not in m]
    if good_gw and good_sep:
        hs_gw = max(m["handshakes"] for m in good_gw)
        hs_sep = statistics.median(m["handshakes"] for m in good_sep)
        headlines.append(
            Headline(
                f"N={n}: TLS handshakes to bring every device online, AmqpGateway",
                hs_gw,
                "handshakes",
                target=f"1 instead of {n}",
                met=hs_gw == 1 + (n - 1) // 1000,
                note=f"separate clients: {hs_sep:.0f}",
            )
        )
    single_runs = results[SINGLE]
    compared: list[tuple[str, str, list[dict[str, Any]], list[dict[str, Any]], float | None]] = [
        ("client CPU to bring all online, separate / gateway", "client_cpu_ms", sep, gw, 10.0),
        ("RSS per device, separate / gateway", "kib_per_device", sep, gw, 5.0),
        ("summed telemetry throughput, gateway / one device", "msgs_per_s", gw, single_runs, 1.0),
        ("time until all are back after a hub restart, separate / gateway", "recover_s", sep, gw,
         None),
    ]  # fmt: skip
    for label, key, top, bottom, target in compared:
        ratio = _ratios(top, bottom, key)
        if ratio is None:
            continue
        headlines.append(
            Headline.of_ratio(
                f"N={n}: {label}",
                ratio,
                target=f">= {target:g}x" if target is not None else None,
                met=ratio.value >= target if target is not None else None,
            )
        )
    notes.append(
        "Baseline: N asyncio AmqpDeviceClient on one event loop in one process, one shared "
        "HandshakeGate, each with its own hardened context (as AmqpDeviceClient makes it); "
        "the gateway shares one context among its connections."
    )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            f"Each cell is a fresh Python process bringing N={n} SAS devices online against "
            "the local hub's AMQP door (TLS 1.3, a process of its own) on loopback: through "
            "one AmqpGateway, or as N asyncio AmqpDeviceClient on one loop (shared "
            "HandshakeGate); the reference is one device alone on its connection. "
            f"{runs} runs, stacks in rotated order; cells show the median (min-max); ratios "
            "are the median of per-run ratios. Client CPU = process CPU from nothing to all "
            "online (after a warm-up device); RSS = VmRSS growth over that span / N. "
            f"Throughput: each device sends {per_device} messages in turn, all devices at "
            f"once, vs one device sending as many with {WINDOW} in flight. Then the hub's "
            "AMQP door is stopped and started on the same port and the time until every "
            "device is connected again is measured."
        ),
        tables=[
            Table(
                "Medians (min-max)",
                [
                    "stack",
                    "N",
                    "runs",
                    "TLS handshakes",
                    "online s",
                    "client CPU ms",
                    "RSS KiB/device",
                    "summed msgs/s",
                    "all back s",
                    "handshakes on restart",
                    "resumed",
                ],
                rows,
            )
        ],
        headlines=headlines,
        notes=notes,
        data={"runs": results},
    )


def main(argv: list[str] | None = None) -> int:
    from bench import _machine, _report

    parser = argparse.ArgumentParser(prog="python -m bench.amqp_multiplex")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness")
    parser.add_argument("--n", type=int, default=None, help=f"devices (default {N})")
    parser.add_argument("--runs", type=int, default=None, help=f"runs (default {RUNS})")
    parser.add_argument(
        "--out", type=Path, default=_REPO / "bench" / "results" / NAME, help="output directory"
    )
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    began = time.perf_counter()
    result = run(args.smoke, n=args.n, runs=args.runs)
    result.seconds = time.perf_counter() - began
    md, js = _report.write(
        args.out,
        [result],
        _machine.describe(),
        smoke=args.smoke,
        started=started.isoformat(timespec="seconds"),
        seconds=result.seconds,
    )
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
