"""The one back-off schedule of every client (``iothub_tls._io.backoff``), without sleeping:
the waits are a pure function of the retry number and a seeded draw."""

from __future__ import annotations

import itertools
import statistics

import pytest

import iothub_tls as it
from iothub_tls import amqp, https, mqtt
from iothub_tls._io.backoff import Backoff, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_policy_type_for_every_transport() -> None:
    assert it.RetryPolicy is RetryPolicy
    assert mqtt.RetryPolicy is amqp.RetryPolicy is https.RetryPolicy is RetryPolicy
    assert isinstance(mqtt.MqttOptions().retry, RetryPolicy)
    assert isinstance(amqp.AmqpOptions().retry, RetryPolicy)


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.initial_delay, policy.max_delay, policy.multiplier) == (1.0, 60.0, 2.0)
    assert policy.jitter is True and policy.max_attempts is None
    assert policy.healthy_after == 60.0


def test_ceilings_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=10, multiplier=2)
    assert [policy.ceiling(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.ceiling(10_000) == 10  # a week-long outage does not overflow
    tripling = RetryPolicy(initial_delay=0.1, max_delay=100, multiplier=3)
    assert [tripling.ceiling(n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.3, 0.9])
    with pytest.raises(ValueError, match="1-based"):
        policy.ceiling(0)


def test_without_jitter_the_wait_is_the_ceiling() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=4, jitter=False, max_attempts=6)
    assert list(policy.delays(seed=1)) == [0.5, 1, 2, 4, 4, 4]


def test_full_jitter_draws_the_whole_wait_between_zero_and_the_ceiling() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=8, max_attempts=6)
    assert policy.delay(3, 0.0) == 0.0
    assert policy.delay(3, 0.5) == 2.0
    assert policy.delay(3, 0.999) == pytest.approx(3.996)
    assert policy.delay(3, 7.0) == 4.0 and policy.delay(3, -1.0) == 0.0  # draws clamped
    schedules = [list(policy.delays(seed)) for seed in range(500)]
    for schedule in schedules:
        assert len(schedule) == 6
        for retry, wait in enumerate(schedule, 1):
            assert 0.0 <= wait <= policy.ceiling(retry)
    # the waits are spread over the whole interval, not clustered at the ceiling
    fourth = [s[3] for s in schedules]  # ceiling 8
    assert min(fourth) < 0.8 and max(fourth) > 7.2
    assert 3.0 < statistics.mean(fourth) < 5.0


def test_a_seed_gives_the_same_schedule() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=30)
    first = list(itertools.islice(policy.delays(seed=42), 20))
    assert first == list(itertools.islice(policy.delays(seed=42), 20))
    assert first != list(itertools.islice(policy.delays(seed=43), 20))


def test_delays_is_endless_without_max_attempts_and_capped() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=5)
    waits = list(itertools.islice(policy.delays(seed=7), 1000))
    assert len(waits) == 1000 and max(waits) <= 5
    assert len(list(RetryPolicy(max_attempts=3).delays(seed=7))) == 3


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial_delay": -1}, "initial_delay must be >= 0"),
        ({"initial_delay": float("nan")}, "finite"),
        ({"initial_delay": True}, "finite number"),
        ({"max_delay": 0.5}, "must not be smaller than initial_delay"),
        ({"max_delay": float("inf")}, "finite"),
        ({"multiplier": 0.5}, "multiplier must be a finite number >= 1"),
        ({"jitter": 0.5}, "jitter must be True or False"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.0}, "max_attempts"),
        ({"healthy_after": -1}, "healthy_after"),
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(it.PolicyError, match=fragment):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_counts_attempts_and_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=100, jitter=False, max_attempts=3)
    backoff = Backoff(policy, clock=Clock())
    assert [backoff.next_delay() for _ in range(4)] == [1, 2, 4, None]
    assert backoff.attempts == 3


def test_backoff_starts_again_after_a_healthy_connection() -> None:
    clock = Clock()
    policy = RetryPolicy(initial_delay=1, max_delay=100, jitter=False, healthy_after=30)
    backoff = Backoff(policy, clock=clock)
    waits = []
    for _ in range(6):  # each connection stays up 31 s, longer than healthy_after
        backoff.connected()
        clock.now += 31
        assert backoff.lost() is True
        waits.append(backoff.next_delay())
    assert waits == [1] * 6


def test_backoff_keeps_growing_while_connections_do_not_last() -> None:
    clock = Clock()
    policy = RetryPolicy(initial_delay=1, max_delay=100, jitter=False, healthy_after=30)
    backoff = Backoff(policy, clock=clock)
    waits = []
    for _ in range(6):  # up 5 s each time: accepted, then dropped
        backoff.connected()
        clock.now += 5
        assert backoff.lost() is False
        waits.append(backoff.next_delay())
    assert waits == [1, 2, 4, 8, 16, 32]
    backoff.connected()
    clock.now += 30  # exactly healthy_after: healthy
    assert backoff.lost() is True
    assert backoff.next_delay() == 1 and backoff.attempts == 1


def test_backoff_gives_up_on_connections_that_never_become_healthy() -> None:
    clock = Clock()
    policy = RetryPolicy(jitter=False, max_attempts=2, healthy_after=30)
    backoff = Backoff(policy, clock=clock)
    for expected in (1.0, 2.0, None):
        backoff.connected()
        clock.now += 1
        backoff.lost()
        assert backoff.next_delay() == expected


def test_failed_attempts_without_a_connection_never_reset() -> None:
    backoff = Backoff(RetryPolicy(jitter=False, healthy_after=0), clock=Clock())
    assert backoff.lost() is False  # never connected
    assert [backoff.next_delay() for _ in range(3)] == [1, 2, 4]


def test_backoff_jitter_is_seedable_and_follows_the_policy_schedule() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=60)
    one, two = Backoff(policy, seed=5), Backoff(policy, seed=5)
    waits = [one.next_delay() for _ in range(8)]
    assert waits == [two.next_delay() for _ in range(8)]
    assert waits == list(itertools.islice(policy.delays(seed=5), 8))
    with pytest.raises(it.PolicyError, match="expected a RetryPolicy"):
        Backoff(mqtt.MqttOptions())  # type: ignore[arg-type]
