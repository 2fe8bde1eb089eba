"""Handshake cost, ECC vs RSA: bytes on the wire and CPU on both sides.

A server holding an RSA-2048 and an ECDSA P-256 certificate (as IoT Hub does) presents
RSA to a ``CipherProfile.STRONG`` device and ECDSA to a ``CipherProfile.ECC_ONLY`` one.
A plain ``ssl.create_default_context`` client (same roots, no policy) is the baseline
that shows what the hardened context's own checks cost. Full handshakes only
(``session_resumption=False``, no tickets from the server).

* CPU: ``time.thread_time()`` around ``wrap_socket`` (handshake plus the policy checks)
  in the client thread, and around ``do_handshake`` in the server's thread.
* Bytes: a relay that parses TLS record headers counts both directions.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import iothub_tls as it
from iothub_tls.testing.relay import RecordRelay
from iothub_tls.testing.server import HubLikeServer
from iothub_tls.tls.context import _configure

from ._pki import HOST, BenchPKI, bench_pki
from ._report import BenchResult, Headline, Table
from ._stats import Interleaved, ratio_of_runs, summarize

NAME = "handshake"
TITLE = "2. Handshake cost, ECC vs RSA"

VERSIONS = {"TLS 1.2": ssl.TLSVersion.TLSv1_2, "TLS 1.3": ssl.TLSVersion.TLSv1_3}
PLAIN, STRONG, ECC = "plain ssl (RSA)", "STRONG (RSA)", "ECC_ONLY (ECDSA)"
SETTINGS = "STRONG settings, no checks (RSA)"
# What a device can expect from the guidance's "up to 40 % less".
GUIDANCE = "≤ 60 % (guidance: up to 40 % less)"


def _contexts(pki: BenchPKI, version: ssl.TLSVersion) -> dict[str, ssl.SSLContext]:
    plain = ssl.create_default_context(cadata=pki.roots_pem)
    plain.maximum_version = version
    # The hardened context's OpenSSL settings on a plain SSLContext, without the
    # post-handshake policy checks and report: separates what each part costs.
    settings = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _configure(settings, pki.policy(max_version=version, session_resumption=False), None)
    return {
        PLAIN: plain,
        SETTINGS: settings,
        STRONG: it.create_ssl_context(pki.policy(max_version=version, session_resumption=False)),
        ECC: it.create_ssl_context(
            pki.policy(
                max_version=version, ciphers=it.CipherProfile.ECC_ONLY, session_resumption=False
            )
        ),
    }


def _sampler(ctx: ssl.SSLContext, server: HubLikeServer) -> Callable[[], dict[str, float]]:
    def sample() -> dict[str, float]:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        tls = ctx.wrap_socket(raw, server_hostname=HOST)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
        tls.close()
        seen = server.next_finished()
        if seen.error:
            raise RuntimeError(f"server side of the handshake failed: {seen.error}")
        return {"client_cpu": cpu, "server_cpu": seen.handshake_cpu, "wall": wall}

    return sample


def _wire(ctx: ssl.SSLContext, server: HubLikeServer, repeats: int) -> dict[str, Any]:
    """Bytes each way for ``repeats`` handshakes through the record-parsing relay."""
    down, up, records = [], [], []
    key = ""
    with RecordRelay(server.port) as relay:
        for i in range(repeats):
            raw = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            tls = ctx.wrap_socket(raw, server_hostname=HOST)
            if i == 0:
                key = _key_type(tls)
            tls.close()
            server.next_finished()
            relay.wait_idle()
        for c2s, s2c in relay.logs:
            up.append(c2s.total_bytes)
            down.append(s2c.total_bytes)
            records.append(len(s2c.records))
    return {"down": down, "up": up, "records": records, "server_key": key}


def _key_type(tls: ssl.SSLSocket) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    der = tls.getpeercert(binary_form=True)
    if der is None:
        return "?"
    key = x509.load_der_x509_certificate(der).public_key()
    return "ECDSA P-256" if isinstance(key, ec.EllipticCurvePublicKey) else "RSA-2048"


def run(smoke: bool) -> BenchResult:
    pki = bench_pki()
    rounds, per_round, wire_repeats = (2, 2, 2) if smoke else (20, 10, 5)
    scenarios = {
        "IoT Hub chain (ECDSA leaf under RSA root)": [pki.rsa_leaf, pki.ec_leaf],
        "all-ECC chain (ECDSA leaf under ECC root)": [pki.rsa_leaf, pki.ec_leaf_ec_chain],
    }
    rows: list[dict[str, Any]] = []
    headlines: list[Headline] = []
    data: dict[str, Any] = {}
    for scenario, certs in scenarios.items():
        with HubLikeServer(certs) as server:
            for vname, version in VERSIONS.items():
                contexts = _contexts(pki, version)
                wire = {name: _wire(ctx, server, wire_repeats) for name, ctx in contexts.items()}
                timing = Interleaved().run(
                    {name: _sampler(ctx, server) for name, ctx in contexts.items()},
                    rounds=rounds,
                    per_round=per_round,
                    warmup=2,
                )
                cell: dict[str, Any] = {}
                for name in contexts:
                    w = wire[name]
                    c = timing.summary(name, "client_cpu")
                    s = timing.summary(name, "server_cpu")
                    wall = timing.summary(name, "wall")
                    cell[name] = {
                        "server_key": w["server_key"],
                        "bytes_server_to_client": summarize(w["down"]).as_dict(digits=0),
                        "bytes_client_to_server": summarize(w["up"]).as_dict(digits=0),
                        "client_cpu_us": c.as_dict(1e6, 1),
                        "server_cpu_us": s.as_dict(1e6, 1),
                        "wall_ms": wall.as_dict(1e3, 3),
                    }
                    rows.append(
                        {
                            "chain": scenario.split(" (")[0],
                            "TLS": vname,
                            "client": name,
                            "server key": w["server_key"],
                            "server→client B": summarize(w["down"]).median,
                            "client→server B": summarize(w["up"]).median,
                            "client CPU µs (p25-p75)": _iqr(c, 1e6),
                            "server CPU µs (p25-p75)": _iqr(s, 1e6),
                            "wall ms": round(wall.median * 1e3, 2),
                        }
                    )
                bytes_ratio = ratio_of_runs(
                    list(zip(wire[ECC]["down"], wire[STRONG]["down"], strict=True))
                )
                client_ratio = timing.ratio(ECC, STRONG, "client_cpu")
                server_ratio = timing.ratio(ECC, STRONG, "server_cpu")
                hardening = timing.ratio(STRONG, PLAIN, "client_cpu")
                settings_only = timing.ratio(SETTINGS, PLAIN, "client_cpu")
                checks_us = (
                    timing.summary(STRONG, "client_cpu").median
                    - timing.summary(SETTINGS, "client_cpu").median
                ) * 1e6
                cell["ratios"] = {
                    "ecc_over_rsa_bytes_server_to_client": bytes_ratio.as_dict(),
                    "ecc_over_rsa_client_cpu": client_ratio.as_dict(),
                    "ecc_over_rsa_server_cpu": server_ratio.as_dict(),
                    "strong_over_plain_client_cpu": hardening.as_dict(),
                    "settings_only_over_plain_client_cpu": settings_only.as_dict(),
                    "policy_checks_client_cpu_us": round(checks_us, 1),
                }
                data[f"{scenario} / {vname}"] = cell
                short = "IoT Hub chain" if scenario.startswith("IoT") else "all-ECC chain"
                headlines.append(
                    Headline.of_ratio(
                        f"{vname}, {short}: ECC server→client handshake bytes, % of RSA",
                        bytes_ratio,
                        percent=True,
                        target=GUIDANCE,
                        met=bytes_ratio.value <= 0.60,
                    )
                )
                if short == "IoT Hub chain":
                    headlines.append(
                        Headline.of_ratio(
                            f"{vname}: ECC client CPU per handshake, % of RSA",
                            client_ratio,
                            percent=True,
                            target=GUIDANCE,
                            met=client_ratio.value <= 0.60,
                            note="ECDSA verify is slower than RSA verify",
                        )
                    )
                    headlines.append(
                        Headline.of_ratio(
                            f"{vname}: ECC server CPU per handshake, % of RSA",
                            server_ratio,
                            percent=True,
                            target=GUIDANCE,
                            met=server_ratio.value <= 0.60,
                        )
                    )
                    headlines.append(
                        Headline.of_ratio(
                            f"{vname}: hardened OpenSSL settings alone, client CPU vs plain ssl",
                            settings_only,
                        )
                    )
                    headlines.append(
                        Headline.of_ratio(
                            f"{vname}: whole hardened context, client CPU vs plain ssl",
                            hardening,
                            note=f"post-handshake checks + report: {checks_us:.0f} µs",
                        )
                    )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            "Loopback server holding an RSA-2048 and an ECDSA P-256 certificate that, like "
            "IoT Hub, presents RSA unless the device accepts only ECDSA. Full handshakes "
            "(`session_resumption=False`, server tickets off). CPU = `time.thread_time()` "
            "around the client's `wrap_socket` (handshake + policy checks) and the server's "
            f"`do_handshake`; {rounds} rounds x {per_round} handshakes per variant, the "
            "four clients interleaved in rotating order; medians with p25-p75. Bytes "
            f"counted by a TLS-record-parsing relay over {wire_repeats} handshakes each "
            "(identical every time)."
        ),
        tables=[
            Table(
                "Per handshake (medians)",
                [
                    "chain",
                    "TLS",
                    "client",
                    "server key",
                    "server→client B",
                    "client→server B",
                    "client CPU µs (p25-p75)",
                    "server CPU µs (p25-p75)",
                    "wall ms",
                ],
                rows,
            )
        ],
        headlines=headlines,
        data=data,
    )


def _iqr(summary: Any, scale: float) -> str:
    return f"{summary.median * scale:.0f} ({summary.p25 * scale:.0f}-{summary.p75 * scale:.0f})"
