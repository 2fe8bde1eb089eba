"""The machine a run was measured on (numbers mean nothing without it)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    extras = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("cpu family", "model\t")):
                extras.append(line.split(":", 1)[1].strip())
            if len(extras) == 2:
                break
    except OSError:
        pass
    if len(extras) == 2:
        model += f" (family {extras[0]}, model {extras[1]})"
    hypervisor = _hypervisor()
    return f"{model}, {hypervisor}" if hypervisor else model


def _hypervisor() -> str:
    lscpu = shutil.which("lscpu")
    if not lscpu:
        return ""
    try:
        out = subprocess.run([lscpu], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.splitlines():
        if line.startswith("Hypervisor vendor:"):
            return f"{line.split(':', 1)[1].strip()} virtual machine"
    return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _iothub_tls() -> str:
    import iothub_tls

    return str(iothub_tls.__version__)


def _mosquitto() -> str:
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not binary:
        return "not installed"
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.replace("mosquitto version", "").strip() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    """1, 5 and 15 minute load averages (other work competing for the CPUs)."""
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def describe() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python, OpenSSL and library versions."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {affinity} usable by this process",
        "memory": _memory(),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "openssl": ssl.OPENSSL_VERSION,
        "paho-mqtt": _version("paho-mqtt"),
        "cryptography": _version("cryptography"),
        "certifi": _version("certifi"),
        "mosquitto": _mosquitto(),
        "iothub-tls": _iothub_tls(),
        "load average at start": load_average(),
    }
