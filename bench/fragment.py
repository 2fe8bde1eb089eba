"""Max fragment length (RFC 6066): record sizes and bytes on the wire for 64 KiB.

The promise: with ``max_fragment_length=N`` the server never sends a record carrying
more than N bytes of plaintext, so a device can receive with an N-byte buffer instead of
16 KiB. The price: one record header, nonce and tag per N bytes. A relay parsing the TLS
record headers (RFC 8446 5.1) sees the truth on the wire.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import iothub_tls as it
from iothub_tls.testing.relay import RecordRelay
from iothub_tls.testing.server import HubLikeServer

from ._pki import HOST, bench_pki
from ._report import BenchResult, Headline, Table

NAME = "fragment"
TITLE = "4. Max fragment length"

PAYLOAD = 64 * 1024
LENGTHS: tuple[int | None, ...] = (None, 4096, 2048, 1024, 512)
VERSIONS = {"TLS 1.2": ssl.TLSVersion.TLSv1_2, "TLS 1.3": ssl.TLSVersion.TLSv1_3}
# AEAD expansion per record: TLS 1.2 GCM 8-byte explicit nonce + 16-byte tag; TLS 1.3
# 1-byte inner content type + 16-byte tag (+ up to 255 padding, OpenSSL sends none).
_MAX_EXPANSION = 64


def _transfer(ctx: ssl.SSLContext, server: HubLikeServer, expect: int) -> tuple[Any, Any, Any]:
    with RecordRelay(server.port) as relay:
        raw = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        tls = ctx.wrap_socket(raw, server_hostname=HOST)
        got = 0
        while got < expect:
            chunk = tls.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection closed after {got} of {expect} bytes")
            got += len(chunk)
        info = it.tls_info(tls)
        tls.close()
        server.next_finished()
        relay.wait_idle()
        _, down = relay.logs[0]
    return down, info, got


def run(smoke: bool) -> BenchResult:
    pki = bench_pki()
    repeats = 1 if smoke else 3
    rows: list[dict[str, Any]] = []
    headlines: list[Headline] = []
    data: dict[str, Any] = {}
    with (
        HubLikeServer([pki.rsa_leaf], payload=b"\x5a" * PAYLOAD) as bulk,
        HubLikeServer([pki.rsa_leaf]) as empty,
    ):
        for vname, version in VERSIONS.items():
            baseline_wire = None
            baseline_largest = 0
            for mfl in LENGTHS:
                ctx = it.create_ssl_context(
                    pki.policy(
                        max_version=version, max_fragment_length=mfl, session_resumption=False
                    )
                )
                totals, handshakes, largest, records = set(), set(), set(), set()
                negotiated = None
                for _ in range(repeats):
                    down, info, _got = _transfer(ctx, bulk, PAYLOAD)
                    hs_down, _, _ = _transfer(ctx, empty, 0)
                    negotiated = info.max_fragment_length
                    totals.add(down.total_bytes)
                    handshakes.add(hs_down.total_bytes)
                    largest.add(down.largest_record)
                    records.add(len(down.records) - len(hs_down.records))
                total, handshake = max(totals), max(handshakes)
                wire = total - handshake  # what the 64 KiB cost on the wire
                if mfl is None:
                    baseline_wire = wire
                    baseline_largest = max(largest)
                assert baseline_wire is not None
                overhead = (wire - PAYLOAD) / PAYLOAD * 100
                extra = (wire - baseline_wire) / baseline_wire * 100
                row = {
                    "TLS": vname,
                    "max_fragment_length": mfl or "none",
                    "negotiated": negotiated or "none",
                    "largest record B (length field)": max(largest),
                    "data records": max(records),
                    "wire B for 64 KiB": wire,
                    "overhead vs payload": f"{overhead:.2f} %",
                    "vs none": f"{extra:+.2f} %",
                    "server→client B total": total,
                    "stable": len(totals) == 1 and len(largest) == 1,
                }
                rows.append(row)
                data[f"{vname} / {mfl or 'none'}"] = {
                    "negotiated": negotiated,
                    "largest_record": max(largest),
                    "data_records": max(records),
                    "wire_bytes_for_payload": wire,
                    "handshake_bytes": handshake,
                    "total_bytes": total,
                    "overhead_percent_of_payload": round(overhead, 3),
                    "extra_percent_vs_none": round(extra, 3),
                    "repeats": repeats,
                    "identical_across_repeats": len(totals) == 1 and len(largest) == 1,
                }
                if mfl == 512:
                    bound = mfl + _MAX_EXPANSION
                    headlines.append(
                        Headline(
                            f"{vname}, max_fragment_length=512: largest record on the wire",
                            float(max(largest)),
                            "B",
                            target=f"≤ {bound} B (512 + AEAD expansion)",
                            met=negotiated == 512 and max(largest) <= bound,
                            note=f"{baseline_largest} B without max_fragment_length",
                        )
                    )
                    headlines.append(
                        Headline(
                            f"{vname}, max_fragment_length=512: extra bytes for 64 KiB vs none",
                            extra,
                            "%",
                            note="one header + nonce/tag per 512 B",
                        )
                    )
    return BenchResult(
        name=NAME,
        title=TITLE,
        method=(
            "A 64 KiB transfer from a loopback TLS server (RSA-2048 certificate) to a "
            "hardened client asking for each max_fragment_length, through a relay that "
            "parses the TLS record headers. 'wire B for 64 KiB' = server→client bytes of the "
            "transfer minus those of a handshake-only connection with the same settings. "
            f"Each cell measured {repeats}x (byte counts are deterministic; 'stable' says "
            "they were identical)."
        ),
        tables=[
            Table(
                "64 KiB server→client",
                [
                    "TLS",
                    "max_fragment_length",
                    "negotiated",
                    "largest record B (length field)",
                    "data records",
                    "wire B for 64 KiB",
                    "overhead vs payload",
                    "vs none",
                    "server→client B total",
                    "stable",
                ],
                rows,
            )
        ],
        headlines=headlines,
        data=data,
    )
