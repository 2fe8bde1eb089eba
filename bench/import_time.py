"""Start-up cost of iothub-tls: ``import iothub_tls``, process start to a ready context,
process start to the first handshake; optionally against another git revision.

::

    python bench/import_time.py                        # this tree
    python bench/import_time.py --baseline main        # this tree and main, interleaved
    python bench/import_time.py --baseline b9f6805 --rounds 40 --json

Every sample is a fresh interpreter (``sys.executable``, no user site, the tree under
test first on ``sys.path``, checked by where ``iothub_tls`` came from), so nothing is
cached in ``sys.modules``; the
operating system's file cache is warm after the first round, as it is on a device that
starts its application again. Per round, every tree is measured once, in rotating
order, with a bare ``python -c pass`` as the reference for interpreter start-up.

Measured in each child (``time.perf_counter`` is CLOCK_MONOTONIC, shared by parent
and child on Linux):

* ``import``: around ``import iothub_tls`` inside the child;
* ``start -> context``: from just before the parent spawns the child until
  ``create_ssl_context()`` (default policy) has returned in it;
* ``start -> first handshake``: the same child then loads a private root from a PEM file,
  makes a context for it, connects to a loopback TLS server run by this script and
  reads ``tls_info()``: the whole path of a device to its first connection;
* ``x509 later``: what ``import cryptography.x509`` still costs after
  ``import iothub_tls``, i.e. the part of the import that a lazy tree moves to the first
  certificate it parses (near zero for a tree that imports it eagerly).

``-X importtime`` runs (``--attribution``, 5 by default) say where the import time of
each tree goes: the median cumulative time of the biggest entries is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/import_time.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import Ratio, summarize

_REPO = Path(__file__).resolve().parent.parent
# tarfile's extraction filters exist from 3.10.12 / 3.11.4 on
_SAFE_EXTRACT: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_HOST = "import-time.iothub-tls.test"

_CHILD = """
import sys, time
began = time.perf_counter()
import iothub_tls as it
imported = time.perf_counter()
ctx = it.create_ssl_context()
context_ready = time.perf_counter()
import socket
policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(sys.argv[1]))
with socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=10) as raw:
    with it.create_ssl_context(policy).wrap_socket(raw, server_hostname=sys.argv[3]) as tls:
        info = it.tls_info(tls)
handshake_done = time.perf_counter()
assert info.anchor == "iothub-tls import-time root", info
import json
print(json.dumps([began, imported, context_ready, handshake_done, it.__file__]))
"""
_X509_LATER = """
import time
import iothub_tls
began = time.perf_counter()
import cryptography.x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
print(repr(time.perf_counter() - began))
"""
METRICS = ("import", "start -> context", "start -> first handshake", "x509 later")


@dataclass(frozen=True)
class _Target:
    """The loopback TLS server the children connect to, and the root they pin."""

    root_file: Path
    port: int


@contextmanager
def _server(directory: Path) -> Iterator[_Target]:
    """A TLS server that completes handshakes (one thread per connection)."""
    from iothub_tls.testing.pki import CertificateAuthority, KeyType
    from iothub_tls.testing.server import TLSServer

    root = CertificateAuthority.root("iothub-tls import-time root", days=2)
    root_file = directory / "root.pem"
    root_file.write_bytes(root.cert_pem)
    with TLSServer([root.server(_HOST, key_type=KeyType.EC, days=1)], payload=b"") as server:
        yield _Target(root_file, server.port)


@contextmanager
def _tree(revision: str) -> Iterator[Path]:
    """The package tree of a git revision, extracted into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="itls-import-") as tmp:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", revision, "iothub_tls"],
            cwd=_REPO,
            capture_output=True,
            check=True,
        ).stdout
        tar_path = Path(tmp) / "tree.tar"
        tar_path.write_bytes(archive)
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, **_SAFE_EXTRACT)
        yield Path(tmp)


@contextmanager
def _baseline_tree(revision: str | None) -> Iterator[Path | None]:
    if revision is None:
        yield None
        return
    with _tree(revision) as tree:
        yield tree


def _env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(tree)  # ahead of site-packages (and of an editable install)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _sample(tree: Path, server: _Target) -> dict[str, float]:
    spawned = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(server.root_file), str(server.port), _HOST],
        cwd=tree,
        env=_env(tree),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the child failed in {tree}: {out.stderr.strip()}")
    began, imported, context_ready, handshake_done, where = json.loads(out.stdout)
    if not str(where).startswith(str(tree)):
        raise RuntimeError(f"the child imported {where}, not the tree under test {tree}")
    later = subprocess.run(
        [sys.executable, "-c", _X509_LATER],
        cwd=tree,
        env=_env(tree),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {
        "import": imported - began,
        "start -> context": context_ready - spawned,
        "start -> first handshake": handshake_done - spawned,
        "x509 later": float(later.stdout.strip()),
    }


def _bare_python() -> float:
    spawned = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", "import time; print(repr(time.perf_counter()))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=_env(_REPO),
    )
    return float(out.stdout) - spawned


_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _attribution(tree: Path, runs: int) -> dict[str, float]:
    """Median cumulative µs per module over ``runs`` ``-X importtime`` runs."""
    seen: dict[str, list[float]] = {}
    for _ in range(runs):
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import iothub_tls"],
            cwd=tree,
            env=_env(tree),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stderr
        for line in err.splitlines():
            match = _IMPORTTIME.match(line)
            if match:
                seen.setdefault(match.group(4), []).append(float(match.group(2)))
    return {module: statistics.median(values) for module, values in seen.items()}


_WATCHED = (
    "iothub_tls",
    "iothub_tls.auth",
    "iothub_tls.auth.identity",
    "iothub_tls.roots",
    "iothub_tls.policy",
    "iothub_tls.tls",
    "iothub_tls.tls.info",
    "iothub_tls._io.backoff",
    "iothub_tls.device",
    "cryptography.x509",
    "cryptography.hazmat.primitives.serialization",
    "importlib.resources",
    "ssl",
    "logging",
)


def measure(trees: dict[str, Path], rounds: int, attribution_runs: int) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {name: {m: [] for m in METRICS} for name in trees}
    bare: list[float] = []
    per_round: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="itls-import-srv-") as tmp:
        with _server(Path(tmp)) as server:
            names = list(trees)
            for name in names:  # warm-up: file cache, .pyc files
                _sample(trees[name], server)
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                this_round: dict[str, dict[str, float]] = {}
                bare.append(_bare_python())
                for name in order:
                    this_round[name] = _sample(trees[name], server)
                    for metric, value in this_round[name].items():
                        samples[name][metric].append(value)
                per_round.append(this_round)
    result: dict[str, Any] = {
        "rounds": rounds,
        "python -c pass": summarize(bare).as_dict(1e3, 2),
        "trees": {
            name: {m: summarize(v).as_dict(1e3, 2) for m, v in metrics.items()}
            for name, metrics in samples.items()
        },
        "attribution_us": {
            name: {
                k: round(v)
                for k, v in _attribution(tree, attribution_runs).items()
                if k in _WATCHED
            }
            for name, tree in trees.items()
        },
    }
    if "baseline" in trees:
        result["ratios"] = {
            metric: Ratio.of(
                [rnd["current"][metric] / rnd["baseline"][metric] for rnd in per_round]
            ).as_dict()
            for metric in METRICS[:3]
        }
        result["saved_ms"] = {
            metric: summarize(
                [(rnd["baseline"][metric] - rnd["current"][metric]) * 1e3 for rnd in per_round]
            ).as_dict(1.0, 2)
            for metric in METRICS[:3]
        }
    return result


def _ms(summary: dict[str, Any]) -> str:
    return f"{summary['median']:.1f} ms (p25-p75 {summary['p25']:.1f}-{summary['p75']:.1f})"


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['rounds']} rounds, a fresh interpreter per sample; "
        f"python -c pass: {_ms(result['python -c pass'])}",
        "",
    ]
    trees = list(result["trees"])
    lines.append("| measure | " + " | ".join(trees) + " |")
    lines.append("|---|" + "---|" * len(trees))
    for metric in METRICS:
        cells = [_ms(result["trees"][t][metric]) for t in trees]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    if "ratios" in result:
        lines += ["", "current / baseline, median of per-round ratios (p25-p75):"]
        for metric, ratio in result["ratios"].items():
            saved = result["saved_ms"][metric]
            lines.append(
                f"  {metric}: {ratio['value']:.2f}x ({ratio['p25']:.2f}-{ratio['p75']:.2f}); "
                f"saved {saved['median']:.1f} ms (p25-p75 {saved['p25']:.1f}-{saved['p75']:.1f})"
            )
    lines += ["", "-X importtime, median cumulative µs:"]
    lines.append("| module | " + " | ".join(trees) + " |")
    lines.append("|---|" + "---|" * len(trees))
    for module in _WATCHED:
        cells = [result["attribution_us"][t].get(module) for t in trees]
        if any(cells):
            shown = [f"{c:,}".replace(",", " ") if c else "-" for c in cells]
            lines.append(f"| {module} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/import_time.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--baseline", help="git revision to compare with (e.g. main)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds (default 30)")
    parser.add_argument(
        "--attribution", type=int, default=5, help="-X importtime runs per tree (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (medians with a spread)")
    with _baseline_tree(args.baseline) as baseline:
        trees = {"current": _REPO}
        if baseline is not None:
            trees = {"baseline": baseline, "current": _REPO}
        result = measure(trees, args.rounds, max(args.attribution, 1))
    if args.baseline:
        result["baseline_revision"] = args.baseline
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
