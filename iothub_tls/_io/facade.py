"""The synchronous device clients: thin facades over the asyncio ones.

A facade owns an asyncio client that lives on the process's shared I/O loop
(:func:`~iothub_tls._io.loop.shared_loop`) and turns each call into a wait for the
loop's answer. Callbacks run on the shared callback thread, never on the loop. The
attributes an application sets (``on_c2d``...) are forwarded to the asyncio client,
where the loop reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar, TypeVar

from ..device import C2DMessage, ConnectionState, MethodHandler
from ..tls.info import TlsInfo
from .base import Factories
from .lifecycle import Connectable
from .loop import SharedLoop, shared_loop

_T = TypeVar("_T")


def _forwarded(name: str, doc: str) -> Any:
    def get(self: SyncFacade) -> Any:
        return getattr(self._aio, name)

    def set_(self: SyncFacade, value: Any) -> None:
        # Setters may start work on the loop (subscriptions, polling): run them there.
        self._call(lambda: setattr(self._aio, name, value))

    return property(get, set_, doc=doc)


class SyncFacade(Factories, Connectable):
    """What the synchronous MQTT, AMQP and HTTPS clients share."""

    transport: ClassVar[str] = ""

    _aio: Any
    _io: SharedLoop

    def _attach(self, aio: Any) -> None:
        self._io = shared_loop()
        self._aio = aio
        aio._run_callbacks_on_thread(self._io.loop)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._io.run(coro)

    def _call(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the loop (synchronously when already there)."""
        if self._io.on_loop_thread:
            return fn()

        async def call() -> _T:
            return fn()

        return self._io.run(call())

    # -- callbacks (set from any thread; run on the callback thread) ---------------------

    on_c2d = _forwarded(
        "on_c2d",
        "Called with each cloud-to-device message; while it is None, messages wait for "
        ":meth:`receive_c2d`.",
    )
    on_connection_state_change = _forwarded(
        "on_connection_state_change",
        "Called with ``(state, reason)`` at every :class:`~iothub_tls.ConnectionState` "
        "change; ``reason`` is the error behind a DISCONNECTED or a CLOSED that was not "
        "asked for, else None.",
    )
    on_background_exception = _forwarded(
        "on_background_exception",
        "Called with any exception raised by another callback or a method handler "
        "(without it, such exceptions are logged).",
    )
    on_desired_update = _forwarded(
        "on_desired_update",
        "Called with each desired-properties patch (a dict including ``$version``). "
        "Patches sent while the device was offline are not replayed: call "
        ":meth:`get_twin` when the state becomes CONNECTED again.",
    )

    def on_method(self, name: str | None, handler: MethodHandler | None) -> None:
        """Answer direct method ``name`` (``None``: every method without a handler of
        its own) with ``handler(request) -> (status, payload)``, run on the callback
        thread; ``handler=None`` removes it. Unknown methods are answered 404; a handler
        that raises, 500 (the exception goes to ``on_background_exception``)."""
        self._call(lambda: self._aio.on_method(name, handler))

    # -- what it is ---------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return str(self._aio.device_id)

    @property
    def module_id(self) -> str | None:
        module: str | None = self._aio.module_id
        return module

    @property
    def state(self) -> ConnectionState:
        """The current :class:`~iothub_tls.ConnectionState`."""
        state: ConnectionState = self._aio.state
        return state

    @property
    def connected(self) -> bool:
        return bool(self._aio.connected)

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the current (or last) connection negotiated; None before connect()."""
        info: TlsInfo | None = self._aio.tls_info
        return info

    def __repr__(self) -> str:
        return repr(self._aio)

    # -- life cycle ---------------------------------------------------------------------

    def connect(self) -> None:
        """Connect and authenticate; return when the client is ready. The first
        connection is not retried: its failure is raised here. Later losses are healed
        in the background and reported to ``on_connection_state_change``."""
        self._run(self._aio.connect())

    def close(self) -> None:
        """Disconnect cleanly; messages not yet acknowledged fail with DeliveryError. A
        later :meth:`connect` starts afresh."""
        self._run(self._aio.close())

    # -- cloud-to-device, twin ----------------------------------------------------------

    def receive_c2d(self, timeout: float | None = None) -> C2DMessage:
        """The next cloud-to-device message (those not taken by :attr:`on_c2d`).

        :raises OperationTimeoutError: none arrived within ``timeout`` seconds.
        """
        message: C2DMessage = self._run(self._aio.receive_c2d(timeout))
        return message

    def get_twin(self, timeout: float | None = None) -> dict[str, Any]:
        """The device twin: ``{"desired": {...}, "reported": {...}}``."""
        twin: dict[str, Any] = self._run(self._aio.get_twin(timeout))
        return twin

    def patch_reported(self, patch: Mapping[str, Any], timeout: float | None = None) -> int | None:
        """Update reported properties (``None`` deletes one); the twin's new
        ``$version`` when the hub reports it."""
        version: int | None = self._run(self._aio.patch_reported(patch, timeout))
        return version
