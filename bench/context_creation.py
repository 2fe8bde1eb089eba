"""Context creation: the pinned context loads two roots, a CA bundle ~140.

Compared: ``iothub_tls.create_ssl_context()`` (default policy, pinned to DigiCert Global
Root G2 and Microsoft RSA Root CA 2017), ``ssl.create_default_context(cafile=
certifi.where())`` (what paho / requests users typically do) and
``ssl.create_default_context()`` (the system store). Time per creation, interleaved, and
resident memory per live context measured in a fresh interpreter per variant.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import certifi

import iothub_tls as it

from ._report import BenchResult, Headline, Table
from ._stats import Interleaved

NAME = "context_creation"
TITLE = "1. Context creation"

OURS = "create_ssl_context()"
CERTIFI = "create_default_context(cafile=certifi)"
SYSTEM = "create_default_context()"

FACTORIES: dict[str, Callable[[], ssl.SSLContext]] = {
    OURS: lambda: it.create_ssl_context(),
    CERTIFI: lambda: ssl.create_default_context(cafile=certifi.where()),
    SYSTEM: lambda: ssl.create_default_context(),
}
_REPO = Path(__file__).resolve().parent.parent


def _timed(factory: Callable[[], ssl.SSLContext]) -> Callable[[], float]:
    def sample() -> float:
        began = time.perf_counter()
        factory()
        return time.perf_counter() - began

    return sample


def rss_kib() -> int:
    """Resident set size of this process (VmRSS in /proc/self/status), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_probe(variant: str, count: int) -> None:
    """Run in a fresh interpreter: print the RSS growth of ``count`` live contexts."""
    factory = FACTORIES[variant]
    factory()  # imports, lazy loads, first-use allocations
    before = rss_kib()
    kept = [factory() for _ in range(count)]
    after = rss_kib()
    print(json.dumps({"before": before, "after": after, "count": len(kept)}))


def _memory(variant: str, count: int) -> dict[str, Any]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
    )
    code = f"from bench.context_creation import memory_probe; memory_probe({variant!r}, {count})"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=_REPO,
        env=env,
        timeout=300,
        check=True,
    ).stdout
    found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    found["kib_per_context"] = (found["after"] - found["before"]) / count
    return found


def run(smoke: bool) -> BenchResult:
    rounds = 2 if smoke else 15
    per_round = {OURS: 2, CERTIFI: 1, SYSTEM: 1} if smoke else {OURS: 30, CERTIFI: 3, SYSTEM: 3}
    memory_count = 10 if smoke else 40
    timing = Interleaved().run(
        {name: _timed(f) for name, f in FACTORIES.items()},
        rounds=rounds,
        per_round=per_round,
        warmup=1,
    )
    memory = {name: _memory(name, memory_count) for name in FACTORIES}
    rows = []
    data: dict[str, Any] = {}
    for name, factory in FACTORIES.items():
        summary = timing.summary(name)
        roots = factory().cert_store_stats()["x509_ca"]
        rows.append(
            {
                "context": name,
                "roots loaded": roots,
                "µs per context (median)": round(summary.median * 1e6),
                "p25-p75 µs": f"{summary.p25 * 1e6:.0f}-{summary.p75 * 1e6:.0f}",
                "n": summary.n,
                "KiB RSS per live context": round(memory[name]["kib_per_context"], 1),
            }
        )
        data[name] = {
            "roots_loaded": roots,
            "seconds": summary.as_dict(1.0, 7),
            "memory": memory[name],
        }
    vs_certifi = timing.ratio(CERTIFI, OURS)
    vs_system = timing.ratio(SYSTEM, OURS)
    ours_kib = max(memory[OURS]["kib_per_context"], 1.0)  # RSS moves in 4 KiB pages
    mem_ratio = memory[CERTIFI]["kib_per_context"] / ours_kib
    data["ratios"] = {
        "certifi_over_ours_time": vs_certifi.as_dict(),
        "system_over_ours_time": vs_system.as_dict(),
        "certifi_over_ours_memory": round(mem_ratio, 2),
    }
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            f"{rounds} rounds; per round {per_round[OURS]} pinned contexts, "
            f"{per_round[CERTIFI]} certifi and {per_round[SYSTEM]} system contexts, in "
            "rotating order (time.perf_counter around each creation). Ratio = median "
            "of the per-round ratios of medians. Memory: a fresh "
            f"interpreter per variant creates {memory_count} contexts and keeps them; "
            "(VmRSS after - before) / count."
        ),
        tables=[
            Table(
                "Per context",
                [
                    "context",
                    "roots loaded",
                    "µs per context (median)",
                    "p25-p75 µs",
                    "n",
                    "KiB RSS per live context",
                ],
                rows,
            )
        ],
        headlines=[
            Headline.of_ratio(
                "create_ssl_context() faster than the certifi context",
                vs_certifi,
                target="≥ 20x",
                met=vs_certifi.value >= 20,
                note="parses 2 roots instead of the whole bundle",
            ),
            Headline.of_ratio("create_ssl_context() faster than the system context", vs_system),
            Headline(
                "memory per live context, certifi ÷ pinned",
                mem_ratio,
                "x",
                note=f"{memory[CERTIFI]['kib_per_context']:.0f} KiB vs {ours_kib:.0f} KiB",
            ),
        ],
        data=data,
    )
