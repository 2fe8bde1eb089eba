"""A connection flood against the local hub: threads and resident memory of
``iothub-tls serve`` before, during and after N connections that never send a byte.

::

    python -m bench.hub_flood                         # 500 TLS connections, 3 rounds
    python -m bench.hub_flood --kind tcp              # silent TCP: no TLS handshake
    python -m bench.hub_flood --max-connections 100   # the door's cap (serve flag)
    python -m bench.hub_flood --json

The hub is the real command in its own process (the connection log goes to a file);
its threads and RSS are read from ``/proc/PID/status``. One round:

1. *before*: the hub is idle (one connection was made and closed before the first round);
2. *during*: N connections are opened at once on one door and held open, silent
   (``tls``: each completes its TLS handshake, then sends nothing; ``tcp``: not even a
   ClientHello). The count of connections the door refused (closed at once) is kept;
3. *after*: all are closed by the client, and the hub is given time to notice
   (until its thread count is back to the *before* count, at most ``--settle`` s).

Rounds run on the same hub, so *after* of round k against *before* of round 1 tells a
plateau (memory kept for reuse) from a leak (growing each round). The ratios are taken
per round against that round's own *before*; reported as the median over rounds with
their range.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/hub_flood.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._broker import raise_fd_limit

_REPO = Path(__file__).resolve().parent.parent


def _status(pid: int) -> tuple[int, int]:
    """(threads, RSS in KiB) of process ``pid``."""
    threads = rss = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return threads, rss


class Hub:
    """``iothub-tls serve`` in a subprocess, all three doors on free ports."""

    def __init__(self, state: Path, max_connections: int | None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        extra = ["--max-connections", str(max_connections)] if max_connections else []
        self.log = state / "connections.jsonl"
        command = [
            sys.executable, "-m", "iothub_tls", "serve", "--state", str(state),
            "--mqtt-port", "0", "--amqp-port", "0", "--https-port", "0",
            "--log", str(self.log), *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        banner = ""
        assert self.proc.stderr is not None
        while "Ctrl-C stops" not in banner:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"serve did not start:\n{banner}")
            banner += line
        self.ports = {
            name.lower(): int(port)
            for name, port in re.findall(r"^(MQTT|AMQP|HTTPS)\s+\S+:(\d+)", banner, re.M)
        }
        self.root = state / "pki" / "root.pem"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def refusals_logged(self) -> int:
        if not self.log.exists():
            return 0
        return sum(1 for line in self.log.read_text().splitlines() if "max_connections=" in line)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def _open(port: int, ctx: ssl.SSLContext | None) -> socket.socket | None:
    """One silent connection; None when the door refused it (closed at once)."""
    raw = socket.create_connection(("127.0.0.1", port), 10)
    if ctx is None:
        return raw
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except (OSError, ssl.SSLError):
        raw.close()
        return None


def _held(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the door has not closed (a refused TCP connection reads
    EOF or a reset at once)."""
    alive = 0
    for s in sockets:
        s.setblocking(False)
        try:
            data = s.recv(1)
        except (BlockingIOError, ssl.SSLWantReadError):
            alive += 1
            continue
        except OSError:
            continue
        if data:
            alive += 1
    return alive


def _settle(pid: int, threads: int, limit: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < limit:
        if _status(pid)[0] <= threads:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # let the last threads exit and free
    return time.monotonic() - began


def run(
    connections: int, rounds: int, kind: str, door: str, max_connections: int | None, settle: float
) -> dict[str, Any]:
    raise_fd_limit(connections * 2 + 256)
    with tempfile.TemporaryDirectory(prefix="hub-flood-") as tmp:
        hub = Hub(Path(tmp), max_connections)
        try:
            port = hub.ports[door]
            ctx = None
            if kind == "tls":
                ctx = ssl.create_default_context(cafile=str(hub.root))
            warm = _open(port, ssl.create_default_context(cafile=str(hub.root)))
            if warm is not None:
                warm.close()
            _settle(hub.pid, 0, 1.0)
            first_before = _status(hub.pid)
            results = []
            for _ in range(rounds):
                before = _status(hub.pid)
                began = time.monotonic()
                opened = [_open(port, ctx) for _ in range(connections)]
                open_s = time.monotonic() - began
                sockets = [s for s in opened if s is not None]
                time.sleep(0.3)
                during = _status(hub.pid)
                held = _held(sockets)
                for s in sockets:
                    s.close()
                settled = _settle(hub.pid, before[0], settle)
                after = _status(hub.pid)
                results.append(
                    {
                        "threads": [before[0], during[0], after[0]],
                        "rss_kib": [before[1], during[1], after[1]],
                        "held_open": held,
                        "refused_at_handshake": connections - len(sockets),
                        "open_s": round(open_s, 2),
                        "settle_s": round(settled, 2),
                    }
                )
            refusals = hub.refusals_logged()
        finally:
            hub.stop()
    return {
        "connections": connections,
        "kind": kind,
        "door": door,
        "max_connections": max_connections,
        "first_before": {"threads": first_before[0], "rss_kib": first_before[1]},
        "rounds": results,
        "refusals_logged": refusals,
    }


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def render(result: dict[str, Any]) -> str:
    rows = result["rounds"]
    cap = result["max_connections"] or "serve's default"
    lines = [
        f"{result['connections']} silent {result['kind'].upper()} connections on the "
        f"{result['door'].upper()} door, max-connections {cap}, {len(rows)} rounds",
        "",
        "| round | threads before / during / after | RSS MiB before / during / after "
        "| held open | refused |",
        "|---|---|---|---|---|",
    ]
    for n, r in enumerate(rows, 1):
        t, m = r["threads"], [v / 1024 for v in r["rss_kib"]]
        lines.append(
            f"| {n} | {t[0]} / {t[1]} / {t[2]} | {m[0]:.1f} / {m[1]:.1f} / {m[2]:.1f} "
            f"| {r['held_open']} | {r['refused_at_handshake']} |"
        )
    during = [r["rss_kib"][1] / r["rss_kib"][0] for r in rows]
    after = [r["rss_kib"][2] / r["rss_kib"][0] for r in rows]
    threads = [r["threads"][1] - r["threads"][0] for r in rows]
    first = result["first_before"]["rss_kib"]
    lines += [
        "",
        f"RSS during / before: {_median_range(during)}; after / before: {_median_range(after)}"
        " (median over rounds, range)",
        f"extra threads during the flood: {_median_range([float(t) for t in threads])}",
        f"RSS after the last round / before the first: {rows[-1]['rss_kib'][2] / first:.2f}",
        f"refusals in the connection log: {result['refusals_logged']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hub_flood", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kind", choices=("tls", "tcp"), default="tls")
    parser.add_argument("--door", choices=("mqtt", "amqp", "https"), default="mqtt")
    parser.add_argument(
        "--max-connections", type=int, default=None, help="passed to serve (default: its own)"
    )
    parser.add_argument(
        "--settle", type=float, default=20.0, help="seconds the hub gets to close them all"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(
        args.connections, args.rounds, args.kind, args.door, args.max_connections, args.settle
    )
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
