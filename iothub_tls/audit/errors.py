"""The audit's one error: an input it cannot read as a connection log."""

from __future__ import annotations

from ..errors import IoTHubTLSError

__all__ = ["AuditInputError"]


class AuditInputError(IoTHubTLSError, ValueError):
    """An input cannot be audited: missing, unreadable, or not a connection log at all
    (rows of a log that is one are counted and reported instead)."""
