"""HTTPS telemetry through a faulty network: what reaches the application.

``python -m bench.https_faults`` sends ``--sends`` messages (default 1,000) with
``HttpsDeviceClient`` to the local hub's HTTPS door through
``iothub_tls.testing.faultproxy``.
Before every ``--every``-th send (default 10) the proxy arms a fault on the pooled
keep-alive connection:

* ``reset`` (default): the connection looks alive, and the client's next write on it is
  answered with a TCP RST — a NAT or load balancer that forgot an idle connection;
* ``flip``: one byte of the hub's next TLS record is inverted (the record's MAC fails).

Counted per run: sends that raised (failed sends), and among those the raw ``ssl``
exceptions (an ``ssl.SSLError`` that is not an ``IoTHubTLSError``: the library promises
none), connections the proxy accepted, and the wall time. A run without faults is
measured in the same rounds (interleaved, order rotated) as the baseline of the time
ratio. The client uses its default retry settings, as an application would.

::

    python -m bench.https_faults                    # 3 rounds of 1,000 + 1,000 sends
    python -m bench.https_faults --fault flip --rounds 5 --json
"""

from __future__ import annotations

import argparse
import collections
import json
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/https_faults.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import iothub_tls as it
from bench._pki import HOST, bench_pki
from bench._stats import Interleaved
from iothub_tls.https import HttpsDeviceClient
from iothub_tls.hub import DeviceRegistry, HttpsEndpoint, HubTlsProfile, ServerCredential
from iothub_tls.testing.faultproxy import FaultProxy

DEVICE = "bench-https-faults"


def _one_run(
    proxy: FaultProxy, cs: str, sends: int, every: int, fault: str | None
) -> dict[str, Any]:
    pki = bench_pki()
    client = HttpsDeviceClient.from_connection_string(
        cs, policy=pki.policy(), host="127.0.0.1", port=proxy.port
    )
    errors: collections.Counter[str] = collections.Counter()
    raw_ssl = failed = 0
    accepted, faults = proxy.accepted, proxy.faults
    began = time.perf_counter()
    with client:
        for n in range(1, sends + 1):
            if fault is not None and n % every == 0:
                if fault == "reset":
                    proxy.reset_on_next_request()
                else:
                    proxy.flip_next()
            try:
                client.send_telemetry(b'{"n": %d}' % n)
            except Exception as exc:  # counted: what the application would see
                failed += 1
                if isinstance(exc, ssl.SSLError) and not isinstance(exc, it.IoTHubTLSError):
                    raw_ssl += 1
                errors[f"{type(exc).__module__}.{type(exc).__name__}"] += 1
    return {
        "seconds": time.perf_counter() - began,
        "failed": failed,
        "raw_ssl": raw_ssl,
        "connections": proxy.accepted - accepted,
        "faults": proxy.faults - faults,
        "errors": dict(errors),
    }


def run(sends: int, every: int, rounds: int, fault: str) -> dict[str, Any]:
    pki = bench_pki()
    registry = DeviceRegistry(HOST)
    device = registry.add_sas_device(DEVICE)
    cs = f"HostName={HOST};DeviceId={DEVICE};SharedAccessKey={device.primary_key}"
    profile = HubTlsProfile(
        tuple(
            ServerCredential.from_pem(leaf.cert_chain_pem, leaf.key_pem)
            for leaf in (pki.rsa_leaf, pki.ec_leaf)
        )
    )
    runs: dict[str, list[dict[str, Any]]] = {"no faults": [], fault: []}
    with HttpsEndpoint(profile, registry) as endpoint, FaultProxy(endpoint.port) as proxy:

        def variant(name: str, armed: str | None) -> Any:
            def sample() -> dict[str, float]:
                result = _one_run(proxy, cs, sends, every, armed)
                runs[name].append(result)
                return {"seconds": result["seconds"]}

            return sample

        timing = Interleaved().run(
            {"no faults": variant("no faults", None), fault: variant(fault, fault)},
            rounds=rounds,
            per_round=1,
            warmup=0,
        )
        received = len(endpoint.received)
    ratio = timing.ratio(fault, "no faults", "seconds")
    return {
        "sends": sends,
        "every": every,
        "fault": fault,
        "rounds": rounds,
        "runs": runs,
        "seconds": {
            name: timing.summary(name, "seconds").as_dict() for name in ("no faults", fault)
        },
        "time_ratio": ratio.as_dict(),
        "hub_received": received,
    }


def _print(result: dict[str, Any]) -> None:
    fault = result["fault"]
    print(
        f"{result['sends']} sends per run, fault '{fault}' before every "
        f"{result['every']}th send, {result['rounds']} rounds (python {sys.version.split()[0]}, "
        f"{ssl.OPENSSL_VERSION})"
    )
    print()
    print("| variant | run | failed sends | raw ssl exceptions | connections | faults | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in result["runs"].items():
        for i, r in enumerate(runs, 1):
            print(
                f"| {name} | {i} | {r['failed']} | {r['raw_ssl']} | {r['connections']} | "
                f"{r['faults']} | {r['seconds']:.2f} |"
            )
    print()
    for name, s in result["seconds"].items():
        print(f"{name}: median {s['median']:.2f} s (min {s['min']:.2f}, max {s['max']:.2f})")
    r = result["time_ratio"]
    print(
        f"time with faults / without: {r['value']:.2f}x "
        f"(min {r['min']:.2f}x, max {r['max']:.2f}x over {r['rounds']} rounds)"
    )
    errors: collections.Counter[str] = collections.Counter()
    for run_ in result["runs"][fault]:
        errors.update(run_["errors"])
    if errors:
        print("exceptions seen by the application:", dict(errors))
    print(f"messages the hub received: {result['hub_received']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.https_faults", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sends", type=int, default=1000, help="sends per run (1000)")
    parser.add_argument("--every", type=int, default=10, help="a fault before every Nth send")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (>= 3 for a spread)")
    parser.add_argument("--fault", choices=("reset", "flip"), default="reset")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = run(args.sends, args.every, args.rounds, args.fault)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    failed = sum(r["failed"] for r in result["runs"][args.fault])
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
