"""``iothub-tls audit`` throughput and memory, side by side with DuckDB on the same file.

Logs of a made-up fleet (10,000 devices connecting over 30 days,
:mod:`iothub_tls.testing.fleetlogs`) are written to a temporary directory (never kept):
Azure Monitor resource logs as JSON lines, as archived
to a storage account, and the Log Analytics CSV export of a query projecting
TimeGenerated, DeviceId, Protocol, TLSVersion and CipherSuite. Each run is a fresh
process:

* ours: ``audit([file], jobs=N)`` in a new interpreter, timed around the call, with
  its peak RSS and its workers' (``getrusage``);
* DuckDB: ``read_json_auto`` (with ``json_extract_string`` on ``properties``) or
  ``read_csv_auto``, grouped by device, protocol, TLS version and suite with the count
  and the last time, in a new interpreter, timed around the query. DuckDB is only a
  yardstick: the package never imports it (``pip install 'iothub-tls[bench]'``).

Runs are interleaved (ours, DuckDB, ours with one process; the order rotates each
round); rows per second are medians over the rounds with their range, and the ratio
ours/DuckDB is the median of the per-round ratios. Target: at least 0.5x DuckDB.

    python -m bench.audit_throughput             # 1M and 10M rows (about half an hour)
    python -m bench.audit_throughput --smoke     # tiny sizes: checks the harness only
    python -m bench.audit_throughput --rows 1000000 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/audit_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _machine, _report
from bench._report import BenchResult, Headline, Table
from bench._stats import Ratio, summarize
from iothub_tls.testing.fleetlogs import (
    EXTENDED_COLUMNS,
    Fleet,
    write_azure_jsonl,
    write_kql_csv,
)

NAME = "audit_throughput"
TITLE = "Audit throughput: iothub-tls audit vs DuckDB"
_REPO = Path(__file__).resolve().parent.parent
DEVICES = 10_000
SPAN_DAYS = 30
TARGET = 0.5

FORMATS: dict[str, tuple[str, Callable[[Path, Fleet, int], Path]]] = {
    "azure-jsonl": (
        "Azure resource logs, JSON lines",
        lambda p, f, n: write_azure_jsonl(p, f, n),
    ),
    "kql-csv": (
        "Log Analytics CSV export",
        lambda p, f, n: write_kql_csv(p, f, n, EXTENDED_COLUMNS),
    ),
}

_OURS = """
import json, resource, sys, time
from iothub_tls.audit import audit
if __name__ == "__main__":
    began = time.perf_counter()
    report = audit([sys.argv[1]], jobs=int(sys.argv[2]))
    seconds = time.perf_counter() - began
    print(json.dumps({
        "seconds": seconds,
        "rows": report.rows,
        "devices": len(report.devices),
        "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "worker_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }))
"""

_DUCKDB_QUERIES = {
    "azure-jsonl": """
        SELECT d, p, v, s, count(*), max(t) FROM (
          SELECT time AS t,
                 json_extract_string(properties, '$.deviceId') AS d,
                 json_extract_string(properties, '$.protocol') AS p,
                 json_extract_string(properties, '$.tlsVersion') AS v,
                 json_extract_string(properties, '$.cipherSuite') AS s
          FROM read_json_auto(?)
          WHERE category = 'Connections' AND operationName = 'deviceConnect')
        GROUP BY ALL""",
    "kql-csv": """
        SELECT DeviceId, Protocol, TLSVersion, CipherSuite, count(*),
               max("TimeGenerated [UTC]")
        FROM read_csv_auto(?) GROUP BY ALL""",
}

_DUCKDB = """
import json, sys, time
import duckdb
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
began = time.perf_counter()
groups = con.execute(sys.argv[2], [sys.argv[1]]).fetchall()
seconds = time.perf_counter() - began
threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
print(json.dumps({"seconds": seconds, "groups": len(groups),
                  "rows": sum(g[4] for g in groups), "threads": threads}))
"""


def _python(code: str, *args: str) -> dict[str, Any]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=_REPO,
        env=env,
        timeout=3600,
        check=True,
    ).stdout
    last = [line for line in out.splitlines() if line.startswith("{")][-1]
    found: dict[str, Any] = json.loads(last)
    return found


def _spread(summary: dict[str, Any]) -> str:
    return f"{_report.fmt(summary['min'])} to {_report.fmt(summary['max'])}"


def duckdb_available() -> str | None:
    """DuckDB's version, or None when it is not installed."""
    try:
        import duckdb
    except ImportError:
        return None
    return str(duckdb.__version__)


def _measure(
    kind: str, path: Path, rows: int, rounds: int, jobs: int, with_duckdb: bool
) -> dict[str, Any]:
    variants: dict[str, Callable[[], dict[str, Any]]] = {
        f"ours, {jobs} processes": lambda: _python(_OURS, str(path), str(jobs)),
        "ours, 1 process": lambda: _python(_OURS, str(path), "1"),
    }
    if with_duckdb:
        variants["DuckDB"] = lambda: _python(_DUCKDB, str(path), _DUCKDB_QUERIES[kind])
    names = list(variants)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples[name].append(variants[name]())
    result: dict[str, Any] = {"rows": rows, "bytes": path.stat().st_size, "variants": {}}
    for name in names:
        per_second = [rows / s["seconds"] for s in samples[name]]
        result["variants"][name] = {
            "rows_per_second": summarize(per_second).as_dict(1.0, 0),
            "seconds": [round(s["seconds"], 3) for s in samples[name]],
            "samples": samples[name],
        }
        for s in samples[name]:
            if "rows" in s and s["rows"] != rows:
                raise RuntimeError(f"{name} read {s['rows']} rows of {rows}")
    if with_duckdb:
        ours = f"ours, {jobs} processes"
        ratios = [
            samples["DuckDB"][i]["seconds"] / samples[ours][i]["seconds"] for i in range(rounds)
        ]
        result["ratio"] = Ratio.of(ratios).as_dict()
        single = [
            samples["DuckDB"][i]["seconds"] / samples["ours, 1 process"][i]["seconds"]
            for i in range(rounds)
        ]
        result["ratio_one_process"] = Ratio.of(single).as_dict()
    return result


def run(smoke: bool, sizes: Sequence[int] | None = None, rounds: int | None = None) -> BenchResult:
    sizes = list(sizes or ([20_000] if smoke else [1_000_000, 10_000_000]))
    rounds = rounds or (1 if smoke else 3)
    jobs = min(os.cpu_count() or 1, 8)
    version = duckdb_available()
    devices = 200 if smoke else DEVICES
    data: dict[str, Any] = {"sizes": sizes, "rounds": rounds, "jobs": jobs, "duckdb": version}
    rows_table: list[dict[str, Any]] = []
    headlines: list[Headline] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="iothub-tls-bench-audit-") as folder:
        for kind, (label, write) in FORMATS.items():
            for size in sizes:
                path = Path(folder) / f"{kind}-{size}"
                # a month of connections, however many rows
                fleet = Fleet(devices, step=dt.timedelta(days=SPAN_DAYS) / size)
                began = time.perf_counter()
                write(path, fleet, size)
                print(
                    f"   wrote {label}, {size:,} rows, {path.stat().st_size / 2**20:,.0f} MiB "
                    f"in {time.perf_counter() - began:.0f} s",
                    flush=True,
                )
                found = _measure(kind, path, size, rounds, jobs, version is not None)
                data[f"{kind}/{size}"] = found
                path.unlink()
                for name, v in found["variants"].items():
                    rps = v["rows_per_second"]
                    sample = v["samples"][0]
                    rows_table.append(
                        {
                            "log": label,
                            "rows": size,
                            "MiB": round(found["bytes"] / 2**20),
                            "reader": name,
                            "rows/s (median)": rps["median"],
                            "rows/s min-max": _spread(rps),
                            "peak RSS MiB": round(sample["rss_kib"] / 1024)
                            if "rss_kib" in sample
                            else None,
                            "worker peak RSS MiB": round(sample["worker_rss_kib"] / 1024)
                            if sample.get("worker_rss_kib")
                            else None,
                        }
                    )
                if "ratio" in found:
                    ratio = found["ratio"]
                    headlines.append(
                        Headline(
                            measure=f"{label}, {size:,} rows: ours ({jobs} processes) / DuckDB, "
                            "rows per second",
                            value=ratio["value"],
                            unit="x",
                            low=ratio["min"],
                            high=ratio["max"],
                            target=f">= {TARGET}x",
                            met=ratio["value"] >= TARGET,
                        )
                    )
    if version is None:
        notes.append("DuckDB is not installed: pip install 'iothub-tls[bench]' for the comparison.")
    notes.append(
        "Peak RSS is the audit process's (jobs=1: the whole audit; jobs=N: the parent, "
        "and the largest worker in its own column)."
    )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            f"{rounds} interleaved rounds per file; each run a fresh interpreter. "
            f"Fleet of {devices:,} devices connecting over {SPAN_DAYS} days; files written "
            "to a temporary "
            f"directory, deleted after. Ours with {jobs} processes and with 1; DuckDB "
            f"{version or '(not installed)'} with its default threads. Spread: min-max "
            "over the rounds."
        ),
        tables=[
            Table(
                "Rows per second and memory", list(rows_table[0]) if rows_table else [], rows_table
            )
        ],
        headlines=headlines,
        notes=notes,
        data=data,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_throughput")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness")
    parser.add_argument("--rows", type=int, action="append", help="log size (repeatable)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; smoke 1)")
    parser.add_argument("--out", type=Path, default=_REPO / "bench" / "results" / NAME)
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    began = time.perf_counter()
    machine = _machine.describe()
    machine["duckdb"] = duckdb_available() or "not installed"
    result = run(args.smoke, args.rows, args.rounds)
    result.seconds = time.perf_counter() - began
    machine["load average at end"] = _machine.load_average()
    md, js = _report.write(
        args.out,
        [result],
        machine,
        smoke=args.smoke,
        started=started.isoformat(timespec="seconds"),
        seconds=result.seconds,
    )
    for line in _report.summary_rows([result]):
        print(
            f"   {line['measure']}: {line.get('result')} [{line.get('spread')}]"
            f"  target {line.get('target')}: {'met' if line.get('met') else 'MISSED'}"
        )
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
