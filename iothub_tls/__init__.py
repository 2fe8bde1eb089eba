"""iothub-tls: one hardened TLS configuration for Azure IoT Hub devices.

TLS 1.2+ (1.3 preferred), only IoT Hub's recommended cipher suites, an ECC-only mode,
root-only pinning, optional max fragment length, mutual TLS, and a report of what
each connection negotiated. See the README for the policy and a quickstart.
"""

from ._io.backoff import RetryPolicy
from .auth import ClientIdentity, ConnectionString, SasToken, generate_sas_token
from .context import HardenedSSLContext, create_ssl_context
from .device import (
    C2DMessage,
    ConnectionState,
    DeviceClient,
    Message,
    MethodRequest,
    Settlement,
)
from .errors import (
    AuthenticationError,
    CertificateVerificationError,
    CipherSuiteError,
    ClientError,
    ConnectionFailedError,
    ConnectionStringError,
    ConnectRefusedError,
    DeliveryError,
    FeatureUnavailableError,
    HandshakeClosedError,
    HandshakeTimeoutError,
    IdentityError,
    IncompatibleDependencyError,
    IoTHubTLSError,
    MissingDependencyError,
    NotAuthorizedError,
    OperationTimeoutError,
    PolicyError,
    PolicyViolation,
    ProtocolVersionError,
    QueueFullError,
    RootIntegrityError,
    RootStoreError,
    SasTokenError,
    TLSHandshakeError,
    UnsupportedOperationError,
)
from .info import TlsInfo, tls_info
from .policy import CipherProfile, CipherSuite, TlsPolicy, Trust
from .roots import AZURE_ECC, AZURE_GLOBAL, RootSet

__version__ = "0.1.0"

__all__ = [
    "AZURE_ECC",
    "AZURE_GLOBAL",
    "AuthenticationError",
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
    "FeatureUnavailableError",
    "HandshakeClosedError",
    "HandshakeTimeoutError",
    "HardenedSSLContext",
    "IdentityError",
    "IncompatibleDependencyError",
    "IoTHubTLSError",
    "Message",
    "MethodRequest",
    "MissingDependencyError",
    "NotAuthorizedError",
    "OperationTimeoutError",
    "PolicyError",
    "PolicyViolation",
    "ProtocolVersionError",
    "QueueFullError",
    "RetryPolicy",
    "RootIntegrityError",
    "RootSet",
    "RootStoreError",
    "SasToken",
    "SasTokenError",
    "Settlement",
    "TLSHandshakeError",
    "TlsInfo",
    "TlsPolicy",
    "Trust",
    "UnsupportedOperationError",
    "__version__",
    "create_ssl_context",
    "generate_sas_token",
    "tls_info",
]
