"""Descriptor numbers above select()'s limit, for tests of the network loops."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def descriptors_taken_below(limit: int) -> Iterator[list[int]]:
    """Hold every descriptor number below ``limit`` (raising the open-file soft limit
    if needed), so that the sockets opened meanwhile get numbers of ``limit`` or more."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limit + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        reason = f"the open-file hard limit ({hard}) is below {wanted}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    # Sockets of earlier tests that only the garbage collector closes would free low
    # numbers in the middle of the block (a collection can start at any allocation).
    gc.collect()
    held: list[int] = []
    try:
        while not held or held[-1] < limit:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield held
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
