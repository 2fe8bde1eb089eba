"""Pytest glue for the broker processes of :mod:`iothub_tls.testing.brokers`.

The brokers themselves live in the package. Here a missing program is a skip with the
install command, except with ``CI=true``, where the workflow installs the packages and a
missing one is a failure (a broken image cannot silently turn the broker tests into
skips). :class:`Mosquitto` and :class:`RabbitMQ` are the package's, with that rule
applied to every program they start.
"""

from __future__ import annotations

import os
import subprocess
from typing import NoReturn

import pytest

from iothub_tls.testing import brokers as _brokers
from iothub_tls.testing.brokers import (
    APT_PACKAGES,
    DEFAULT_TLS13_SUITES,
    MARKER_ENV,
    BrokerError,
    MissingBinaryError,
    MosquittoListener,
    rabbitmq_password_hash,
    rabbitmq_version,
)
from iothub_tls.testing.ports import free_port, port_open, wait_port

__all__ = [
    "APT_PACKAGES",
    "DEFAULT_TLS13_SUITES",
    "MARKER_ENV",
    "BrokerError",
    "Mosquitto",
    "MosquittoListener",
    "RabbitMQ",
    "free_port",
    "port_open",
    "rabbitmq_password_hash",
    "rabbitmq_version",
    "require_binary",
    "wait_for_port",
]

#: The package's :func:`~iothub_tls.testing.ports.wait_port` (raises TimeoutError).
wait_for_port = wait_port


def _missing(error: MissingBinaryError) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(str(error), pytrace=False)
    pytest.skip(str(error))


def require_binary(name: str) -> str:
    """Return the path of executable ``name`` or skip the test (fail it when ``CI=true``)."""
    try:
        return _brokers.find_binary(name)
    except MissingBinaryError as error:
        _missing(error)


class Mosquitto(_brokers.Mosquitto):
    """:class:`iothub_tls.testing.brokers.Mosquitto`; a missing program skips the test."""

    def start(self, timeout: float = 10.0) -> None:
        try:
            super().start(timeout)
        except MissingBinaryError as error:
            _missing(error)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self


class RabbitMQ(_brokers.RabbitMQ):
    """:class:`iothub_tls.testing.brokers.RabbitMQ`; a missing program skips the test."""

    def start(self, timeout: float = 60.0) -> None:
        try:
            super().start(timeout)
        except MissingBinaryError as error:
            _missing(error)

    def ctl(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        try:
            return super().ctl(*args, timeout=timeout, check=check)
        except MissingBinaryError as error:
            _missing(error)

    def __enter__(self) -> RabbitMQ:
        self.start()
        return self
