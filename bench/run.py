"""Run the benchmarks and write ``results.md`` and ``results.json``.

::

    python -m bench.run                 # full sizes (a few minutes)
    python -m bench.run --smoke         # tiny sizes: checks the harness, numbers mean nothing
    python -m bench.run --only handshake,fragment --out /tmp/bench

Every benchmark measures its variants side by side in the same run (interleaved,
repeated, medians with their spread), so ratios hold even on a noisy machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _machine, _report

#: Benchmark modules, in report order. Each has NAME, TITLE and run(smoke) -> BenchResult.
BENCHMARKS = (
    "context_creation",
    "handshake",
    "resumption",
    "resumed_handshake",
    "fragment",
    "mqtt_throughput",
    "gateway",
    "first_puback",
    "amqp_multiplex",
)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes (CI): checks the harness only"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of: {', '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    args.chosen = [name for name in BENCHMARKS if name in chosen]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks; 0 when all ran (missed targets are results, not
    errors), 1 when one crashed (its error is in the report)."""
    args = _parse(argv)
    started = dt.datetime.now(dt.timezone.utc)
    began = time.perf_counter()
    machine = _machine.describe()
    results: list[_report.BenchResult] = []
    crashed = False
    for name in args.chosen:
        module = importlib.import_module(f"bench.{name}")
        print(f"== {module.TITLE}", flush=True)
        t0 = time.perf_counter()
        try:
            result: _report.BenchResult = module.run(args.smoke)
        except Exception as exc:
            crashed = True
            traceback.print_exc()
            result = _report.BenchResult(
                name=name, title=module.TITLE, method="", skipped=f"crashed: {exc!r}"
            )
        result.seconds = time.perf_counter() - t0
        results.append(result)
        for line in _report.summary_rows([result]):
            shown = line.get("result") or ""
            spread = f" [{line['spread']}]" if line.get("spread") else ""
            target = (
                f"  target {line['target']}: {'met' if line['met'] else 'MISSED'}"
                if line.get("target")
                else ""
            )
            print(f"   {line['measure']}: {shown}{spread}{target}", flush=True)
    machine["load average at end"] = _machine.load_average()
    md_path, json_path = _report.write(
        args.out,
        results,
        machine,
        smoke=args.smoke,
        started=started.isoformat(timespec="seconds"),
        seconds=time.perf_counter() - began,
    )
    print(f"wrote {md_path} and {json_path}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
