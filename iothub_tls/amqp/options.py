"""The settings of the AMQP clients: :class:`AmqpOptions` and the port IoT Hub listens on.

Shared by the asyncio clients (:mod:`iothub_tls.amqp.aio`) and their synchronous facades
(:mod:`iothub_tls.amqp.client`); it imports no AMQP engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._io.backoff import RetryPolicy
from ..errors import (
    AuthenticationError,
    CertificateVerificationError,
    CipherSuiteError,
    NotAuthorizedError,
    PolicyError,
    PolicyViolation,
    ProtocolVersionError,
    ProxyAuthenticationError,
)

if TYPE_CHECKING:
    from ..auth import ClientIdentity
    from ..tls.context import HardenedSSLContext

__all__ = ["AMQPS_PORT", "PERMANENT", "SASL_CHOICES", "AmqpOptions", "check_sasl"]

#: AMQP over TLS (IANA "amqps"); IoT Hub listens on it.
AMQPS_PORT = 5671

#: The SASL mechanisms the client can offer (None: no SASL layer).
SASL_CHOICES = ("ANONYMOUS", "EXTERNAL", "PLAIN")

#: Failures another connection attempt cannot cure: refused credentials, a refused
#: certificate, a TLS policy refusal, bad configuration. They end reconnection at once.
PERMANENT = (
    AuthenticationError,
    NotAuthorizedError,
    CertificateVerificationError,
    PolicyViolation,
    PolicyError,
    ProtocolVersionError,
    CipherSuiteError,
    ProxyAuthenticationError,
)

#: AmqpOptions.retry by default: the first wait up to 0.5 s, doubling to 30 s.
_DEFAULT_RECONNECT = RetryPolicy(initial_delay=0.5, max_delay=30.0)


@dataclass(frozen=True)
class AmqpOptions:
    """Tuning of :class:`~iothub_tls.amqp.AmqpConnection` and
    :class:`~iothub_tls.amqp.AmqpDeviceClient` (and their asyncio twins); every field
    has a default suited to IoT Hub. Make variants with :func:`dataclasses.replace`.

    :param idle_timeout: seconds of silence after which the peer is considered dead
        (announced in the open frame); empty frames are sent so that the peer's own idle
        timeout never fires.
    :param connect_timeout: limit for TCP + TLS + SASL + open + CBS + attach together
        (counted from the moment the attempt gets its turn at the process's handshake
        gate); a peer that stalls any of them fails with a timeout error naming the
        stage.
    :param operation_timeout: default limit for a message's disposition, a settlement or
        a :meth:`~iothub_tls.amqp.AmqpDeviceClient.receive_c2d`.
    :param retry: how to re-establish a lost connection (CBS and links included): a
        :class:`~iothub_tls.RetryPolicy` (default: waits of up to 0.5 s doubling
        to 30 s, with full jitter, never giving up, starting again after a connection
        healthy for 60 s), or None not to reconnect. Refused credentials and TLS policy
        refusals are never retried.
    :param renew_margin: put a new SAS token on ``$cbs`` when this fraction of the
        current token's lifetime is left (default 0.2: at 80 % of its life). Each
        connection draws its renewal time from the half-margin before that point, so
        a gateway's devices, connected together, do not all renew at the same moment.
    :param sas_ttl: lifetime of the SAS tokens the device client generates.
    :param c2d_credit: cloud-to-device messages the device client lets the hub send
        ahead (link credit); each settlement gives one credit back.
    """

    idle_timeout: float = 120.0
    connect_timeout: float = 30.0
    operation_timeout: float = 30.0
    retry: RetryPolicy | None = _DEFAULT_RECONNECT
    renew_margin: float = 0.2
    sas_ttl: float = 3600.0
    c2d_credit: int = 10

    def __post_init__(self) -> None:
        for name in (
            "idle_timeout",
            "connect_timeout",
            "operation_timeout",
            "sas_ttl",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise PolicyError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise PolicyError(
                f"retry must be a RetryPolicy (or None not to reconnect), not {self.retry!r}"
            )
        if not (isinstance(self.renew_margin, int | float) and 0 < self.renew_margin < 1):
            raise PolicyError(f"renew_margin must be in (0, 1), not {self.renew_margin!r}")
        if isinstance(self.c2d_credit, bool) or not (
            isinstance(self.c2d_credit, int) and self.c2d_credit >= 1
        ):
            raise PolicyError(f"c2d_credit must be a positive integer, not {self.c2d_credit!r}")


def check_sasl(
    sasl: str | None,
    username: str | None,
    password: str | None,
    identity: ClientIdentity | None,
    context: HardenedSSLContext | None,
) -> None:
    """Refuse a SASL configuration that cannot work, before any I/O.

    :raises PolicyError: naming what is wrong and what to pass instead.
    """
    if sasl is not None and sasl not in SASL_CHOICES:
        raise PolicyError(
            f"unsupported SASL mechanism {sasl!r}: use one of {', '.join(SASL_CHOICES)} "
            "or None for no SASL layer"
        )
    if sasl == "PLAIN" and (username is None or password is None):
        raise PolicyError("SASL PLAIN needs both username and password")
    if sasl != "PLAIN" and (username is not None or password is not None):
        raise PolicyError(
            f"username/password are only sent with SASL PLAIN, not {sasl!r}: pass "
            "sasl='PLAIN' or remove them"
        )
    if sasl == "EXTERNAL" and identity is None and (context is None or context.identity is None):
        raise PolicyError(
            "SASL EXTERNAL authenticates with the TLS client certificate: pass identity="
            "ClientIdentity.from_files(cert, key)"
        )
