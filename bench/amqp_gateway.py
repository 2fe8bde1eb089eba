"""AMQP gateway scale: N AMQP devices in one process against the local hub, the client on
the shared event loop against the thread-per-connection client it replaced.

::

    python -m bench.amqp_gateway                 # N = 100, 500, 1000; 3 runs each
    python -m bench.amqp_gateway --smoke         # tiny sizes: checks the harness only
    python -m bench.amqp_gateway --sizes 100,500 --runs 3 --out /tmp/amqp-gw

Two stacks, measured in the same run, interleaved:

* ``shared loop``: :class:`iothub_tls.amqp.AmqpDeviceClient` of this tree, every
  connection on the process's one I/O thread;
* ``thread per connection``: the same class as it was before (one I/O thread and one
  select loop per connection), taken from git history into a temporary directory at
  bench time (the parent of the commit that added ``iothub_tls/amqp/aio.py``, or
  ``--old-ref``) and imported from there by its measuring process only.

The local hub (:class:`iothub_tls.hub.hub.LocalHub`, certificates from
:mod:`iothub_tls.testing.pki`) runs in a process of its own, so its threads are not
counted. Each measurement runs in a fresh interpreter holding N devices (each with its
own hardened context), connected by ``WORKERS`` concurrent callers:

1. one warm-up device connects and closes (imports, the shared loop), RSS is read;
2. N devices connect; client CPU per connect = process CPU / N; RSS growth / N; the
   threads added;
3. the hub's AMQP door is stopped and started again (same port): every connection is
   cut, and the time until every device has reconnected (its ``reconnects`` count went
   up and it is connected again) is measured, with the client CPU it took. Reconnection
   waits as the default ``AmqpOptions.retry`` says (first wait up to 0.5 s, jitter).

Client CPU is ``time.process_time()`` of the measuring process; hub CPU comes from the
scheduler's accounting of the hub process; RSS from ``/proc/self/status``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import gc
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/amqp_gateway.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import BenchResult, Headline, Table

NAME = "amqp_gateway"
TITLE = "AMQP gateway scale: shared loop vs thread per connection"

HOST = "hub.iothub-tls.test"
WORKERS = 8
NEW, OLD = "shared loop", "thread per connection"
STACKS = (NEW, OLD)
SIZES = (100, 500, 1000)
RUNS = 3
RECOVERY_LIMIT = 180.0  # seconds for every device to come back after the restart
_REPO = Path(__file__).resolve().parent.parent
_MARKER = "iothub_tls/amqp/aio.py"  # added by the change from one thread per connection
_METRICS = (
    "connect_s",
    "client_cpu_ms_per_connect",
    "hub_cpu_ms_per_connect",
    "kib_per_device",
    "threads_added",
    "recover_s",
    "client_cpu_ms_per_reconnect",
)


# -- small process helpers (no dependency on tests/) -----------------------------------------


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file soft limit towards ``wanted`` (children inherit
    it); the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a process so far (all its threads), from the scheduler's nanosecond
    accounting."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


# -- the hub, in its own process --------------------------------------------------------------


def hub_main() -> None:
    """The local hub with N registered devices and a control port: configuration as
    JSON on stdin; one JSON line on stdout; then ``restart`` / ``quit`` lines on the
    control connection."""
    from iothub_tls.hub.hub import HubOptions, LocalHub

    cfg = json.loads(sys.stdin.readline())
    n = int(cfg["devices"])
    raise_fd_limit(4 * n + 512)
    options = HubOptions(
        state_dir=Path(cfg["state_dir"]),
        hostname=HOST,
        mqtt_port=None,
        amqp_port=0,
        https_port=None,
        max_connections=n + 64,
    )
    with LocalHub(options, log_stream=open(os.devnull, "w")) as hub:
        strings = []
        for i in [*range(n), "warm"]:
            device = hub.registry.add_sas_device(f"gw-{i}")
            strings.append(
                f"HostName={HOST};DeviceId=gw-{i};SharedAccessKey={device.primary_key}"
            )
        hub.registry.save()
        control = socket.create_server(("127.0.0.1", 0))
        print(
            json.dumps(
                {
                    "port": hub.ports["amqp"],
                    "control": control.getsockname()[1],
                    "root": str(hub.root_pem_path),
                    "devices": strings[:-1],
                    "warm": strings[-1],
                    "pid": os.getpid(),
                }
            ),
            flush=True,
        )
        while True:
            conn, _ = control.accept()
            with conn, conn.makefile("rw") as stream:
                command = stream.readline().strip()
                if command == "restart":
                    began = time.perf_counter()
                    door = hub.doors["amqp"]
                    door.stop()
                    door.start()
                    stream.write(json.dumps({"restart_s": time.perf_counter() - began}) + "\n")
                    stream.flush()
                elif command == "quit":
                    return


class Hub:
    """The hub process, started and stopped by the bench."""

    def __init__(self, devices: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="amqp-gw-hub-")
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from bench.amqp_gateway import hub_main; hub_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=_REPO,
            env=_env(_REPO),
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(
            json.dumps({"devices": devices, "state_dir": self._dir.name}) + "\n"
        )
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the local hub did not start (see its error output above)")
        self.info: dict[str, Any] = json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", self.info["control"]), 5) as conn:
                conn.sendall(b"quit\n")
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._dir.cleanup()


def restart_door(control_port: int) -> float:
    """Ask the hub to stop and start its AMQP door; how long that took in the hub."""
    with socket.create_connection(("127.0.0.1", control_port), 30) as conn:
        conn.sendall(b"restart\n")
        answer = conn.makefile().readline()
    return float(json.loads(answer)["restart_s"])


# -- one measurement, in a fresh interpreter --------------------------------------------------


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
    """Measure one stack at one size; configuration as JSON on stdin, the result as JSON
    on stdout. Which ``iothub_tls`` is measured depends on ``sys.path`` (set by the
    parent)."""
    import iothub_tls as it
    from iothub_tls.amqp import AmqpDeviceClient

    cfg = json.loads(sys.stdin.read())
    n, hub = int(cfg["n"]), cfg["hub"]
    raise_fd_limit(4 * n + 512)
    policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(hub["root"]))

    def make(cs: str) -> Any:
        return AmqpDeviceClient.from_connection_string(
            cs, policy=policy, host="127.0.0.1", port=hub["port"]
        )

    warm = make(hub["warm"])
    warm.connect()
    warm.close()
    result: dict[str, Any] = {"n": n, "stack": cfg["stack"], "package": it.__file__}
    with concurrent.futures.ThreadPoolExecutor(min(WORKERS, n)) as pool:
        _all(pool, lambda _: time.sleep(0.05), list(range(min(WORKERS, n))))  # start them
        gc.collect()
        rss0, threads0 = rss_kib(), threading.active_count()
        clients = [make(cs) for cs in hub["devices"][:n]]
        try:
            hub0, cpu0 = process_cpu_seconds(hub["pid"]), time.process_time()
            result["connect_s"] = _all(pool, lambda c: c.connect(), clients)
            result["client_cpu_ms_per_connect"] = (time.process_time() - cpu0) / n * 1e3
            result["hub_cpu_ms_per_connect"] = (process_cpu_seconds(hub["pid"]) - hub0) / n * 1e3
            gc.collect()
            result["kib_per_device"] = (rss_kib() - rss0) / n
            result["threads_added"] = threading.active_count() - threads0
            result["threads_total"] = threading.active_count()
            cpu0, began = time.process_time(), time.perf_counter()
            result["door_restart_s"] = restart_door(hub["control"])
            deadline = began + RECOVERY_LIMIT
            while True:
                back = sum(1 for c in clients if c.connection.reconnects >= 1 and c.connected)
                if back == n:
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(
                        f"only {back} of {n} devices were back {RECOVERY_LIMIT:g} s after the "
                        "door restarted"
                    )
                time.sleep(0.01)
            result["recover_s"] = time.perf_counter() - began
            result["client_cpu_ms_per_reconnect"] = (time.process_time() - cpu0) / n * 1e3
            result["resumed"] = sum(
                1 for c in clients if c.tls_info is not None and c.tls_info.session_reused
            )
        except Exception as exc:  # the measured outcome: report it, do not crash
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["connected_when_failed"] = sum(1 for c in clients if c.connected)
        finally:
            _all(pool, lambda c: c.close(), clients)
    print(json.dumps(result))


def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), env.get("PYTHONPATH", "")])
    return env


def _measure(stack: str, n: int, hub: dict[str, Any], old_tree: Path | None) -> dict[str, Any]:
    # The old tree comes first on the path: its iothub_tls shadows this one's.
    paths = [old_tree, _REPO] if stack == OLD and old_tree is not None else [_REPO]
    done = subprocess.run(
        [sys.executable, "-c", "from bench.amqp_gateway import probe; probe()"],
        input=json.dumps({"n": n, "stack": stack, "hub": hub}),
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),  # not the repository: only PYTHONPATH decides
        env=_env(*paths),
        timeout=900,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"probe {stack} N={n} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    expected = old_tree if stack == OLD and old_tree is not None else _REPO
    if not Path(result["package"]).resolve().is_relative_to(expected.resolve()):
        raise RuntimeError(f"probe {stack} measured {result['package']}, not {expected}")
    return result


# -- the old client, from git history ---------------------------------------------------------


def old_commit(ref: str | None) -> str:
    """The commit whose iothub_tls is the thread-per-connection client."""
    if ref is None:
        added = subprocess.run(
            ["git", "log", "--diff-filter=A", "--format=%H", "--", _MARKER],
            cwd=_REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if not added:
            raise RuntimeError(f"{_MARKER} is not in this checkout's history: pass --old-ref")
        ref = f"{added[-1]}^"
    return subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=_REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@contextlib.contextmanager
def old_tree(commit: str) -> Iterator[Path]:
    """``iothub_tls`` of ``commit`` in a temporary directory (for the probes' path)."""
    with tempfile.TemporaryDirectory(prefix="amqp-gw-old-") as tmp:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit, "iothub_tls"],
            cwd=_REPO,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


# -- the run ----------------------------------------------------------------------------------


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run(
    smoke: bool,
    sizes: tuple[int, ...] = SIZES,
    runs: int = RUNS,
    old_ref: str | None = None,
) -> BenchResult:
    if smoke:
        sizes, runs = (5,), 1
    fd_limit = raise_fd_limit(4 * max(sizes) + 512)
    notes: list[str] = []
    commit: str | None
    try:
        commit = old_commit(old_ref)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        commit = None
        notes.append(f"the thread-per-connection client could not be taken from git: {exc}")
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    stacks = STACKS if commit is not None else (NEW,)
    tree = old_tree(commit) if commit is not None else contextlib.nullcontext(None)
    with tree as old:
        hub = Hub(max(sizes))
        try:
            for n in sizes:
                for r in range(runs):
                    order = stacks if r % 2 == 0 else tuple(reversed(stacks))
                    for stack in order:
                        measured = _measure(stack, n, hub.info, old)
                        results.setdefault((stack, n), []).append(measured)
                        print(f"   {stack} N={n} run {r + 1}: {_brief(measured)}", flush=True)
        finally:
            hub.close()
    return _result(results, sizes, runs, commit, fd_limit, notes)


def _brief(m: dict[str, Any]) -> str:
    if "error" in m:
        return f"FAILED ({m['error']}; {m.get('connected_when_failed')} connected)"
    return (
        f"connect {m['connect_s']:.2f} s, {m['client_cpu_ms_per_connect']:.2f} ms CPU/connect, "
        f"{m['kib_per_device']:.0f} KiB/device, +{m['threads_added']} threads, back in "
        f"{m['recover_s']:.2f} s"
    )


def _result(
    results: dict[tuple[str, int], list[dict[str, Any]]],
    sizes: tuple[int, ...],
    runs: int,
    commit: str | None,
    fd_limit: int,
    notes: list[str],
) -> BenchResult:
    rows: list[dict[str, Any]] = []
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for (stack, n), measured in results.items():
        good = [m for m in measured if "error" not in m]
        row: dict[str, Any] = {"stack": stack, "N": n, "runs": f"{len(good)}/{len(measured)}"}
        for bad in (m for m in measured if "error" in m):
            notes.append(f"{stack}, N={n}: a run failed: {bad['error']}")
        if good:
            stats = {key: _spread([float(m[key]) for m in good]) for key in _METRICS}
            medians[(stack, n)] = {key: value[0] for key, value in stats.items()}

            def cell(key: str, digits: int = 2, stats: dict[str, Any] = stats) -> str:
                mid, low, high = stats[key]
                return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"

            row.update(
                {
                    "connect s": cell("connect_s"),
                    "client CPU ms/connect": cell("client_cpu_ms_per_connect"),
                    "hub CPU ms/connect": cell("hub_cpu_ms_per_connect"),
                    "RSS KiB/device": cell("kib_per_device", 1),
                    "threads added": cell("threads_added", 0),
                    "all back after restart s": cell("recover_s"),
                    "client CPU ms/reconnect": cell("client_cpu_ms_per_reconnect"),
                    "resumed": min(m["resumed"] for m in good),
                }
            )
        rows.append(row)
    headlines: list[Headline] = []
    for n in sizes:
        new, old = medians.get((NEW, n)), medians.get((OLD, n))
        if new is None:
            continue
        headlines.append(
            Headline(f"shared loop, N={n}: threads added", new["threads_added"], "threads")
        )
        if old is None:
            continue
        for key, label in (
            ("kib_per_device", "RSS per device"),
            ("client_cpu_ms_per_connect", "client CPU per connect"),
            ("recover_s", "time for all to come back after the door restart"),
        ):
            if old[key] > 0:
                headlines.append(
                    Headline(
                        f"N={n}: {label}, shared loop as % of thread per connection",
                        new[key] / old[key] * 100,
                        "%",
                        note=f"{new[key]:.3g} vs {old[key]:.3g}",
                    )
                )
    notes.append(
        f"Old client: iothub_tls at {commit[:12]} (git archive into a temporary directory)."
        if commit
        else "Old client: not measured."
    )
    notes.append(f"Open-file limit: {fd_limit}; {WORKERS} concurrent connect() callers.")
    notes.append(
        "Hub CPU is context, not a property of the client: the local hub serves each "
        "connection on a thread that wakes every 0.2 s, so its CPU grows with how many "
        "connections it holds and for how long, and at N=1000 the hub (one core, one "
        "handshake thread) bounds both the connect and the come-back times."
    )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            "Each cell is a fresh Python process holding N AMQP devices (SAS, CBS) connected "
            "to the local hub's AMQP door (TLS 1.3, its own process) on loopback, each device "
            f"with its own hardened context, connected by {WORKERS} concurrent callers; "
            f"{runs} runs per cell, stacks in alternating order; cells show the median "
            "(min-max). Then the hub's AMQP door is stopped and started on the same port, "
            "and the time until every device has reconnected is measured (default "
            "AmqpOptions.retry). RSS = VmRSS growth from before the N devices were made to "
            "all connected, / N; threads = threads added by the N devices."
        ),
        tables=[
            Table(
                "Medians (min-max) per cell",
                [
                    "stack",
                    "N",
                    "runs",
                    "connect s",
                    "client CPU ms/connect",
                    "hub CPU ms/connect",
                    "RSS KiB/device",
                    "threads added",
                    "all back after restart s",
                    "client CPU ms/reconnect",
                    "resumed",
                ],
                rows,
            )
        ],
        headlines=headlines,
        notes=notes,
        data={"runs": {f"{s} N={n}": v for (s, n), v in results.items()}, "old_commit": commit},
    )


def main(argv: list[str] | None = None) -> int:
    from bench import _machine, _report

    parser = argparse.ArgumentParser(prog="python -m bench.amqp_gateway", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the harness only")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="device counts")
    parser.add_argument("--runs", type=int, default=RUNS, help="runs per cell (default 3)")
    parser.add_argument("--old-ref", default=None, help="git ref of the old client's tree")
    parser.add_argument(
        "--out", type=Path, default=_REPO / "bench" / "results" / NAME, help="output directory"
    )
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    started = dt.datetime.now(dt.timezone.utc)
    began = time.perf_counter()
    result = run(args.smoke, sizes, args.runs, args.old_ref)
    result.seconds = time.perf_counter() - began
    machine = _machine.describe()
    md, js = _report.write(
        args.out,
        [result],
        machine,
        smoke=args.smoke,
        started=started.isoformat(timespec="seconds"),
        seconds=result.seconds,
    )
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
