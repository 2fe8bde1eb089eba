"""Handshake cost with the device key in hardware: SoftHSM2 (PKCS#11 engine) and a
software TPM 2.0 (swtpm behind tpm2-abrmd, tpm2 provider), against the same key type
held in memory (``ClientIdentity.from_pem``).

Each handshake is a full mutual TLS 1.3 handshake (no resumption) with
``openssl s_server -Verify`` in another process, so this process's CPU time is the
client's: context work, the engine or provider, SoftHSM itself (a library loaded here)
and, for the TPM, the TSS and D-Bus round trips (swtpm's own work is in swtpm, and shows
in the wall time). Rounds rotate the variants; per round the cost relative to the
in-memory key is taken; medians of the rounds are reported with min-max spread.

    python -m bench.hardware_keys [--rounds 5] [--handshakes 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import iothub_tls as it
from iothub_tls.testing.hardware import SOFTHSM2_MODULE, SoftHsm, SoftwareTpm, missing_tools
from iothub_tls.testing.pki import CertificateAuthority, KeyType
from iothub_tls.testing.server import OpenSSLServer

PIN = "135790"
HOST = "localhost"


def _server(ca: CertificateAuthority) -> OpenSSLServer:
    """``openssl s_server -Verify`` (mutual TLS, echoing reversed lines), no limit on
    connections."""
    leaf = ca.server(HOST, key_type=KeyType.EC, days=1)
    return OpenSSLServer(leaf, "-rev", client_ca=ca.cert_pem, naccept=None)


def _handshakes(ctx: ssl.SSLContext, port: int, count: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per handshake, each a full one with a round trip."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        ctx.forget_sessions()  # type: ignore[attr-defined]
        with socket.create_connection(("127.0.0.1", port), 10) as raw:
            with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
                tls.sendall(b"x\n")
                tls.recv(16)
    return (time.process_time() - cpu0) / count, (time.perf_counter() - wall0) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--handshakes", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    missing = missing_tools(
        [
            "openssl",
            "softhsm2-util",
            "pkcs11-tool",
            "swtpm",
            "dbus-daemon",
            "tpm2-abrmd",
            "tpm2_getcap",
        ]
    )
    if missing:
        print(f"needs {', '.join(missing)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="itls-bench-hw-"))
    ca = CertificateAuthority.root("bench root", key_type=KeyType.EC, days=2)
    policy = it.TlsPolicy(roots=it.RootSet.from_pem(ca.issued.cert_pem))
    contexts: dict[str, ssl.SSLContext] = {}

    memory = ca.device("memory-device", key_type=KeyType.EC, days=1)
    contexts["memory"] = it.create_ssl_context(
        policy, identity=it.ClientIdentity.from_pem(memory.chain_pem, memory.key_pem)
    )

    hsm = SoftHsm(work / "softhsm")
    os.environ.update(hsm.env)
    hsm.init_token("bench", PIN)
    hsm.generate_key("bench", PIN, "iothub", "01")
    uri = "pkcs11:token=bench;object=iothub;type=private"
    chain = ca.device_from_csr(hsm.csr(uri, PIN, "softhsm-device"), days=1)
    contexts["softhsm2 (pkcs11 engine)"] = it.create_ssl_context(
        policy,
        identity=it.ClientIdentity.from_pkcs11(
            uri, certificate=list(chain), module=SOFTHSM2_MODULE, pin=PIN
        ),
    )

    tpm = SoftwareTpm(work / "tpm").start()
    server: OpenSSLServer | None = None
    try:
        os.environ.update(tpm.env)
        keyfile = tpm.generate_key(work / "tpm-key.pem")
        public = serialization.load_pem_public_key(tpm.public_key(keyfile))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        tpm_chain = ca.device_for_key("tpm-device", public, days=1)
        contexts["swtpm (tpm2 provider)"] = it.create_ssl_context(
            policy, identity=it.ClientIdentity.from_tpm2(keyfile, certificate=list(tpm_chain))
        )
        server = _server(ca)
        port = server.port
        for ctx in contexts.values():  # warm up: engine, provider, first TPM loads
            _handshakes(ctx, port, 2)
        names = list(contexts)
        cpu: dict[str, list[float]] = {n: [] for n in names}
        wall: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                c, w = _handshakes(contexts[name], port, args.handshakes)
                cpu[name].append(c)
                wall[name].append(w)
    finally:
        if server is not None:
            server.close()
        tpm.stop()

    def summary(values: list[float], scale: float = 1000.0) -> dict[str, float]:
        return {
            "median": round(statistics.median(values) * scale, 3),
            "min": round(min(values) * scale, 3),
            "max": round(max(values) * scale, 3),
        }

    result: dict[str, object] = {
        "rounds": args.rounds,
        "handshakes_per_round": args.handshakes,
        "variants": {},
    }
    variants: dict[str, object] = {}
    for name in names:
        ratios = [c / m for c, m in zip(cpu[name], cpu["memory"], strict=True)]
        variants[name] = {
            "client_cpu_ms": summary(cpu[name]),
            "wall_ms": summary(wall[name]),
            "cpu_vs_memory": summary(ratios, 1.0),
        }
    result["variants"] = variants
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"full mutual TLS 1.3 handshakes, {args.rounds} rounds x {args.handshakes}; "
            "median [min-max]"
        )
        print(f"{'variant':28} {'client CPU ms':>24} {'wall ms':>24} {'CPU vs memory':>22}")
        for name, v in variants.items():
            assert isinstance(v, dict)
            cells = [
                f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"
                for s in (v["client_cpu_ms"], v["wall_ms"], v["cpu_vs_memory"])
            ]
            print(f"{name:28} {cells[0]:>24} {cells[1]:>24} {cells[2]:>22}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
