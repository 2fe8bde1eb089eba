"""iothub-tls: one hardened TLS configuration for Azure IoT Hub devices.

TLS 1.2+ (1.3 preferred), only IoT Hub's recommended cipher suites, an ECC-only mode,
root-only pinning, optional max fragment length, mutual TLS, and a report of what
each connection negotiated. See the README for the policy and a quickstart.
"""

import logging as _logging

from .auth import ClientIdentity, ConnectionString, SasToken, generate_sas_token
from .context import HardenedSSLContext, create_ssl_context
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
)
from .info import TlsInfo, tls_info
from .policy import CipherProfile, CipherSuite, TlsPolicy, Trust
from .roots import AZURE_ECC, AZURE_GLOBAL, RootSet

__version__ = "0.1.0"

# A library stays quiet: without this, Python's last-resort handler prints the package's
# warnings to stderr when the application configures no logging.
_logging.getLogger("iothub_tls").addHandler(_logging.NullHandler())

__all__ = [
    "AZURE_ECC",
    "AZURE_GLOBAL",
    "AuthenticationError",
    "CertificateVerificationError",
    "CipherProfile",
    "CipherSuite",
    "CipherSuiteError",
    "ClientError",
    "ClientIdentity",
    "ConnectRefusedError",
    "ConnectionFailedError",
    "ConnectionString",
    "ConnectionStringError",
    "DeliveryError",
    "FeatureUnavailableError",
    "HandshakeClosedError",
    "HandshakeTimeoutError",
    "HardenedSSLContext",
    "IdentityError",
    "IncompatibleDependencyError",
    "IoTHubTLSError",
    "MissingDependencyError",
    "NotAuthorizedError",
    "OperationTimeoutError",
    "PolicyError",
    "PolicyViolation",
    "ProtocolVersionError",
    "QueueFullError",
    "RootIntegrityError",
    "RootSet",
    "RootStoreError",
    "SasToken",
    "SasTokenError",
    "TLSHandshakeError",
    "TlsInfo",
    "TlsPolicy",
    "Trust",
    "__version__",
    "create_ssl_context",
    "generate_sas_token",
    "tls_info",
]
