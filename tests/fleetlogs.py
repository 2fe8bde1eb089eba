"""The test suite's made-up fleet logs: :mod:`iothub_tls.testing.fleetlogs`."""

from __future__ import annotations

from iothub_tls.testing.fleetlogs import *  # noqa: F403
from iothub_tls.testing.fleetlogs import __all__ as __all__
