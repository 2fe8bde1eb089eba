"""The MQTT client's network thread: it alone touches paho and the socket.

Other threads hand it work (:meth:`Network.submit_telemetry`, :meth:`Network.submit`)
through one locked queue, and wake it with a byte on a socket pair only when it may be
asleep (the first command since it last took them). It waits with ``poll()``, which —
unlike ``select()`` — watches descriptors of any number, so a process can hold hundreds
of clients besides its other files.

The work per message is kept to what paho itself needs: commands are taken in batches,
acknowledgements are settled in batches (the queue count is updated once per batch,
before the senders wake), and keep-alive, request deadlines and token renewal are
looked after twice a second rather than on every wake-up.

Writes are batched too: paho only queues packets, and each round ends by writing what it
queued (telemetry taken from the queue, the PUBLISHes that the round's PUBACKs released,
PUBACKs for C2D messages, a PINGREQ) back to back, so the broker finds several packets
per wake-up instead of one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .._io.backoff import Backoff
from .._io.poller import IN, OUT, READABLE, millis, new_poller
from ..device import ConnectionState
from ..errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    DeliveryError,
    IoTHubTLSError,
    NotAuthorizedError,
    OperationTimeoutError,
)
from ..tls.info import TlsInfo, tls_info
from ._paho import Paho
from .commands import ClientConfig, Message, MethodResponse, TwinRequest, settle
from .conventions import (
    METHODS_FILTER,
    TWIN_DESIRED_FILTER,
    TWIN_RESPONSE_FILTER,
    QueueFullError,
    RequestTracker,
    c2d_filter,
    connack_error,
    is_certificate_alert,
    is_permanent,
    method_response_topic,
    parse_twin_response,
    twin_error,
    twin_get_topic,
    twin_patch_topic,
)

logger = logging.getLogger("iothub_tls.mqtt")

#: Seconds between two rounds of keep-alive, deadline and renewal checks (at most).
CHORES_INTERVAL = 0.5


class _Closing(Exception):
    """close() was called while the network thread was connecting."""


# --------------------------------------------------------------------------------------
# The thread
# --------------------------------------------------------------------------------------


class Network:
    """Owns the paho client and the connection; runs on one thread.

    Other threads only queue commands and wake the thread; everything that touches
    paho or the socket happens on it.
    """

    def __init__(
        self,
        *,
        config: ClientConfig,
        on_message: Callable[[str, bytes], None],
        on_state: Callable[[ConnectionState, BaseException | None], None],
    ) -> None:
        self._config = config
        self._route = on_message
        self._on_state = on_state
        self._queue_size = config.options.queue_size
        self._withdraw = self.withdraw  # one bound method for every message
        self._paho = Paho(
            client_id=config.cs.client_id,
            websockets=config.websockets,
            address=(config.connect_host, config.port),
            context=config.context,
            options=config.options,
            on_connack=self._connack_cb,
            on_suback=self._suback_cb,
            on_publish=self._puback_cb,
            on_message=self._message_cb,
        )
        self._client = self._paho.client
        # shared with other threads, under _lock
        self._lock = threading.Lock()
        self._incoming: collections.deque[Message] = collections.deque()
        self._commands: collections.deque[TwinRequest | MethodResponse] = collections.deque()
        self._signalled = False  # a wake-up byte is on its way
        self._alive = True
        self._closing = False
        self._outstanding = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_fd = self._wake_r.fileno()
        self._poller = new_poller()
        self._poller.register(self._wake_fd, IN)
        # network-thread state
        self._outbox: collections.deque[Message] = collections.deque()
        self._inflight: dict[int, Message] = {}
        self._acked: list[Message] = []
        self._twin_waiting: collections.deque[TwinRequest] = collections.deque()
        self._twins: RequestTracker[TwinRequest] = RequestTracker(secrets.token_hex(3))
        self._connack: tuple[int, bool] | None = None
        self._subacks: dict[int, list[int] | None] = {}
        self._established = False
        self._renew_due = False
        self._permanent: BaseException | None = None
        self._sock_fd: int | None = None  # the connection's descriptor, while registered
        self._mask = 0
        self._pending_of: Callable[[], int] | None = None
        self._pending = 0  # bytes TLS decrypted and paho has not read yet
        self._now = time.monotonic()
        self._chores_due = self._now
        self._fault: BaseException | None = None  # why the last round dropped the connection
        self._fault_local = False  # ... and whether it was this side's own failure
        # visible to other threads
        self.tls_info: TlsInfo | None = None
        self.failure: BaseException | None = None
        self.reconnects = 0
        self.connected = threading.Event()
        self.first: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="iothub-tls-mqtt", daemon=True)

    # -- other threads ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, command: TwinRequest | MethodResponse) -> None:
        """Hand a command to the network thread (raises once the thread has ended)."""
        with self._lock:
            if not self._alive:
                raise self._ended_error()
            self._commands.append(command)
            wake = not self._signalled
            self._signalled = True
        if wake:
            self._wake()

    def submit_telemetry(self, topic: str, payload: bytes) -> Message:
        message = Message(topic, payload, self._withdraw)
        with self._lock:
            if not self._alive:
                raise self._ended_error()
            if self._outstanding >= self._queue_size:
                raise QueueFullError(
                    f"{self._outstanding} messages are already waiting for the hub's "
                    f"acknowledgement (queue_size={self._queue_size}"
                    f"{'' if self.connected.is_set() else ', the client is reconnecting'}); "
                    "the message was not accepted: retry later or raise "
                    "MqttOptions.queue_size"
                )
            self._outstanding += 1
            self._incoming.append(message)
            wake = not self._signalled
            self._signalled = True
        if wake:
            self._wake()
        return message

    def withdraw(self, message: Message) -> None:
        """A cancelled message gives back its place in the queue (once)."""
        with self._lock:
            if message.counted:
                message.counted = False
                self._outstanding -= 1

    def close(self, timeout: float) -> None:
        with self._lock:
            self._closing = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """False once the thread stopped (closed, failed, or the first connect failed)."""
        with self._lock:
            return self._alive

    def _ended_error(self) -> ClientError:
        if self.failure is not None:
            error: ClientError = ConnectionFailedError(
                f"the client stopped reconnecting after: {self.failure}"
            )
            error.__cause__ = self.failure
            return error
        return ClientError("the client is closed: call connect() again first")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # closed (the thread ended), or already full of wake-ups
            pass

    # -- paho callbacks (network thread) ------------------------------------------------

    def _connack_cb(self, code: int, session_present: bool) -> None:
        self._connack = (code, session_present)

    def _suback_cb(self, mid: int, granted: list[int]) -> None:
        if mid in self._subacks:
            self._subacks[mid] = granted

    def _puback_cb(self, _client: Any, _userdata: Any, mid: int, *_: Any) -> None:
        # paho's on_publish, as is (1.6 and 2.x): called once per acknowledged message.
        message = self._inflight.pop(mid, None)
        if message is not None:
            self._acked.append(message)

    def _message_cb(self, topic: str, payload: bytes) -> None:
        try:
            response = parse_twin_response(topic)
            if response is not None:
                request = self._twins.finish(response.request_id)
                if request is not None:
                    error = twin_error(response.status, request.operation, payload)
                    if error is not None:
                        settle(request.future, error=error)
                    else:
                        settle(request.future, result=(payload, response.version))
                return
            self._route(topic, payload)
        except Exception:
            logger.exception("could not process a message on %r", topic)

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - a bug must not leave callers hanging
            logger.exception("the MQTT network thread failed")
            self._finish(exc)
        finally:
            self._drop()
            closer = getattr(self._poller, "close", None)
            if callable(closer):
                closer()
            for sock in (self._wake_r, self._wake_w):
                sock.close()

    def _loop(self) -> None:
        backoff = Backoff(self._config.options.retry)
        first = True
        while True:
            self._on_state(ConnectionState.CONNECTING, None)
            try:
                self._establish()
            except _Closing:
                self._finish(None)
                return
            except BaseException as exc:
                self._drop()
                if first:
                    self._finish(None, first_error=exc)
                    return
                if is_permanent(exc) or exc is self._permanent:
                    logger.error("reconnecting is pointless, giving up: %s", exc)
                    self._finish(exc)
                    return
                delay = backoff.next_delay()
                if delay is None:
                    logger.error(
                        "giving up after %d reconnection attempts: %s", backoff.attempts, exc
                    )
                    self._finish(exc)
                    return
                logger.warning(
                    "reconnection attempt %d failed (%s); next attempt in %.1f s",
                    backoff.attempts - 1,
                    exc,
                    delay,
                )
                if not self._idle(delay):
                    self._finish(None)
                    return
                continue
            backoff.connected()
            self.connected.set()
            self._on_state(ConnectionState.CONNECTED, None)
            if first:
                first = False
                self.first.set_result(None)
            else:
                self.reconnects += 1
                logger.info("reconnected to %s (%s)", self._config.server_hostname, self.tls_info)
            reason = self._serve()
            self.connected.clear()
            self._established = False
            self._requeue_twins()
            if reason == "closing":
                self._finish(None)
                return
            self._on_state(ConnectionState.DISCONNECTED, self._lost_error(reason))
            backoff.lost()  # a healthy connection starts the schedule again
            if reason == "renew":
                logger.info("reconnecting with a fresh SAS token")
                continue
            delay = backoff.next_delay()
            if delay is None:  # max_attempts used up by connections that never held
                error = ConnectionFailedError(
                    f"lost the connection to {self._config.server_hostname} after "
                    f"{backoff.attempts} reconnections without a healthy connection; "
                    "giving up (RetryPolicy.max_attempts)"
                )
                logger.error("%s", error)
                self._finish(error)
                return
            logger.warning(
                "lost the connection to %s; reconnecting in %.1f s",
                self._config.server_hostname,
                delay,
            )
            if not self._idle(delay):
                self._finish(None)
                return

    # connecting -------------------------------------------------------------------------

    def _establish(self) -> None:
        self._connack = None
        self._subacks = {}
        self._permanent = None
        self._renew_due = False
        self._fault = None
        self._fault_local = False
        self._drop()
        self._paho.watch_errors(True)
        try:
            self._connect_and_subscribe()
        finally:
            self._paho.watch_errors(False)
        self._established = True
        self._flush()

    def _connect_and_subscribe(self) -> None:
        cfg = self._config
        options = cfg.options
        password = cfg.sas.token() if cfg.sas is not None else None
        self._client.username_pw_set(cfg.username, password)
        if self._closing:
            raise _Closing
        try:
            self._paho.connect(cfg.server_hostname, cfg.port, options.keepalive)
        except IoTHubTLSError:
            raise  # the core's TLS refusals and our TCP errors, unchanged
        except (OSError, ValueError) as exc:
            # After TCP connect and the TLS handshake: a reset or refusal during the
            # WebSocket upgrade. (CONNECT itself is only queued here; a server that
            # closes the connection right after the handshake is noticed while
            # waiting for the CONNACK.)
            if isinstance(exc, ssl.SSLError) or self._paho.socket() is not None:
                raise self._closed_before_connack(str(exc)) from exc
            raise ConnectionFailedError(
                f"connection to {cfg.connect_host}:{cfg.port} failed after TCP connect: {exc}"
            ) from exc
        self._attach()

        deadline = time.monotonic() + options.connect_timeout
        while self._connack is None:
            alive = self._wait_step(deadline, "a CONNACK (the answer to MQTT CONNECT)")
            if self._connack is None and not alive:
                raise self._closed_before_connack()
        code, _session_present = self._connack
        refusal = connack_error(code, cfg.server_hostname)
        if refusal is not None:
            error, retryable = refusal
            if not retryable:
                self._permanent = error
            raise error
        ssl_sock = self._paho.ssl_socket()
        if ssl_sock is not None:
            self.tls_info = tls_info(ssl_sock)

        # (Re)subscribe every time: cheap, and correct whether or not the hub kept the
        # session. QoS 1 for C2D (the hub redelivers until PUBACK), 0 for twin/methods.
        filters = [(TWIN_RESPONSE_FILTER, 0), (TWIN_DESIRED_FILTER, 0), (METHODS_FILTER, 0)]
        if cfg.cs.module_id is None:
            filters.insert(0, (c2d_filter(cfg.cs.device_id), 1))
        by_mid: dict[int, str] = {}
        for topic_filter, qos in filters:
            rc, mid = self._client.subscribe(topic_filter, qos)
            if rc != self._paho.success:
                raise ConnectionFailedError(f"could not subscribe to {topic_filter} (paho rc {rc})")
            self._subacks[mid] = None
            by_mid[mid] = topic_filter
        while any(v is None for v in self._subacks.values()):
            if not self._wait_step(deadline, "the SUBACKs") and any(
                v is None for v in self._subacks.values()
            ):
                error = ConnectionFailedError(
                    f"{cfg.server_hostname} closed the connection while subscribing"
                )
                raise error from self._fault
        for mid, granted in self._subacks.items():
            if granted is not None and any(g >= 0x80 for g in granted):
                raise NotAuthorizedError(
                    f"{cfg.server_hostname} refused the subscription to {by_mid[mid]} "
                    "(SUBACK 0x80): this identity may not use that feature"
                )

    def _closed_before_connack(self, detail: str | None = None) -> ClientError:
        host = self._config.server_hostname
        detail = detail or self._paho.last_error
        if detail is None and self._fault is not None:
            detail = f"{type(self._fault).__name__}: {self._fault}"
        if detail is not None and is_certificate_alert(detail):
            error: ClientError = AuthenticationError(
                f"{host} refused the device certificate ({detail}): check that the "
                "certificate is registered with (or chains to a CA trusted by) the server"
            )
        else:
            hint = ""
            if self._config.context.identity is not None:
                hint = (
                    " If the server checks client certificates it may have refused the "
                    "device certificate (TLS 1.3 servers do so after the handshake)."
                )
            error = ConnectionFailedError(
                f"{host} closed the connection before answering MQTT CONNECT"
                f"{f' ({detail})' if detail else ''}: it may not speak MQTT 3.1.1 on this "
                f"port, or it refused the connection.{hint}"
            )
        error.__cause__ = self._fault
        return error

    def _wait_step(self, deadline: float, what: str) -> bool:
        self._now = now = time.monotonic()
        if now >= deadline:
            raise OperationTimeoutError(
                f"no answer from {self._config.server_hostname} within "
                f"{self._config.options.connect_timeout:g} s while waiting for {what}: the "
                "server accepted TLS but does not answer MQTT"
            )
        alive = self._pump(deadline)
        if self._closing:
            raise _Closing
        if not alive and self._fault_local:
            fault = self._fault
            raise ConnectionFailedError(
                f"the client's network loop failed while waiting for {what} from "
                f"{self._config.server_hostname}: {type(fault).__name__}: {fault}"
            ) from fault
        return alive

    # the socket ---------------------------------------------------------------------------

    def _attach(self) -> None:
        """Watch the freshly connected socket."""
        sock = self._client.socket()
        if sock is None:
            return
        fd = sock.fileno()
        mask = IN | OUT if self._client.want_write() else IN
        try:
            self._poller.register(fd, mask)
        except (OSError, ValueError) as exc:
            self._drop()
            raise ConnectionFailedError(
                f"could not watch the connection to {self._config.server_hostname} "
                f"(descriptor {fd}): {exc}"
            ) from exc
        self._sock_fd = fd
        self._mask = mask
        self._pending_of = getattr(sock, "pending", None)
        self._pending = 0

    def _drop(self) -> None:
        """Close the connection (if any) and stop watching it."""
        self._paho.force_close()
        if self._sock_fd is not None:
            with contextlib.suppress(KeyError, OSError, ValueError):
                self._poller.unregister(self._sock_fd)
            self._sock_fd = None
        self._pending = 0

    def _fail(self, exc: BaseException, *, local: bool) -> bool:
        if local:
            logger.error("the MQTT network loop failed: %s: %s", type(exc).__name__, exc)
        elif isinstance(exc, OSError | ValueError):
            logger.warning("connection error: %s", exc)
        else:  # a paho bug or a malformed packet must not end the thread
            logger.error("unexpected error on the MQTT connection; reconnecting", exc_info=exc)
        self._fault = exc
        self._fault_local = local
        self._drop()
        return False

    def _pump(self, until: float) -> bool:
        """One round: wait for the socket or a command (until ``until`` at the latest,
        or the next chores), then take commands, read, do the chores, and write what
        all of that queued; False once the connection is gone."""
        client = self._client
        # Packets queued since the last round (CONNECT, SUBSCRIBE, what is left of a
        # write the socket did not take) make the round wait for writability as well.
        mask = IN | OUT if client.want_write() else IN
        if mask != self._mask and self._sock_fd is not None:
            self._mask = mask
            try:
                self._poller.modify(self._sock_fd, mask)
            except (OSError, ValueError) as exc:
                return self._fail(exc, local=True)
        due = self._chores_due
        wait_for = (due if due < until else until) - self._now
        try:
            # whole milliseconds, rounded up so that no deadline is missed
            events = self._poller.poll(0 if self._pending or wait_for <= 0 else wait_for * 1000 + 1)
        except (OSError, ValueError) as exc:  # this side's failure, not the peer's
            return self._fail(exc, local=True)
        try:
            readable = False
            for fd, flags in events:
                if fd == self._wake_fd:
                    self._take_commands()
                else:
                    readable = bool(flags & READABLE)
            if readable or self._pending:
                client.loop_read()
                sock = client.socket()
                pending = self._pending_of
                self._pending = pending() if pending is not None and sock is not None else 0
            self._now = now = time.monotonic()
            if now >= due:
                self._chores(now)
            # paho only queues packets (see Paho): the round's telemetry, the PUBLISHes
            # its PUBACKs released from paho's in-flight window, the PUBACKs for C2D
            # messages and a PINGREQ go out here, back to back, before the senders wake.
            if client.want_write():
                client.loop_write()
        except Exception as exc:
            return self._fail(exc, local=False)
        finally:
            if self._acked:
                self._complete_acked()
        if client.socket() is None:
            self._drop()
            return False
        return True

    def _chores(self, now: float) -> None:
        """Keep-alive, twin deadlines and token renewal (not per message)."""
        due = now + CHORES_INTERVAL
        if self._sock_fd is not None and self._client.socket() is not None:
            self._client.loop_misc()
        self._expire_twins(now)
        for request in self._twin_waiting:
            due = min(due, request.deadline)
        tracked = self._twins.next_deadline()
        if tracked is not None:
            due = min(due, tracked)
        self._chores_due = due
        sas = self._config.sas
        if self._established and sas is not None and sas.needs_renewal():
            self._renew_due = True

    # serving ----------------------------------------------------------------------------

    def _serve(self) -> str:
        pump = self._pump
        forever = math.inf
        while True:
            if self._closing:
                self._disconnect()
                return "closing"
            if self._renew_due:
                self._disconnect()
                return "renew"
            if not pump(forever):
                return "lost"

    def _idle(self, delay: float) -> bool:
        """Wait ``delay`` seconds between attempts, still taking commands; False when
        close() was called."""
        deadline = time.monotonic() + delay
        while not self._closing:
            self._now = now = time.monotonic()
            if now >= deadline:
                return True
            if now >= self._chores_due:
                self._chores(now)
            wait_for = min(deadline, self._chores_due) - now
            try:
                events = self._poller.poll(millis(wait_for))
            except (OSError, ValueError) as exc:
                logger.error("the MQTT network loop failed: %s: %s", type(exc).__name__, exc)
                time.sleep(max(wait_for, 0.0))
                continue
            if events:
                self._take_commands()
        return False

    def _disconnect(self) -> None:
        """A clean MQTT DISCONNECT (so the hub does not publish a will), bounded in time."""
        paho = self._paho
        if paho.socket() is not None:
            with contextlib.suppress(Exception):
                paho.client.disconnect()
            # paho writes what is still queued, then DISCONNECT, and closes the socket:
            # normally in the first pass; a full send buffer takes a few.
            deadline = time.monotonic() + 2.0
            while True:
                with contextlib.suppress(Exception):
                    paho.client.loop_write()
                    if paho.socket() is not None:
                        paho.client.loop_read()
                if paho.socket() is None or time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
        self._drop()
        if self._acked:
            self._complete_acked()

    # commands ---------------------------------------------------------------------------

    def _take_commands(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)
        commands: list[TwinRequest | MethodResponse] = []
        with self._lock:
            self._signalled = False
            if self._incoming:
                self._outbox.extend(self._incoming)
                self._incoming.clear()
            if self._commands:
                commands.extend(self._commands)
                self._commands.clear()
        for command in commands:
            if isinstance(command, TwinRequest):
                self._twin_waiting.append(command)
                self._chores_due = min(self._chores_due, command.deadline)
            else:
                self._send_method_response(command)
        if self._established:
            self._flush()

    def _flush(self) -> None:
        client = self._client
        outbox = self._outbox
        if outbox:
            inflight = self._inflight
            publish = client.publish
            accepted = (self._paho.success, self._paho.no_connection)
            while outbox and client.socket() is not None:
                message = outbox.popleft()
                if not message.set_running_or_notify_cancel():
                    continue  # the sender timed out and withdrew it
                try:
                    info = publish(message.topic, message.payload, 1)
                except ValueError as exc:
                    self._fail_messages([message], f"paho refused the message: {exc}", exc)
                    continue
                if info.rc in accepted:
                    # paho keeps QoS 1 messages and resends them after a reconnect.
                    inflight[info.mid] = message
                else:
                    self._fail_messages(
                        [message],
                        f"the message could not be queued for sending (paho rc {info.rc})",
                        None,
                    )
        while self._twin_waiting and client.socket() is not None:
            request = self._twin_waiting.popleft()
            if request.future.done():
                continue
            rid = self._twins.start(request, request.deadline)
            topic = twin_get_topic(rid) if request.operation == "GET" else twin_patch_topic(rid)
            client.publish(topic, request.payload, qos=0)

    def _complete_acked(self) -> None:
        """Settle the acknowledged messages: their places in the queue are given back
        first, so a sender that wakes up can send again at once."""
        acked, self._acked = self._acked, []
        with self._lock:
            self._outstanding -= len(acked)
        for message in acked:
            settle(message)

    def _fail_messages(
        self, messages: Iterable[Message], reason: str, cause: BaseException | None
    ) -> None:
        """Fail messages that are running (taken out of the outbox and not cancelled)."""
        doomed = list(messages)
        with self._lock:
            self._outstanding -= len(doomed)
        for message in doomed:
            error = DeliveryError(reason)
            error.__cause__ = cause
            settle(message, error=error)

    def _send_method_response(self, response: MethodResponse) -> None:
        if not self._established or self._paho.socket() is None:
            logger.warning(
                "the connection was lost before the answer to method request %s could be "
                "sent; the caller will see a timeout",
                response.request_id,
            )
            return
        topic = method_response_topic(response.status, response.request_id)
        self._client.publish(topic, response.payload, qos=0)

    def _requeue_twins(self) -> None:
        """Twin requests unanswered when the connection dropped are sent again (with new
        request ids) after the reconnection; GET and PATCH are both idempotent."""
        pending = [request for _, request in self._twins.pending()]
        self._twins.drain()
        self._twin_waiting.extendleft(reversed(pending))

    def _expire_twins(self, now: float) -> None:
        expired = self._twins.expire(now)
        expired += [r for r in self._twin_waiting if r.deadline <= now]
        if not expired:
            return
        self._twin_waiting = collections.deque(r for r in self._twin_waiting if r.deadline > now)
        for request in expired:
            settle(
                request.future,
                error=OperationTimeoutError(
                    f"the hub did not answer the twin {request.operation} in time"
                ),
            )

    # ending -----------------------------------------------------------------------------

    def _lost_error(self, reason: str) -> ClientError | None:
        """Why a working connection ended (None for a planned reconnection)."""
        if reason == "renew":
            return None
        fault = self._fault
        error = ConnectionFailedError(
            f"lost the connection to {self._config.server_hostname}"
            f"{f': {type(fault).__name__}: {fault}' if fault is not None else ''}"
        )
        error.__cause__ = fault
        return error

    def _finish(
        self, failure: BaseException | None, first_error: BaseException | None = None
    ) -> None:
        """Stop accepting commands and settle everything still pending."""
        with self._lock:
            self._alive = False
            self.failure = failure
        self._on_state(ConnectionState.CLOSED, failure or first_error)
        self.connected.clear()
        self._established = False
        self._take_commands()
        if self._acked:
            self._complete_acked()
        if first_error is not None:
            settle(self.first, error=first_error)
        elif not self.first.done():
            settle(
                self.first, error=ConnectionFailedError("the client was closed while connecting")
            )
        reason = (
            f"the connection failed for good ({failure})"
            if failure is not None
            else "the client was closed"
        )
        running = list(self._inflight.values())
        running += [m for m in self._outbox if m.set_running_or_notify_cancel()]
        self._inflight.clear()
        self._outbox.clear()
        self._fail_messages(running, f"{reason} before the hub acknowledged the message", failure)
        for request in [*self._twin_waiting, *self._twins.drain()]:
            lost = ConnectionFailedError(f"{reason} before the hub answered the twin request")
            lost.__cause__ = failure
            settle(request.future, error=lost)
        self._twin_waiting.clear()
