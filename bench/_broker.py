"""A private Mosquitto with a TLS listener for the MQTT benchmarks."""

from __future__ import annotations

import contextlib
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from iothub_tls.testing.brokers import Mosquitto, MosquittoListener

from ._pki import bench_pki


def mosquitto_binary() -> str | None:
    """Path of ``mosquitto`` or None (the MQTT benchmarks are then skipped)."""
    found = shutil.which("mosquitto")
    if found is None and Path("/usr/sbin/mosquitto").exists():
        found = "/usr/sbin/mosquitto"
    return found


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file soft limit towards ``wanted`` (the broker,
    started from here, inherits it). Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a process so far (all its threads), from the scheduler's nanosecond
    accounting (``/proc/PID/task/*/schedstat``), not the 10 ms ticks of ``/proc/PID/stat``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@contextlib.contextmanager
def tls_mosquitto() -> Iterator[Mosquitto]:
    """Mosquitto on a loopback TLS port presenting the bench RSA-2048 chain (IoT Hub's
    default certificate type), anonymous, no persistence (Mosquitto's default
    ``max_connections`` is unlimited; the open-file limit is what bounds it)."""
    pki = bench_pki()
    workdir = Path(tempfile.mkdtemp(prefix="itls-bench-mosq-"))
    try:
        cert, key = pki.rsa_leaf.write(workdir / "pki", "server")
        listener = MosquittoListener(tls=True, certfile=cert, keyfile=key)
        broker = Mosquitto(
            [listener],
            persistence=False,
            workdir=workdir / "broker",
            extra_config=["set_tcp_nodelay true"],
        )
        with broker:
            yield broker
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
