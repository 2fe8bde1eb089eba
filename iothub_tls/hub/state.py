"""What the local hub remembers: telemetry received, cloud-to-device queues, device
twins and pending direct methods — shared by every front door, so a message queued for
a device reaches it over whichever protocol it connects with."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["C2DMessage", "HubState", "ReceivedMessage", "Telemetry", "Twin"]


@dataclass(frozen=True)
class Telemetry:
    """One device-to-cloud message as the hub received it."""

    device_id: str
    payload: bytes
    properties: dict[str, str]
    system_properties: dict[str, str]
    protocol: str
    module_id: str | None = None
    received_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ReceivedMessage:
    """A device-to-cloud message a front door (HTTPS or AMQP) accepted."""

    device_id: str
    body: bytes
    properties: Mapping[str, str]
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    content_encoding: str | None
    #: True when it arrived in a batch request.
    batch: bool
    #: "sas", "selfSigned" or "certificateAuthority"
    auth_type: str
    tls_version: str
    #: IANA name of the cipher suite
    cipher: str
    time: dt.datetime


@dataclass
class C2DMessage:
    """A cloud-to-device message and its delivery state."""

    device_id: str
    payload: bytes
    properties: dict[str, str]
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    correlation_id: str | None = None
    enqueued_at: float = field(default_factory=time.time)
    delivery_count: int = 0
    lock_token: str | None = None
    locked_until: float = 0.0


@dataclass
class Twin:
    """A device twin: desired and reported properties with their versions, and the tags
    only the service side sees. ``version`` counts every change (tags, desired,
    reported), as the twin's own ``version`` and ``etag`` on IoT Hub's service API."""

    desired: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    desired_version: int = 1
    reported_version: int = 1
    tags: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    desired_updated: float = field(default_factory=time.time)
    reported_updated: float = field(default_factory=time.time)

    def document(self) -> dict[str, Any]:
        """What the device reads (twin GET over MQTT and AMQP)."""
        return {
            "desired": {**self.desired, "$version": self.desired_version},
            "reported": {**self.reported, "$version": self.reported_version},
        }

    def copy(self) -> Twin:
        return copy.deepcopy(self)


def diff_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch that turns ``old`` into ``new`` (null removes a key)."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = diff_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or before != value:
            patch[key] = copy.deepcopy(value)
    return patch


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch as twins use it: null deletes, objects merge."""
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = value


class HubState:
    """Thread-safe state of the local hub."""

    def __init__(self, *, max_telemetry: int = 10_000, lock_seconds: float = 60.0) -> None:
        self._lock = threading.Condition()
        self.telemetry: deque[Telemetry] = deque(maxlen=max_telemetry)
        self._queues: dict[str, deque[C2DMessage]] = {}
        self._locked: dict[str, C2DMessage] = {}
        self.dead_letters: list[C2DMessage] = []
        self.completed: list[C2DMessage] = []
        self._twins: dict[str, Twin] = {}
        self._lock_seconds = lock_seconds
        self._rids = itertools.count(1)
        # device id -> callback(name, payload, rid) installed by the front door it is on
        self._method_routes: dict[str, Callable[[str, bytes, str], None]] = {}
        self._method_results: dict[str, tuple[int, bytes] | None] = {}
        self._c2d_listeners: list[Callable[[str], None]] = []
        self._desired_listeners: list[Callable[[str, dict[str, Any], int], None]] = []

    # -- telemetry ----------------------------------------------------------------------

    def record_telemetry(self, message: Telemetry) -> None:
        with self._lock:
            self.telemetry.append(message)
            self._lock.notify_all()

    def wait_for_telemetry(
        self, predicate: Callable[[Telemetry], bool], timeout: float = 5.0
    ) -> Telemetry | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for message in self.telemetry:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    # -- cloud to device ----------------------------------------------------------------

    def enqueue_c2d(
        self,
        device_id: str,
        payload: bytes,
        properties: dict[str, str] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> C2DMessage:
        message = C2DMessage(
            device_id, payload, dict(properties or {}), correlation_id=correlation_id
        )
        if message_id:
            message.message_id = message_id
        with self._lock:
            self._queues.setdefault(device_id, deque()).append(message)
            listeners = list(self._c2d_listeners)
            self._lock.notify_all()
        for listener in listeners:
            listener(device_id)
        return message

    def on_c2d_enqueued(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(device_id)`` (on the caller's thread) when a message is
        queued for a device, or put back in its queue (abandoned)."""
        with self._lock:
            self._c2d_listeners.append(listener)

    def lock_next_c2d(self, device_id: str) -> C2DMessage | None:
        """Take the next message for a device under a lock (HTTPS/AMQP/MQTT delivery)."""
        with self._lock:
            self._expire_locks()
            queue = self._queues.get(device_id)
            if not queue:
                return None
            message = queue.popleft()
            message.delivery_count += 1
            message.lock_token = str(uuid.uuid4())
            message.locked_until = time.time() + self._lock_seconds
            self._locked[message.lock_token] = message
            return message

    def settle_c2d(
        self, lock_token: str, outcome: str, *, device_id: str | None = None
    ) -> C2DMessage:
        """``outcome``: "complete", "reject" (dead-letter) or "abandon" (requeue).
        ``device_id``: the device asking (a token only settles that device's message).
        Raises KeyError when the lock is unknown, expired or another device's (HTTP 412)."""
        with self._lock:
            self._expire_locks()
            held = self._locked.get(lock_token)
            if held is None or (device_id is not None and held.device_id != device_id):
                raise KeyError(lock_token)
            message = self._locked.pop(lock_token)
            message.lock_token = None
            if outcome == "complete":
                self.completed.append(message)
            elif outcome == "reject":
                self.dead_letters.append(message)
            elif outcome == "abandon":
                self._queues.setdefault(message.device_id, deque()).appendleft(message)
            else:
                self._locked[lock_token] = message
                raise ValueError(f"unknown settlement {outcome!r}")
            self._lock.notify_all()
            listeners = list(self._c2d_listeners) if outcome == "abandon" else []
        for listener in listeners:  # the message can be delivered again
            listener(message.device_id)
        return message

    def _expire_locks(self) -> None:
        now = time.time()
        for token, message in list(self._locked.items()):
            if message.locked_until < now:
                del self._locked[token]
                message.lock_token = None
                self._queues.setdefault(message.device_id, deque()).appendleft(message)

    def pending_c2d(self, device_id: str) -> int:
        with self._lock:
            return len(self._queues.get(device_id, ()))

    def purge_c2d(self, device_id: str) -> int:
        """Drop the device's queued cloud-to-device messages; returns how many."""
        with self._lock:
            queue = self._queues.pop(device_id, None)
            return len(queue) if queue else 0

    # -- twins --------------------------------------------------------------------------

    def twin(self, device_id: str) -> Twin:
        with self._lock:
            return self._twins.setdefault(device_id, Twin())

    def patch_reported(self, device_id: str, patch: dict[str, Any]) -> int:
        with self._lock:
            twin = self._twins.setdefault(device_id, Twin())
            merge_patch(twin.reported, patch)
            twin.reported_version += 1
            twin.version += 1
            twin.reported_updated = time.time()
            return twin.reported_version

    def patch_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        """Merge ``patch`` into the desired properties and tell the devices' front doors
        (each connected device gets the patch with the new ``$version``)."""
        twin = self.update_twin(device_id, desired=patch)
        return twin.desired_version

    def update_twin(
        self,
        device_id: str,
        *,
        tags: dict[str, Any] | None = None,
        desired: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> Twin:
        """Change a twin from the service side and return a copy of it.

        ``replace=False`` merges ``tags`` and ``desired`` (JSON merge patch: null
        removes); ``replace=True`` makes them the new tags and desired properties (None
        leaves that part as it is). A change of the desired properties reaches the
        connected device as a patch with the new ``$version``."""
        with self._lock:
            twin = self._twins.setdefault(device_id, Twin())
            changed = False
            if tags is not None:
                before = copy.deepcopy(twin.tags)
                if replace:
                    twin.tags = copy.deepcopy(tags)
                else:
                    merge_patch(twin.tags, tags)
                changed = twin.tags != before
            patch: dict[str, Any] = {}
            if desired is not None:
                before = copy.deepcopy(twin.desired)
                if replace:
                    twin.desired = {k: copy.deepcopy(v) for k, v in desired.items() if k[:1] != "$"}
                    patch = diff_patch(before, twin.desired)
                else:
                    merge_patch(twin.desired, copy.deepcopy(desired))
                    # the device gets the patch as the service sent it
                    patch = {k: copy.deepcopy(v) for k, v in desired.items() if k[:1] != "$"}
                if patch or not replace:
                    # IoT Hub counts every desired update, even one that changes nothing
                    twin.desired_version += 1
                    twin.desired_updated = time.time()
                    changed = True
            if changed:
                twin.version += 1
            version = twin.desired_version
            snapshot = twin.copy()
            listeners = list(self._desired_listeners) if desired is not None else []
        if desired is not None and (patch or not replace):
            for listener in listeners:
                listener(device_id, patch, version)
        return snapshot

    def twin_snapshot(self, device_id: str) -> Twin:
        """A copy of the device's twin (an empty one when it has none yet)."""
        with self._lock:
            return self._twins.setdefault(device_id, Twin()).copy()

    def forget_device(self, device_id: str) -> None:
        """A device was deleted: drop its twin, queue and method route."""
        with self._lock:
            self._twins.pop(device_id, None)
            self._queues.pop(device_id, None)
            self._method_routes.pop(device_id, None)

    def on_desired_patch(self, listener: Callable[[str, dict[str, Any], int], None]) -> None:
        with self._lock:
            self._desired_listeners.append(listener)

    # -- direct methods -----------------------------------------------------------------

    def route_methods(
        self, device_id: str, route: Callable[[str, bytes, str], None] | None
    ) -> None:
        """The front door a device is connected on installs how to reach it."""
        with self._lock:
            if route is None:
                self._method_routes.pop(device_id, None)
            else:
                self._method_routes[device_id] = route
                self._lock.notify_all()  # a call may be waiting for the device to connect

    def unroute_methods(self, device_id: str, route: Callable[[str, bytes, str], None]) -> None:
        """Forget ``route`` if it is still how ``device_id`` is reached (the device may
        have connected again meanwhile and installed another)."""
        with self._lock:
            if self._method_routes.get(device_id) is route:
                del self._method_routes[device_id]

    def invoke_method(
        self,
        device_id: str,
        name: str,
        payload: bytes = b"null",
        timeout: float = 10.0,
        *,
        connect_timeout: float = 0.0,
    ) -> tuple[int, bytes]:
        """Call a direct method on a connected device; returns (status, payload).

        :param timeout: seconds the device has to answer.
        :param connect_timeout: seconds to wait for the device to connect (subscribed to
            direct methods) when it is not yet.
        Raises LookupError when the device is not connected, TimeoutError on no answer."""
        connect_deadline = time.monotonic() + connect_timeout
        with self._lock:
            route = self._method_routes.get(device_id)
            while route is None:
                remaining = connect_deadline - time.monotonic()
                if remaining <= 0:
                    raise LookupError(f"device {device_id!r} is not connected for direct methods")
                self._lock.wait(remaining)
                route = self._method_routes.get(device_id)
            rid = format(next(self._rids), "x")
            self._method_results[rid] = None
        route(name, payload, rid)
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._method_results.get(rid) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._method_results.pop(rid, None)
                    raise TimeoutError(f"device {device_id!r} did not answer method {name!r}")
                self._lock.wait(remaining)
            result = self._method_results.pop(rid)
        assert result is not None
        return result

    def method_response(self, rid: str, status: int, payload: bytes) -> bool:
        with self._lock:
            if rid not in self._method_results:
                return False
            self._method_results[rid] = (status, payload)
            self._lock.notify_all()
            return True
