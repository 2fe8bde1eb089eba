"""The local hub's shared state and connection log: C2D locks and settlement rules, the
log's bounded memory (pure logic)."""

from __future__ import annotations

import pytest

from iothub_tls.hub.state import HubState


def test_lock_token_settles_only_its_own_devices_message():
    state = HubState()
    state.enqueue_c2d("a", b"for a")
    locked = state.lock_next_c2d("a")
    assert locked is not None and locked.delivery_count == 1
    with pytest.raises(KeyError):
        state.settle_c2d(locked.lock_token, "complete", device_id="b")
    assert state.settle_c2d(locked.lock_token, "complete", device_id="a") is locked
    with pytest.raises(KeyError):  # settled once only
        state.settle_c2d(locked.lock_token, "complete", device_id="a")


def test_abandon_requeues_first_and_reject_dead_letters():
    state = HubState()
    state.enqueue_c2d("a", b"1")
    state.enqueue_c2d("a", b"2")
    first = state.lock_next_c2d("a")
    state.settle_c2d(first.lock_token, "abandon")
    again = state.lock_next_c2d("a")
    assert again.payload == b"1" and again.delivery_count == 2
    state.settle_c2d(again.lock_token, "reject")
    assert state.dead_letters == [again]
    assert state.lock_next_c2d("a").payload == b"2"


def test_expired_lock_returns_the_message(monkeypatch):
    state = HubState(lock_seconds=0.0)
    state.enqueue_c2d("a", b"1")
    locked = state.lock_next_c2d("a")
    assert state.pending_c2d("a") == 0
    with pytest.raises(KeyError):
        state.settle_c2d(locked.lock_token, "complete")
    assert state.pending_c2d("a") == 1


def test_connection_log_keeps_a_bounded_window_and_counts_everything():
    import io

    from iothub_tls.hub import ConnectionEvent, ConnectionLog

    stream = io.StringIO()
    log = ConnectionLog(stream, max_events=3)
    for n in range(5):
        log.emit(ConnectionEvent("deviceConnect", "Mqtt", "Failure", reason=f"r{n}"))
    assert [e.reason for e in log.events] == ["r2", "r3", "r4"]
    assert log.stats()["failedConnections"] == {"Mqtt": 5}
    assert len(stream.getvalue().splitlines()) == 5
    with pytest.raises(ValueError, match="max_events must be >= 1"):
        ConnectionLog(max_events=0)
