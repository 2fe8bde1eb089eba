"""Native memory per handshake: a plain ``ssl.SSLContext`` against the hardened one.

A local TLS 1.3 server (a separate process, so its memory is not counted; session
tickets on, as IoT Hub sends them) takes ``--handshakes`` full connections (handshake,
read the greeting, close) from each variant:

* ``plain, fresh context``      ``ssl.create_default_context`` built for every connection
* ``plain, shared context``     one ``ssl.create_default_context`` for all
* ``hardened, fresh context``   ``create_ssl_context`` built for every connection
* ``hardened, shared context``  one ``create_ssl_context`` for all (resumes: each
  connection offers the previous session and captures the new ticket)

Each run is its own child process: ``--warmup`` handshakes first (allocator pools,
the first session), then the resident set size (``/proc/self/statm``) before and after
``--handshakes`` more, with ``gc.collect()`` at both ends. The growth divided by the
number of handshakes is the figure; it is reported per variant as the median of
``--runs`` runs with its range, the runs of the variants interleaved in rotated order.
The hardened shared context must stay at or under ``--limit`` bytes per handshake (exit
status 1 otherwise).

::

    python bench/handshake_memory.py                   # 2000 handshakes x 3 runs
    python bench/handshake_memory.py --handshakes 300 --runs 3 --json
    python bench/handshake_memory.py --tls 1.2

Nothing here imports the test suite: certificates come from ``iothub_tls.testing.pki``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/handshake_memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import summarize

HOST = "hub.iothub-tls.test"
VARIANTS = ("plain-fresh", "plain-shared", "hardened-fresh", "hardened-shared")
LABELS = {
    "plain-fresh": "plain, fresh context",
    "plain-shared": "plain, shared context",
    "hardened-fresh": "hardened, fresh context",
    "hardened-shared": "hardened, shared context",
}

# The server: one connection at a time, a greeting, then wait for the client to close.
_SERVER = r"""
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
if sys.argv[3] == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
while True:
    raw, _ = listener.accept()
    raw.settimeout(10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        with ctx.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(b"hello\n")
            while tls.recv(1024):
                pass
    except (OSError, ssl.SSLError):
        raw.close()
"""


def rss_bytes() -> int:
    """Resident set size of this process now."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource  # elsewhere: the peak, which still shows steady growth

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


# -- the child: one run of one variant ---------------------------------------------------


def _context_factory(variant: str, roots_file: str) -> Callable[[], ssl.SSLContext]:
    import iothub_tls as it

    if variant.startswith("plain"):

        def make() -> ssl.SSLContext:
            return ssl.create_default_context(cafile=roots_file)

    else:
        policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(roots_file))

        def make() -> ssl.SSLContext:
            return it.create_ssl_context(policy)

    if variant.endswith("fresh"):
        return make
    shared = make()
    return lambda: shared


def _child(variant: str, port: int, roots_file: str, warmup: int, count: int) -> dict[str, float]:
    context = _context_factory(variant, roots_file)
    resumed = 0

    def handshakes(n: int) -> None:
        nonlocal resumed
        for _ in range(n):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = context().wrap_socket(raw, server_hostname=HOST)
            tls.recv(64)  # the greeting (TLS 1.3 tickets arrive with it)
            resumed += bool(tls.session_reused)
            tls.close()

    handshakes(warmup)
    gc.collect()
    before = rss_bytes()
    began = time.perf_counter()
    resumed = 0
    handshakes(count)
    seconds = time.perf_counter() - began
    gc.collect()
    after = rss_bytes()
    return {
        "bytes_per_handshake": (after - before) / count,
        "rss_before": before,
        "rss_after": after,
        "resumed": resumed,
        "seconds": seconds,
    }


# -- the parent: server, runs, report --------------------------------------------------------


def _write_pki(directory: Path) -> tuple[str, str, str]:
    from iothub_tls.testing.pki import CertificateAuthority

    root = CertificateAuthority.root("iothub-tls Bench Memory Root")
    issuing = root.intermediate("iothub-tls Bench Memory Issuing")
    files = issuing.server(HOST).write(directory, "server")
    roots_file = directory / "root.pem"
    roots_file.write_bytes(root.issued.cert_pem)
    return str(files.certificate), str(files.private_key), str(roots_file)


def _one_run(
    variant: str, port: int, roots_file: str, args: argparse.Namespace
) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            variant,
            "--port",
            str(port),
            "--roots",
            roots_file,
            "--warmup",
            str(args.warmup),
            "--handshakes",
            str(args.handshakes),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def measure(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="itls-bench-mem-") as tmp:
        cert, key, roots_file = _write_pki(Path(tmp))
        server = subprocess.Popen(
            [sys.executable, "-c", _SERVER, cert, key, args.tls],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
            for r in range(args.runs):
                order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
                for variant in order:
                    runs[variant].append(_one_run(variant, port, roots_file, args))
                    print(
                        f"  run {r + 1}/{args.runs} {LABELS[variant]}: "
                        f"{runs[variant][-1]['bytes_per_handshake']:.0f} B/handshake",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            server.kill()
            server.wait(5)
    variants: dict[str, object] = {}
    for variant in VARIANTS:
        growth = summarize([run["bytes_per_handshake"] for run in runs[variant]])
        variants[variant] = {
            "label": LABELS[variant],
            "bytes_per_handshake": growth.as_dict(digits=1),
            "resumed_per_run": [int(run["resumed"]) for run in runs[variant]],
            "seconds_per_run": [round(run["seconds"], 2) for run in runs[variant]],
        }
    shared = runs["hardened-shared"]
    median_shared = summarize([run["bytes_per_handshake"] for run in shared]).median
    return {
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
        "tls": args.tls,
        "handshakes": args.handshakes,
        "warmup": args.warmup,
        "runs": args.runs,
        "limit_bytes_per_handshake": args.limit,
        "met": median_shared <= args.limit,
        "variants": variants,
    }


def _print_table(doc: dict[str, object]) -> None:
    print(
        f"RSS growth per handshake, Python {doc['python']}, {doc['openssl']}, TLS {doc['tls']}, "
        f"{doc['handshakes']} handshakes after {doc['warmup']} warm-up, "
        f"median of {doc['runs']} runs [min-max]"
    )
    variants = doc["variants"]
    assert isinstance(variants, dict)
    for data in variants.values():
        b = data["bytes_per_handshake"]
        resumed = "/".join(str(n) for n in data["resumed_per_run"])
        print(
            f"  {data['label']:<26} {b['median']:>8.1f} B  [{b['min']:.1f} - {b['max']:.1f}]"
            f"   resumed: {resumed}"
        )
    verdict = "met" if doc["met"] else "MISSED"
    print(f"hardened, shared context <= {doc['limit_bytes_per_handshake']} B/handshake: {verdict}")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tls", choices=("1.2", "1.3"), default="1.3")
    parser.add_argument(
        "--limit", type=float, default=512.0, help="bytes per handshake (default 512)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON document")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--roots", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 3 and args.child is None:
        parser.error("--runs must be 3 or more (medians with a spread)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        result = _child(args.child, args.port, args.roots, args.warmup, args.handshakes)
        print(json.dumps(result))
        return 0
    doc = measure(args)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_table(doc)
    return 0 if doc["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
