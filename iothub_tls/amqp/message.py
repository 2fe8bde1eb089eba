"""The AMQP 1.0 message as this package handles it: a plain, immutable value.

:class:`AmqpMessage` is what the client sends and receives and what the conventions of
:mod:`iothub_tls.amqp.conventions` build and read, on the device side and in the local
hub alike. Only :func:`encode` / :func:`decode` (and the two methods they use) touch
proton, imported when they are first called: building and reading messages needs no
AMQP engine.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AmqpMessage", "decode", "encode"]


@dataclass(frozen=True)
class AmqpMessage:
    """An AMQP 1.0 message.

    ``body`` bytes travel as a *data* section (what IoT Hub expects for telemetry);
    any other value (str, int, list, dict ...) as an *amqp-value* section.
    ``properties`` are the application properties; ``annotations`` the message
    annotations (their keys travel as symbols). ``delivery_count`` is the header's
    count of earlier delivery attempts.
    """

    body: Any = b""
    properties: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | int | uuid.UUID | bytes | None = None
    correlation_id: str | int | uuid.UUID | bytes | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    to: str | None = None
    reply_to: str | None = None
    subject: str | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)
    durable: bool = False
    delivery_count: int = 0

    def _to_proton(self) -> Any:
        from proton import Message, symbol

        message: Any = Message()
        if isinstance(self.body, bytes | bytearray | memoryview):
            message.body = bytes(self.body)
            message.inferred = True  # binary body -> data section
        else:
            message.body = self.body
        if self.properties:
            message.properties = dict(self.properties)
        if self.message_id is not None:
            message.id = self.message_id
        if self.correlation_id is not None:
            message.correlation_id = self.correlation_id
        if self.content_type is not None:
            message.content_type = self.content_type
        if self.content_encoding is not None:
            message.content_encoding = self.content_encoding
        if self.to is not None:
            message.address = self.to
        if self.reply_to is not None:
            message.reply_to = self.reply_to
        if self.subject is not None:
            message.subject = self.subject
        if self.annotations:
            message.annotations = {symbol(k): v for k, v in self.annotations.items()}
        message.durable = self.durable
        if self.delivery_count:
            message.delivery_count = self.delivery_count
        return message

    @classmethod
    def _from_proton(cls, message: Any) -> AmqpMessage:
        body = _plain(message.body)
        return cls(
            body=b"" if body is None else body,
            properties={str(k): _plain(v) for k, v in (message.properties or {}).items()},
            message_id=_plain(message.id),
            correlation_id=_plain(message.correlation_id),
            content_type=_symbol_field(message, "content_type"),
            content_encoding=_symbol_field(message, "content_encoding"),
            to=message.address,
            reply_to=message.reply_to,
            subject=message.subject,
            annotations={str(k): _plain(v) for k, v in (message.annotations or {}).items()},
            durable=bool(message.durable),
            delivery_count=int(message.delivery_count or 0),
        )


def _symbol_field(message: Any, name: str) -> str | None:
    """``content_type`` / ``content_encoding`` of a proton message, None when absent.

    proton's properties return ``symbol(None)``, i.e. the text "None", for a field the
    message does not have; the C accessor behind them tells the two apart.
    """
    try:
        from proton import _message

        raw = getattr(_message, f"pn_message_get_{name}")(message._msg)
    except (ImportError, AttributeError):  # pragma: no cover - another proton layout
        value = str(getattr(message, name) or "")
        return None if value in ("", "None") else value
    return None if raw is None else str(raw)


def _plain(value: Any) -> Any:
    """Copy proton's views into plain Python values (a memoryview points into a buffer
    the engine reuses)."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def encode(message: AmqpMessage) -> bytes:
    """The message in AMQP 1.0's wire format (the payload of a transfer), encoded by
    proton (:func:`iothub_tls.amqp.engine.encode_message`)."""
    from .engine import encode_message

    return encode_message(message._to_proton())


def decode(data: bytes) -> AmqpMessage:
    """A message from AMQP 1.0's wire format.

    :raises proton.MessageException: ``data`` is not an AMQP message.
    """
    from .engine import decode_message

    return AmqpMessage._from_proton(decode_message(data))
