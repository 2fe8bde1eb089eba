"""Tuning of the HTTPS device clients (synchronous and asyncio): :class:`HttpsOptions`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._io.backoff import RetryPolicy
from ..errors import PolicyError
from .conventions import API_VERSION

__all__ = ["HttpsOptions"]

#: HttpsDeviceClient's retries by default: four tries per operation, the waits between
#: them up to 0.5 s, doubling, never over 30 s.
_DEFAULT_RETRY = RetryPolicy(initial_delay=0.5, max_delay=30.0, max_attempts=4)


@dataclass(frozen=True)
class HttpsOptions:
    """Tuning of :class:`HttpsDeviceClient`; every field has a default suited to IoT
    Hub. Make variants with :func:`dataclasses.replace`.

    :param operation_timeout: seconds to wait for each response, and the default wait of
        :meth:`HttpsDeviceClient.receive_c2d`.
    :param connect_timeout: seconds to open a connection (TCP and TLS).
    :param retry: how each operation retries throttling (429), hub failures (5xx) and
        transport faults: a :class:`~iothub_tls.RetryPolicy` with a finite
        ``max_attempts`` (tries per operation, the first included); by default four
        tries, the waits between them drawn up to 0.5 s, doubling, never over 30 s. A
        ``Retry-After`` longer than its ``max_delay`` is not waited out:
        :class:`ThrottledError` is raised at once with ``retry_after`` set. TLS and
        policy refusals are never retried.
    :param sas_ttl: lifetime of each SAS token in seconds.
    :param c2d_poll_interval: seconds between two receives while waiting for a
        cloud-to-device message (``receive_c2d`` with a timeout, ``on_c2d``). IoT Hub
        throttles HTTPS receives per hub: a fleet should poll rarely (the service
        documentation suggests every 25 minutes) or use MQTT or AMQP.
    :param api_version: the REST API version sent with every request.
    :param product_info: appended to the ``User-Agent``.
    """

    operation_timeout: float = 30.0
    connect_timeout: float = 30.0
    retry: RetryPolicy = _DEFAULT_RETRY
    sas_ttl: float = 3600.0
    c2d_poll_interval: float = 5.0
    api_version: str = API_VERSION
    product_info: str | None = None

    def __post_init__(self) -> None:
        for name in ("operation_timeout", "connect_timeout", "sas_ttl", "c2d_poll_interval"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise PolicyError(f"{name} must be a positive number of seconds, not {value!r}")
        if not isinstance(self.retry, RetryPolicy):
            raise PolicyError(f"retry must be a RetryPolicy, not {type(self.retry).__name__}")
        if self.retry.max_attempts is None:
            raise PolicyError(
                "an HTTPS operation needs a finite RetryPolicy.max_attempts (tries per "
                "operation, the first included), not None"
            )
        if not isinstance(self.api_version, str) or not self.api_version:
            raise PolicyError(f"api_version must be a non-empty str, not {self.api_version!r}")
