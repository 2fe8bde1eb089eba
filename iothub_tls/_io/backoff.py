"""How every client waits before trying again: one policy type, one schedule.

:class:`RetryPolicy` is the only back-off setting of the library. The MQTT and AMQP
clients use it for their reconnection loops (``MqttOptions.retry``,
``AmqpOptions.retry``), the HTTPS client for the retries of each request
(``HttpsOptions.retry``).

The schedule is exponential with *full jitter*: the wait before retry ``n`` is drawn
uniformly from ``[0, min(max_delay, initial_delay * multiplier ** (n - 1))]``. It is a
pure function of ``n`` and one random draw, so it can be checked without sleeping
(:meth:`RetryPolicy.delay`, :meth:`RetryPolicy.delays` with a seed).

:class:`Backoff` is a reconnection loop's place in that schedule: it counts the attempts
since the connection was last *healthy* (up for at least ``healthy_after`` seconds) and
starts again from the first, short wait after such a connection is lost, so a device that
loses a good connection now and then never pays the longest wait for it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError

__all__ = ["Backoff", "RetryPolicy"]

logger = logging.getLogger("iothub_tls._io.backoff")

# Exponents above this give a ceiling far beyond any max_delay; stop there so that a
# week-long outage cannot overflow a float.
_MAX_EXPONENT = 64


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"{name} must be a finite number of seconds, not {value!r}")
    if value < 0:
        raise PolicyError(f"{name} must be >= 0 seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between attempts, and when to give up.

    :param initial_delay: the ceiling of the first wait, in seconds.
    :param max_delay: no wait is longer (seconds). For HTTPS also the longest
        ``Retry-After`` that is waited out: a longer one raises ``ThrottledError`` at once.
    :param multiplier: each further wait's ceiling is this many times the previous one.
    :param jitter: draw each wait uniformly between 0 and its ceiling (full jitter). Only
        switch it off to make a schedule predictable in a test: without jitter a fleet
        that lost its hub at the same moment comes back in lock-step.
    :param max_attempts: attempts before giving up; None never gives up (the default of
        the reconnecting MQTT and AMQP clients; HTTPS needs a number). A reconnection
        loop waits before each of its attempts (the lost connection is not one of them);
        an HTTPS operation sends its first request at once, so it waits at most
        ``max_attempts - 1`` times.
    :param healthy_after: a connection that stayed up this long (seconds) was healthy:
        when it is lost, the schedule starts again at the first wait and the attempt
        count at zero. A connection lost sooner continues the schedule where it was, so a
        peer that accepts and then drops every connection still meets a growing wait.
        (HTTPS starts a fresh schedule for every operation.)

    Make variants with :func:`dataclasses.replace`.
    """

    initial_delay: float = 1.0
    max_delay: float = 60.0
    multiplier: float = 2.0
    jitter: bool = True
    max_attempts: int | None = None
    healthy_after: float = 60.0

    def __post_init__(self) -> None:
        initial = _seconds("initial_delay", self.initial_delay)
        maximum = _seconds("max_delay", self.max_delay)
        if maximum < initial:
            raise PolicyError(
                f"max_delay ({self.max_delay!r}) must not be smaller than initial_delay "
                f"({self.initial_delay!r})"
            )
        multiplier = self.multiplier
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, int | float)
            or not math.isfinite(multiplier)
            or multiplier < 1
        ):
            raise PolicyError(f"multiplier must be a finite number >= 1, not {multiplier!r}")
        if not isinstance(self.jitter, bool):
            raise PolicyError(f"jitter must be True or False, not {self.jitter!r}")
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise PolicyError(
                f"max_attempts must be None or an int >= 1, not {self.max_attempts!r}"
            )
        _seconds("healthy_after", self.healthy_after)

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (1-based)."""
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 1:
            raise ValueError(f"retry is 1-based, not {retry!r}")
        exponent = min(retry - 1, _MAX_EXPONENT)
        return float(min(self.max_delay, self.initial_delay * self.multiplier**exponent))

    def delay(self, retry: int, draw: float) -> float:
        """The wait before retry number ``retry`` (1-based), for ``draw`` uniform in
        [0, 1).

        Full jitter, after the comparison of back-off schedules in the AWS Architecture
        Blog's "Exponential Backoff And Jitter" (Marc Brooker, 2015): drawing the whole
        wait at random, rather than adding a random part to a fixed one, spreads the
        retries of many clients that failed together the most evenly, for the fewest
        calls in all. A device fleet cut off by one hub outage is that case. It is also
        stateless (unlike "decorrelated" jitter, whose next wait depends on the last),
        which keeps the schedule a pure function of ``retry`` and the draw.
        """
        ceiling = self.ceiling(retry)
        if not self.jitter:
            return ceiling
        return ceiling * min(max(draw, 0.0), 1.0)

    def delays(self, seed: int | None = None) -> Iterator[float]:
        """The waits before retry 1, 2, 3 ... of one uninterrupted run of the schedule:
        ``max_attempts`` of them, endless when it is None. The same ``seed`` gives the
        same waits (the clients draw from their own generator)."""
        import random  # (imported when a schedule is drawn: not at start-up)

        draws = random.Random(seed)  # noqa: S311 - jitter, not a secret
        retry = 0
        while self.max_attempts is None or retry < self.max_attempts:
            retry += 1
            yield self.delay(retry, draws.random())


class Backoff:
    """A reconnection loop's place in a :class:`RetryPolicy` schedule.

    The loop calls :meth:`connected` when a connection is up, :meth:`lost` when it ends,
    and :meth:`next_delay` before each attempt to reconnect. Owned by one thread.

    :param seed: seed of the jitter draws (None: unpredictable).
    :param clock: monotonic seconds, to measure how long a connection stayed up.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(policy, RetryPolicy):
            raise PolicyError(f"expected a RetryPolicy, not {type(policy).__name__}")
        self.policy = policy
        self._seed = seed
        self._draws: Any = None  # random.Random, made when the first wait is drawn
        self._clock = clock
        self._up_since: float | None = None
        #: reconnection attempts since the last healthy connection
        self.attempts = 0

    def connected(self) -> None:
        """A connection is up (healthy once it stays up ``healthy_after`` seconds)."""
        self._up_since = self._clock()

    def lost(self) -> bool:
        """The connection ended. True when it had been healthy: the schedule starts
        again at its first wait."""
        up_since, self._up_since = self._up_since, None
        if up_since is not None and self._clock() - up_since >= self.policy.healthy_after:
            if self.attempts:
                logger.debug("the connection was healthy: back-off starts again")
            self.attempts = 0
            return True
        return False

    def next_delay(self) -> float | None:
        """Count one more attempt and return the wait before it; None when
        ``max_attempts`` attempts were made since the last healthy connection."""
        limit = self.policy.max_attempts
        if limit is not None and self.attempts >= limit:
            return None
        self.attempts += 1
        if self._draws is None:
            import random

            self._draws = random.Random(self._seed)  # noqa: S311 - jitter, not a secret
        return self.policy.delay(self.attempts, self._draws.random())
