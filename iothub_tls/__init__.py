"""iothub-tls: one hardened TLS configuration for Azure IoT Hub devices.

TLS 1.2+ (1.3 preferred), only IoT Hub's recommended cipher suites, an ECC-only mode,
root-only pinning, optional max fragment length, mutual TLS, and a report of what
each connection negotiated. See the README for the policy and a quickstart.
"""

import logging as _logging
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._io.backoff import RetryPolicy
from .auth import ConnectionString, SasToken, generate_sas_token
from .device import (
    AsyncDeviceClient,
    C2DMessage,
    ConnectionState,
    DeviceClient,
    Message,
    MethodHandler,
    MethodRequest,
    Settlement,
)
from .errors import (
    AuditInputError,
    AuthenticationError,
    BadRequestError,
    CertificateVerificationError,
    CipherSuiteError,
    ClientError,
    ConnectionFailedError,
    ConnectionStringError,
    ConnectRefusedError,
    DeliveryError,
    DeviceNotFoundError,
    FeatureUnavailableError,
    HandshakeClosedError,
    HandshakeTimeoutError,
    HardwareKeyError,
    HardwareModuleError,
    HardwareObjectNotFoundError,
    HardwareSigningError,
    HubServerError,
    IdentityError,
    IncompatibleDependencyError,
    InvalidMessageError,
    IoTHubTLSError,
    KeyMismatchError,
    MessageLockLostError,
    MessageTooLargeError,
    MissingDependencyError,
    NotAuthorizedError,
    OperationTimeoutError,
    PolicyError,
    PolicyViolation,
    ProtocolVersionError,
    ProvisioningError,
    ProxyAuthenticationError,
    ProxyError,
    QueueFullError,
    RootIntegrityError,
    RootStoreError,
    SasTokenError,
    ThrottledError,
    TLSHandshakeError,
    TokenNotFoundError,
    TokenPinError,
    TokenRemovedError,
    UnexpectedResponseError,
    UnsupportedOperationError,
)
from .policy import CipherProfile, CipherSuite, TlsPolicy, Trust
from .roots import AZURE_ECC, AZURE_GLOBAL, RootSet
from .tls.context import HardenedSSLContext, create_ssl_context
from .tls.info import TlsInfo, tls_info

if _TYPE_CHECKING:
    from .auth.identity import ClientIdentity

__version__ = "0.2.0"

# A library stays quiet: without this, Python's last-resort handler prints the package's
# warnings to stderr when the application configures no logging.
_logging.getLogger("iothub_tls").addHandler(_logging.NullHandler())

__all__ = [
    "AZURE_ECC",
    "AZURE_GLOBAL",
    "AsyncDeviceClient",
    "AuditInputError",
    "AuthenticationError",
    "BadRequestError",
    "C2DMessage",
    "CertificateVerificationError",
    "CipherProfile",
    "CipherSuite",
    "CipherSuiteError",
    "ClientError",
    "ClientIdentity",
    "ConnectRefusedError",
    "ConnectionFailedError",
    "ConnectionState",
    "ConnectionString",
    "ConnectionStringError",
    "DeliveryError",
    "DeviceClient",
    "DeviceNotFoundError",
    "FeatureUnavailableError",
    "HandshakeClosedError",
    "HandshakeTimeoutError",
    "HardenedSSLContext",
    "HardwareKeyError",
    "HardwareModuleError",
    "HardwareObjectNotFoundError",
    "HardwareSigningError",
    "HubServerError",
    "IdentityError",
    "IncompatibleDependencyError",
    "InvalidMessageError",
    "IoTHubTLSError",
    "KeyMismatchError",
    "Message",
    "MessageLockLostError",
    "MessageTooLargeError",
    "MethodHandler",
    "MethodRequest",
    "MissingDependencyError",
    "NotAuthorizedError",
    "OperationTimeoutError",
    "PolicyError",
    "PolicyViolation",
    "ProtocolVersionError",
    "ProvisioningError",
    "ProxyAuthenticationError",
    "ProxyError",
    "QueueFullError",
    "RetryPolicy",
    "RootIntegrityError",
    "RootSet",
    "RootStoreError",
    "SasToken",
    "SasTokenError",
    "Settlement",
    "TLSHandshakeError",
    "ThrottledError",
    "TlsInfo",
    "TlsPolicy",
    "TokenNotFoundError",
    "TokenPinError",
    "TokenRemovedError",
    "Trust",
    "UnexpectedResponseError",
    "UnsupportedOperationError",
    "__version__",
    "create_ssl_context",
    "generate_sas_token",
    "tls_info",
]


if not _TYPE_CHECKING:  # hidden from type checkers, which see the import above

    def __getattr__(name: str) -> _Any:
        # ClientIdentity parses certificates (cryptography.x509): it is imported on first
        # use, so `import iothub_tls` and create_ssl_context() load no certificate parser.
        if name == "ClientIdentity":
            from .auth.identity import ClientIdentity

            globals()[name] = ClientIdentity
            return ClientIdentity
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), "ClientIdentity"})
