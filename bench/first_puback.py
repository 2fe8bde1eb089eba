"""Process start to the first acknowledged message: the MQTT device client vs a raw paho
script, each a fresh interpreter, against the same Mosquitto over TLS.

::

    python -m bench.first_puback                  # 3 runs x 15 rounds, medians and spread
    python -m bench.first_puback --runs 5 --rounds 20 --json
    python -m bench.first_puback --importtime     # where the client's import time goes

What a device does when it boots: start Python, import the library, build the TLS
context, connect (TCP, TLS, MQTT CONNECT and the client's subscriptions) and send one
QoS 1 message, until its PUBACK is in. Two programs do it, each in a new interpreter
(``sys.executable``, no user site, this tree first on ``sys.path``) per sample:

* ``MqttDeviceClient``: ``iothub_tls.mqtt.MqttDeviceClient.from_symmetric_key(...,
  policy=TlsPolicy(roots=RootSet.from_pem_file(...)))``, ``connect()``,
  ``send_telemetry()``;
* ``raw paho``: paho-mqtt with ``ssl.create_default_context(cafile=...)`` holding the
  same roots, ``loop_start()``, ``publish(qos=1).wait_for_publish()``.

Each child reports ``time.perf_counter()`` (CLOCK_MONOTONIC, shared with the parent on
Linux) at import done, connected and PUBACK; the parent takes it just before spawning.
Per round both programs run once, in rotating order, with a bare ``python -c pass`` as
the reference for interpreter start-up. Both connect to 127.0.0.1; the broker's
certificate names the hub and ``localhost`` (paho sends the dialled name in SNI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/first_puback.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._broker import mosquitto_binary, tls_mosquitto
from bench._machine import load_average
from bench._mqtt import DEVICE_KEY
from bench._pki import HOST, LOCAL_HOST, bench_pki
from bench._report import BenchResult, Headline, Table
from bench._stats import Ratio, summarize

NAME = "first_puback"
TITLE = "7. Process start to the first PUBACK"
_REPO = Path(__file__).resolve().parent.parent

CLIENT, CLIENT_FILE, PAHO = (
    "MqttDeviceClient",
    "MqttDeviceClient, RootSet.from_pem_file",
    "raw paho",
)
PROGRAMS = (CLIENT, CLIENT_FILE, PAHO)
METRICS = ("import", "start -> connected", "start -> first PUBACK")
#: start to first PUBACK, client over raw paho (issue 14)
TARGET = 1.3

# argv: roots PEM, port, device id, hub name, dialled host, key, how the roots are loaded
_CLIENT = r"""
import sys, time
began = time.perf_counter()
from iothub_tls import RootSet, TlsPolicy
from iothub_tls.mqtt import MqttDeviceClient
imported = time.perf_counter()
roots, port, device, hub, dial, key, loading = sys.argv[1:8]
if loading == "file":
    root_set = RootSet.from_pem_file(roots)
else:  # as the shipped sets are loaded: DER blocks checked by fingerprint, not parsed
    import hashlib
    from iothub_tls.roots import pem
    ders = tuple(pem.certificate_ders(open(roots, "rb").read()))
    assert [hashlib.sha256(d).hexdigest() for d in ders] == sys.argv[8].split(",")
    root_set = RootSet._checked(ders, "bench roots")
client = MqttDeviceClient.from_symmetric_key(
    hub, device, key, policy=TlsPolicy(roots=root_set), host=dial, port=int(port)
)
client.connect()
connected = time.perf_counter()
client.send_telemetry(b'{"boot": 1}')
acked = time.perf_counter()
client.close()
import json
print(json.dumps([began, imported, connected, acked, sys.modules["iothub_tls"].__file__]))
"""

_PAHO = r"""
import sys, time
began = time.perf_counter()
import ssl, threading
import paho.mqtt.client as mqtt
imported = time.perf_counter()
roots, port, device, hub, dial, key = sys.argv[1:7]
kwargs = {"client_id": device, "clean_session": False, "protocol": mqtt.MQTTv311}
if hasattr(mqtt, "CallbackAPIVersion"):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
else:  # paho-mqtt 1.6
    client = mqtt.Client(**kwargs)
client.tls_set_context(ssl.create_default_context(cafile=roots))
client.username_pw_set(f"{hub}/{device}/?api-version=2021-04-12", key)
ready = threading.Event()
client.on_connect = lambda *args: ready.set()
client.connect(dial, int(port), keepalive=60)
client.loop_start()
if not ready.wait(10):
    raise SystemExit("no CONNACK within 10 s")
connected = time.perf_counter()
client.publish(f"devices/{device}/messages/events/", b'{"boot": 1}', qos=1).wait_for_publish(10)
acked = time.perf_counter()
client.disconnect()
client.loop_stop()
import json
print(json.dumps([began, imported, connected, acked, ""]))
"""

_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(_REPO)  # this tree ahead of site-packages
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _sample(program: str, args: list[str]) -> dict[str, float]:
    source = _PAHO if program == PAHO else _CLIENT
    spawned = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", source, *args],
        cwd=_REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the {program} program failed: {out.stderr.strip()[-2000:]}")
    began, imported, connected, acked, where = json.loads(out.stdout.strip().splitlines()[-1])
    if program != PAHO and not str(where).startswith(str(_REPO)):
        raise RuntimeError(f"the child imported {where}, not the tree under test {_REPO}")
    return {
        "import": imported - began,
        "start -> connected": connected - spawned,
        "start -> first PUBACK": acked - spawned,
    }


def _bare_python() -> float:
    spawned = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", "import time; print(repr(time.perf_counter()))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=_env(),
    )
    return float(out.stdout) - spawned


def measure(rounds: int) -> dict[str, Any]:
    """One run: a fresh broker, ``rounds`` rounds of one sample per program."""
    pki = bench_pki()
    out: dict[str, Any] = {"load_average_at_start": load_average(), "rounds": rounds}
    samples: dict[str, dict[str, list[float]]] = {p: {m: [] for m in METRICS} for p in PROGRAMS}
    ratios: dict[str, dict[str, list[float]]] = {
        p: {m: [] for m in METRICS} for p in (CLIENT, CLIENT_FILE)
    }
    bare: list[float] = []
    with tempfile.TemporaryDirectory(prefix="itls-bench-boot-") as tmp, tls_mosquitto() as broker:
        roots = Path(tmp) / "roots.pem"
        roots.write_text(pki.roots_pem)
        fingerprints = ",".join(pki.roots.fingerprints)
        n = 0

        def args(program: str) -> list[str]:
            nonlocal n
            n += 1
            device = f"boot-{os.getpid()}-{n}"
            if program == PAHO:
                return [str(roots), str(broker.port), device, HOST, LOCAL_HOST, DEVICE_KEY]
            loading = "file" if program == CLIENT_FILE else "checked"
            common = [str(roots), str(broker.port), device, HOST, "127.0.0.1", DEVICE_KEY]
            return [*common, loading, fingerprints]

        for program in PROGRAMS:  # warm-up: file cache, .pyc files
            _sample(program, args(program))
        for r in range(rounds):
            order = PROGRAMS[r % 3 :] + PROGRAMS[: r % 3]
            bare.append(_bare_python())
            taken = {program: _sample(program, args(program)) for program in order}
            for program, values in taken.items():
                for metric, value in values.items():
                    samples[program][metric].append(value)
            for program in (CLIENT, CLIENT_FILE):
                for metric in METRICS:
                    ratios[program][metric].append(taken[program][metric] / taken[PAHO][metric])
    out["load_average_at_end"] = load_average()
    out["python -c pass"] = summarize(bare).as_dict(1e3, 2)
    out["programs"] = {
        p: {m: summarize(v).as_dict(1e3, 2) for m, v in metrics.items()}
        for p, metrics in samples.items()
    }
    out["ratios"] = {
        p: {m: Ratio.of(v).as_dict() for m, v in metrics.items()} for p, metrics in ratios.items()
    }
    return out


def importtime(runs: int) -> dict[str, float]:
    """Median cumulative µs of the biggest imports of the client's program."""
    seen: dict[str, list[float]] = {}
    source = (
        "from iothub_tls import RootSet, TlsPolicy\nfrom iothub_tls.mqtt import MqttDeviceClient"
    )
    for _ in range(runs):
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", source],
            cwd=_REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stderr
        for line in err.splitlines():
            match = _IMPORTTIME.match(line)
            if match:
                seen.setdefault(match.group(4), []).append(float(match.group(2)))
    return {m: statistics.median(v) for m, v in seen.items()}


def run(smoke: bool) -> BenchResult:
    if mosquitto_binary() is None:
        return BenchResult(NAME, TITLE, "", skipped="mosquitto is not installed")
    result = measure(2 if smoke else 15)
    rows = []
    for program in PROGRAMS:
        row: dict[str, Any] = {"program": program}
        for metric in METRICS:
            s = result["programs"][program][metric]
            row[f"{metric} ms"] = f"{s['median']:.1f} ({s['p25']:.1f}-{s['p75']:.1f})"
        rows.append(row)
    headlines = []
    for program in (CLIENT, CLIENT_FILE):
        first = result["ratios"][program]["start -> first PUBACK"]
        ratio = Ratio(first["value"], first["p25"], first["p75"], first["rounds"], 0.0, 0.0)
        headlines.append(
            Headline.of_ratio(
                f"process start to first PUBACK: {program} vs raw paho",
                ratio,
                target=f"≤ {TARGET}x" if program == CLIENT else None,
                met=ratio.value <= TARGET if program == CLIENT else None,
                note="" if program == CLIENT else "custom roots are parsed and checked",
            )
        )
    imported = result["ratios"][CLIENT]["import"]
    headlines.append(
        Headline(
            "import: MqttDeviceClient vs raw paho",
            imported["value"],
            "x",
            low=imported["p25"],
            high=imported["p75"],
        )
    )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            "A fresh interpreter per sample runs a small program: import, TLS context, "
            "connect, one QoS 1 message, until its PUBACK. MqttDeviceClient: "
            "`TlsPolicy(roots=...)` with the bench roots loaded as the shipped root sets "
            "are (PEM blocks checked by SHA-256 fingerprint, not parsed: what a device on "
            "the default policy does), and again with `RootSet.from_pem_file` (custom "
            "roots, parsed and checked with cryptography); raw paho: "
            "`ssl.create_default_context(cafile=...)` holding the same roots, "
            "`loop_start()`, `wait_for_publish()`. Mosquitto on loopback, TLS listener "
            f"(RSA-2048 chain). {result['rounds']} rounds, the programs in rotating "
            "order; times from just before the parent spawns the child; ratio = median of "
            f"per-round ratios. python -c pass: {result['python -c pass']['median']:.1f} ms. "
            f"Load average {result['load_average_at_start']} at start, "
            f"{result['load_average_at_end']} at end."
        ),
        tables=[
            Table(
                "Fresh process, medians (p25-p75)",
                ["program", *(f"{m} ms" for m in METRICS)],
                rows,
            )
        ],
        headlines=headlines,
        data=result,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.first_puback", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3, help="runs, a fresh broker each (3)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per run (15)")
    parser.add_argument(
        "--importtime", type=int, default=0, metavar="N", help="also N -X importtime runs"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if mosquitto_binary() is None:
        print("mosquitto is not installed", file=sys.stderr)
        return 2
    if args.runs < 3 or args.rounds < 3:
        parser.error("--runs and --rounds must be at least 3 (medians with a spread)")
    runs = []
    for i in range(args.runs):
        one = measure(args.rounds)
        runs.append(one)
        if not args.json:
            print(
                f"run {i + 1} (load {one['load_average_at_start']} -> "
                f"{one['load_average_at_end']}; python -c pass "
                f"{one['python -c pass']['median']:.1f} ms):",
                flush=True,
            )
            for metric in METRICS:
                cells = [f"{p} {one['programs'][p][metric]['median']:.1f} ms" for p in PROGRAMS]
                shown = "; ".join(
                    f"{p} / paho {one['ratios'][p][metric]['value']:.3f} "
                    f"({one['ratios'][p][metric]['p25']:.3f}-{one['ratios'][p][metric]['p75']:.3f})"
                    for p in (CLIENT, CLIENT_FILE)
                )
                print(f"  {metric}: {', '.join(cells)}\n    {shown}", flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for program in (CLIENT, CLIENT_FILE):
        for metric in METRICS:
            values = [r["ratios"][program][metric]["value"] for r in runs]
            summary.setdefault(program, {})[metric] = {
                "median": round(statistics.median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
                "runs": values,
            }
    document: dict[str, Any] = {"summary": summary, "runs": runs}
    if args.importtime:
        document["importtime_us"] = {
            k: round(v)
            for k, v in sorted(importtime(args.importtime).items(), key=lambda x: -x[1])[:40]
        }
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"\nover {PAHO}, median of {args.runs} runs (min-max):")
    for program, metrics in summary.items():
        for metric, s in metrics.items():
            verdict = ""
            if metric == "start -> first PUBACK" and program == CLIENT:
                met = "met" if s["median"] <= TARGET else "MISSED"
                verdict = f" (target ≤ {TARGET}x: {met})"
            print(
                f"  {program}, {metric}: {s['median']:.3f}x "
                f"({s['min']:.3f}-{s['max']:.3f}){verdict}"
            )
    if args.importtime:
        print("\n-X importtime of the client's imports, median cumulative µs (top 40):")
        for module, us in document["importtime_us"].items():
            print(f"  {us:>9,} {module}".replace(",", " "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
