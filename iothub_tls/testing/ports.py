"""Loopback ports for test servers: find a free one, wait until one listens."""

from __future__ import annotations

import socket
import subprocess
import time

__all__ = ["free_port", "port_open", "wait_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the kernel's pick for port 0).

    Another process may take it before you bind it: servers that can bind port 0
    themselves should, and report the port they got.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(
    port: int,
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    host: str = "127.0.0.1",
) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    :param proc: the server process, when there is one: its exit ends the wait early.
    :raises TimeoutError: when nothing listens after ``timeout`` seconds.
    :raises RuntimeError: when ``proc`` exited first.
    """
    deadline = time.monotonic() + timeout
    while not port_open(port, host):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")
        time.sleep(0.02)
