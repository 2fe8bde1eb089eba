"""The test suite's fault proxy: :mod:`iothub_tls.testing.faultproxy`."""

from __future__ import annotations

from iothub_tls.testing.faultproxy import FaultProxy

__all__ = ["FaultProxy"]
