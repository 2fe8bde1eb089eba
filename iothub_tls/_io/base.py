"""What the three device clients share above their transports: the callbacks and the
one place they are called from, connection-state reporting, the cloud-to-device queue
behind ``receive_c2d``, direct-method routing, and the ``with`` life cycle.

A transport calls ``_set_state``, ``_incoming_c2d``, ``_incoming_desired``,
``_incoming_method`` and ``_report`` from its I/O side; everything user-supplied runs on
the client's callback thread (:mod:`._dispatch`), never on the I/O side.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..device import C2DMessage, ConnectionState, MethodHandler, MethodRouter
from ..errors import OperationTimeoutError, PolicyError, UnsupportedOperationError
from .dispatch import Dispatcher
from .lifecycle import Connectable

if TYPE_CHECKING:
    from ..auth import ClientIdentity, ConnectionString

logger = logging.getLogger("iothub_tls")

_Self = TypeVar("_Self", bound="Factories")

StateCallback = Callable[[ConnectionState, "BaseException | None"], None]


class Factories:
    """The three factories every device client has (sync and asyncio); each client's
    constructor takes ``(connection_string, **its keywords)``."""

    @classmethod
    def from_connection_string(
        cls: type[_Self], connection_string: str | ConnectionString, **kwargs: Any
    ) -> _Self:
        """A client for the device (or module) of ``HostName=...;DeviceId=...;`` and one
        of ``SharedAccessKey=...``, ``SharedAccessSignature=...`` or ``x509=true`` (then
        with ``identity=``); ``ModuleId``, ``SharedAccessKeyName`` and
        ``GatewayHostName`` are honoured.

        :raises ConnectionStringError: naming the malformed part (never the key).
        :raises IdentityError: x509=true without ``identity``, or a key and an identity.
        """
        from ..auth import ConnectionString

        return _build(cls, ConnectionString.coerce(connection_string), kwargs)

    @classmethod
    def from_symmetric_key(
        cls: type[_Self],
        host_name: str,
        device_id: str,
        key: str,
        *,
        module_id: str | None = None,
        **kwargs: Any,
    ) -> _Self:
        """A client for a device (or module) that authenticates with its symmetric key
        (SAS tokens are made from it and renewed)."""
        from ..auth import ConnectionString

        cs = ConnectionString(
            host_name=host_name, device_id=device_id, module_id=module_id, shared_access_key=key
        )
        return _build(cls, cs, kwargs)

    @classmethod
    def from_x509(
        cls: type[_Self],
        host_name: str,
        device_id: str,
        identity: ClientIdentity,
        *,
        module_id: str | None = None,
        **kwargs: Any,
    ) -> _Self:
        """A client for a device (or module) that authenticates with its X.509
        certificate (mutual TLS)."""
        from ..auth import ConnectionString

        cs = ConnectionString(
            host_name=host_name, device_id=device_id, module_id=module_id, x509=True
        )
        return _build(cls, cs, {**kwargs, "identity": identity})


class ClientBase(Factories, Connectable):
    """Callbacks and routing common to every device client."""

    #: "mqtt", "amqp" or "https"
    transport: ClassVar[str] = ""

    def __init__(self, name: str, operation_timeout: float) -> None:
        self._on_c2d: Callable[[C2DMessage], None] | None = None
        self.on_connection_state_change: StateCallback | None = None
        """Called with ``(state, reason)`` at every :class:`ConnectionState` change;
        ``reason`` is the error behind a DISCONNECTED or a CLOSED that was not asked
        for, else None."""
        self.on_background_exception: Callable[[BaseException], None] | None = None
        """Called with any exception raised by another callback or a method handler
        (without it, such exceptions are only logged)."""
        self._on_desired_update: Callable[[dict[str, Any]], None] | None = None
        self._state = ConnectionState.CLOSED
        self._operation_timeout = operation_timeout
        self._callbacks = Dispatcher(name, report=self._report_now)
        self._c2d_queue: queue.SimpleQueue[C2DMessage] = queue.SimpleQueue()
        self._methods = MethodRouter(report=self._report)

    @property
    def on_c2d(self) -> Callable[[C2DMessage], None] | None:
        """Called (on the callback thread) with each cloud-to-device message; while it
        is None, messages wait for ``receive_c2d``."""
        return self._on_c2d

    @on_c2d.setter
    def on_c2d(self, callback: Callable[[C2DMessage], None] | None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError("on_c2d must be callable or None")
        self._on_c2d = callback
        self._c2d_callback_changed()

    def _c2d_callback_changed(self) -> None:
        """Hook: a transport that must fetch messages for the callback starts here."""

    # -- state --------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._state

    def _set_state(self, state: ConnectionState, reason: BaseException | None = None) -> None:
        if state is self._state and reason is None:
            return
        self._state = state
        callback = self.on_connection_state_change
        if callback is not None:
            self._callbacks.submit(callback, state, reason)

    # -- exceptions from callbacks ------------------------------------------------------

    def _report_now(self, exc: BaseException) -> None:
        handler = self.on_background_exception
        if handler is None:
            logger.error(
                "a callback of %s raised %s: %s (set on_background_exception to handle it)",
                self,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            return
        handler(exc)

    def _report(self, exc: BaseException) -> None:
        """Hand ``exc`` to ``on_background_exception`` (on the callback thread)."""
        if self._callbacks.on_thread:
            self._report_now(exc)
        else:
            self._callbacks.submit(self._report_now, exc)

    # -- cloud-to-device ----------------------------------------------------------------

    def _incoming_c2d(self, message: C2DMessage) -> None:
        callback = self._on_c2d
        if callback is not None:
            self._callbacks.submit(callback, message)
        else:
            self._c2d_queue.put(message)

    def _receive_c2d(self, timeout: float | None) -> C2DMessage:
        wait = self._operation_timeout if timeout is None else timeout
        try:
            return self._c2d_queue.get(timeout=max(wait, 0.0))
        except queue.Empty:
            raise OperationTimeoutError(
                f"no cloud-to-device message arrived within {wait:g} s"
            ) from None

    # -- twin and methods ---------------------------------------------------------------

    @property
    def on_desired_update(self) -> Callable[[dict[str, Any]], None] | None:
        """Called with each desired-properties patch (a dict including ``$version``).
        Patches sent while the device was offline are not replayed: call ``get_twin()``
        when the state becomes CONNECTED again."""
        return self._on_desired_update

    @on_desired_update.setter
    def on_desired_update(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError("on_desired_update must be callable or None")
        self._on_desired_update = callback
        self._desired_callback_changed()

    def _desired_callback_changed(self) -> None:
        """Hook: a transport that subscribes to desired updates on demand does it here."""

    def _incoming_desired(self, patch: dict[str, Any]) -> None:
        callback = self._on_desired_update
        if callback is not None:
            self._callbacks.submit(callback, patch)

    def on_method(self, name: str | None, handler: MethodHandler | None) -> None:
        """Answer direct method ``name`` (``None``: every method without a handler of
        its own) with ``handler(request) -> (status, payload)``; ``handler=None``
        removes it. Unknown methods are answered 404; a handler that raises, 500 (the
        exception goes to ``on_background_exception``)."""
        self._methods.register(name, handler)
        self._methods_changed()

    def _methods_changed(self) -> None:
        """Hook: a transport that attaches method links on demand does it here."""

    def _incoming_method(
        self, name: str, request_id: str, payload: bytes, respond: Callable[[int, bytes], None]
    ) -> None:
        """Run the handler on the callback thread, then ``respond(status, body)``."""

        def run() -> None:
            status, body = self._methods.invoke(name, request_id, payload)
            respond(status, body)

        self._callbacks.submit(run)

    def _stop_callbacks(self) -> None:
        self._callbacks.stop()


def _build(cls: type[_Self], cs: ConnectionString, kwargs: dict[str, Any]) -> _Self:
    # each client's constructor takes (connection_string, **its keywords)
    constructor: Any = cls
    built: _Self = constructor(cs, **kwargs)
    return built


def check_port(port: object, default: int) -> int:
    """``port`` (None: ``default``) as a valid TCP port, else :class:`PolicyError`."""
    if port is None:
        return default
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise PolicyError(f"port must be an int between 1 and 65535, not {port!r}")
    return port


def check_host(host: object) -> str | None:
    """``host`` (where to dial instead of the hub's name), else :class:`PolicyError`."""
    if host is not None and (not isinstance(host, str) or not host.strip()):
        raise PolicyError(f"host must be a non-empty host name or address, not {host!r}")
    return host


def unsupported(transport: str, what: str, use: str) -> UnsupportedOperationError:
    """The error for an operation IoT Hub does not offer over ``transport``."""
    return UnsupportedOperationError(f"IoT Hub offers no {what} over {transport}: {use}")
