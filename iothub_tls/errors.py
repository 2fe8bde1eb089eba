"""The exception tree of iothub-tls.

Every error the library raises derives from :class:`IoTHubTLSError`, and keeps a
standard-library base where one applies, so existing ``except ValueError`` or
``except ssl.SSLError`` handlers in an application still catch it::

    IoTHubTLSError
    ├── PolicyError (ValueError)                 invalid configuration, found before any I/O
    │   └── RootStoreError                       a root file or PEM that is not a usable root set
    │       └── RootIntegrityError               a shipped root whose SHA-256 fingerprint is wrong
    ├── IdentityError (ValueError)               device certificate / key unusable (bad PEM,
    │   │                                        wrong password, key does not match certificate)
    │   └── HardwareKeyError                     a key in a PKCS#11 token or a TPM is unusable
    │       ├── HardwareModuleError              the PKCS#11 module, the pkcs11 engine or the tpm2
    │       │                                    provider is missing or does not load
    │       ├── TokenNotFoundError (LookupError) no token present matches the URI
    │       ├── TokenPinError                    the PIN is missing, wrong or locked
    │       ├── HardwareObjectNotFoundError (LookupError)  no such key or certificate
    │       ├── KeyMismatchError                 the certificate does not belong to the key
    │       └── HardwareSigningError (TLSHandshakeError)  the key failed to sign in a handshake
    │           └── TokenRemovedError            the token was removed (or the TPM is gone)
    ├── ConnectionStringError (ValueError)       malformed IoT Hub connection string
    ├── SasTokenError (ValueError)               malformed, expired or wrongly signed SAS token
    ├── AuditInputError (ValueError)             ``iothub-tls audit``: an input that is missing,
    │                                            unreadable or not a connection log at all
    ├── FeatureUnavailableError (RuntimeError)   a requested protection needs the OpenSSL shim,
    │                                            which cannot work on this platform
    ├── MissingDependencyError (ImportError)     an optional extra is not installed
    ├── IncompatibleDependencyError (RuntimeError)  an installed package is a version a
    │                                            feature was not verified with
    ├── TLSHandshakeError (ssl.SSLError)         OpenSSL refused the handshake; the message keeps
    │   │                                        OpenSSL's reason and adds the rule and a remedy
    │   ├── ProtocolVersionError                 the peer does not speak TLS 1.2 or later
    │   ├── CipherSuiteError                     no cipher suite / signature algorithm in common
    │   └── HandshakeClosedError                 the peer closed the connection mid-handshake
    │       └── HandshakeTimeoutError (TimeoutError)  the peer stalled mid-handshake
    ├── CertificateVerificationError             (ssl.SSLCertVerificationError) the server
    │                                            certificate did not verify; ``verify_code`` and
    │                                            ``verify_message`` are OpenSSL's
    ├── PolicyViolation (ssl.SSLError)           the handshake completed but broke the policy
    │                                            (RSA leaf in ECC-only mode, fragment length not
    │                                            honoured when required, anchor outside the roots)
    └── ClientError                              transport-level failures of the device clients
        ├── ConnectionFailedError (ConnectionError)  could not connect / connection lost for good
        │   └── ProxyError                       the proxy could not be reached or refused the
        │       │                                tunnel (``proxy``, ``status``); never the password
        │       └── ProxyAuthenticationError     the proxy refused (or asked for) credentials:
        │                                        HTTP 407, SOCKS5 authentication
        ├── AuthenticationError                  the hub refused the credentials
        │   └── ConnectRefusedError              MQTT CONNACK 5 (also a NotAuthorizedError)
        ├── NotAuthorizedError                   the hub refused the operation for this identity
        ├── OperationTimeoutError (TimeoutError) an operation did not complete in time
        ├── UnsupportedOperationError (NotImplementedError)  the transport cannot do this
        │                                        (a twin over HTTPS, reject over MQTT): the
        │                                        message names the transport that can
        ├── DeliveryError                        a message was not accepted by the hub
        │   ├── QueueFullError                   MQTT: too many unacknowledged messages
        │   ├── MessageLockLostError             HTTPS: the C2D lock expired (412)
        │   └── MessageTooLargeError (ValueError) HTTPS: over IoT Hub's 256 KB (413)
        ├── InvalidMessageError (ValueError)     HTTPS: a property or id IoT Hub refuses
        ├── BadRequestError                      HTTPS: 400
        ├── DeviceNotFoundError (LookupError)    HTTPS: 404
        ├── ThrottledError                       HTTPS: 429 (``retry_after``)
        ├── HubServerError                       HTTPS: 5xx after the retries
        ├── UnexpectedResponseError              HTTPS: any other status
        └── ProvisioningError                    DPS: the device was not provisioned
            ├── RegistrationFailedError          DPS: the registration ended "failed"
            ├── RegistrationDisabledError        DPS: the enrollment is disabled
            └── UntrustedAssignmentError         DPS: the assigned hub is outside the
                                                 policy's trust (name or certificate)

The HTTPS answers (``InvalidMessageError`` ... ``UnexpectedResponseError``) are raised by the
HTTPS client (and the Device Provisioning Service client, for DPS's answers: 400, 429,
5xx) only; the DPS client refuses a registration it may not make with
``AuthenticationError`` (401) and a registration that does not finish in time with
``OperationTimeoutError``; they are here so that the whole tree is in one place. The local hub's
``RegistryError`` (ValueError) and ``DeviceNotRegisteredError`` (LookupError) in
:mod:`iothub_tls.hub.registry`.

Errors raised while handshaking are translated at the boundary (the hardened socket's
``do_handshake``) and chained with ``from`` to the original :mod:`ssl` exception.
"""

from __future__ import annotations

import ssl

__all__ = [
    "AuditInputError",
    "AuthenticationError",
    "BadRequestError",
    "CertificateVerificationError",
    "CipherSuiteError",
    "ClientError",
    "ConnectRefusedError",
    "ConnectionFailedError",
    "ConnectionStringError",
    "DeliveryError",
    "DeviceNotFoundError",
    "FeatureUnavailableError",
    "HandshakeClosedError",
    "HandshakeTimeoutError",
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
    "MessageLockLostError",
    "MessageTooLargeError",
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
    "RegistrationDisabledError",
    "RegistrationFailedError",
    "RootIntegrityError",
    "RootStoreError",
    "SasTokenError",
    "TLSHandshakeError",
    "ThrottledError",
    "TokenNotFoundError",
    "TokenPinError",
    "TokenRemovedError",
    "UnexpectedResponseError",
    "UnsupportedOperationError",
    "UntrustedAssignmentError",
]


class IoTHubTLSError(Exception):
    """Base class of every error raised by iothub-tls."""


class PolicyError(IoTHubTLSError, ValueError):
    """A :class:`~iothub_tls.TlsPolicy` (or a setting of the hardened context) is outside
    IoT Hub's TLS guidance."""


class RootStoreError(PolicyError):
    """PEM data that does not form a usable set of trust anchors."""


class RootIntegrityError(RootStoreError):
    """A root certificate shipped with the package does not match its pinned SHA-256
    fingerprint: the installation is damaged or was tampered with. Reinstall the package."""


class IdentityError(IoTHubTLSError, ValueError):
    """A device certificate or private key that cannot be used."""


class ConnectionStringError(IoTHubTLSError, ValueError):
    """A malformed IoT Hub connection string. The message names the bad part and never
    contains the shared access key."""


class SasTokenError(IoTHubTLSError, ValueError):
    """A shared access signature that is malformed, expired or wrongly signed."""


class AuditInputError(IoTHubTLSError, ValueError):
    """An input cannot be audited: missing, unreadable, or not a connection log at all
    (rows of a log that is one are counted and reported instead)."""


class FeatureUnavailableError(IoTHubTLSError, RuntimeError):
    """A protection was requested that needs direct access to OpenSSL (the library's
    ctypes shim), and the shim cannot work with this interpreter or OpenSSL build."""

    def __init__(self, feature: str, reason: str) -> None:
        self.feature = feature
        self.reason = reason
        super().__init__(
            f"{feature} is not available on this platform: {reason}. Run "
            "'iothub-tls doctor' for details; remove the setting from the TlsPolicy "
            "or use CPython with a dynamically linked OpenSSL 1.1.1 or 3.x."
        )


class MissingDependencyError(IoTHubTLSError, ImportError):
    """An optional transport extra is not installed."""

    def __init__(self, extra: str, package: str) -> None:
        self.extra = extra
        self.package = package
        super().__init__(f"this feature needs {package}: pip install 'iothub-tls[{extra}]'")


class IncompatibleDependencyError(IoTHubTLSError, RuntimeError):
    """An installed package is a version a feature was not verified with.

    ``package``, ``installed`` and ``tested`` say which, what is there and what works.
    """

    def __init__(
        self, package: str, installed: str, tested: tuple[str, ...], what: str, remedy: str
    ) -> None:
        self.package = package
        self.installed = installed
        self.tested = tested
        super().__init__(
            f"{what} was verified with {package} {', '.join(tested)}, but {installed} is "
            f"installed: {remedy}"
        )


class TLSHandshakeError(IoTHubTLSError, ssl.SSLError):
    """OpenSSL refused the handshake. ``reason`` and ``library`` keep OpenSSL's values."""


class ProtocolVersionError(TLSHandshakeError):
    """The peer offered only TLS versions below the policy's minimum."""


class CipherSuiteError(TLSHandshakeError):
    """No cipher suite or signature algorithm in common with the peer."""


class HandshakeClosedError(TLSHandshakeError):
    """The peer closed the connection (or stopped answering) during the handshake."""


class HandshakeTimeoutError(HandshakeClosedError, TimeoutError):
    """The peer accepted the connection but did not complete the handshake in time."""


class HardwareKeyError(IdentityError):
    """A private key held by a PKCS#11 token or a TPM 2.0 that cannot be used. Messages
    name the token, the object and the module; never the PIN."""


class HardwareModuleError(HardwareKeyError):
    """The PKCS#11 module, OpenSSL's ``pkcs11`` engine or the ``tpm2`` provider is not
    installed or does not load (the message names the Debian package)."""


class TokenNotFoundError(HardwareKeyError, LookupError):
    """No token present in the PKCS#11 module matches the URI (the message lists the
    tokens that are present)."""


class TokenPinError(HardwareKeyError):
    """The token needs a PIN and none was given, the PIN is wrong, or the PIN is locked."""


class HardwareObjectNotFoundError(HardwareKeyError, LookupError):
    """The token (or the TPM) holds no key, or no certificate, with that name."""


class KeyMismatchError(HardwareKeyError):
    """The device certificate does not belong to the key in the hardware."""


class HardwareSigningError(TLSHandshakeError, HardwareKeyError):
    """The hardware key did not sign during a TLS handshake. It is also a
    :class:`TLSHandshakeError` (an :class:`ssl.SSLError`): the handshake failed."""


class TokenRemovedError(HardwareSigningError):
    """The token holding the device key was removed (or the TPM became unreachable) after
    the identity was loaded: connections fail until it is back and the identity is
    loaded again."""


class CertificateVerificationError(IoTHubTLSError, ssl.SSLCertVerificationError):
    """The server certificate chain did not verify. ``verify_code`` and
    ``verify_message`` are OpenSSL's."""


class PolicyViolation(IoTHubTLSError, ssl.SSLError):
    """The handshake completed but the connection breaks the policy. The socket has
    already been closed when this is raised."""


class ClientError(IoTHubTLSError):
    """Base class of the device clients' transport-level errors."""


class ConnectionFailedError(ClientError, ConnectionError):
    """The client could not connect, or lost the connection and gave up."""


class ProxyError(ConnectionFailedError):
    """The proxy between the device and the hub could not be reached, refused to open the
    tunnel (an HTTP status other than 2xx, a SOCKS refusal), or did not speak its
    protocol. The message names the proxy (``proxy``: its URL without the password) and
    what it answered (``status``: the HTTP status or SOCKS reply code, when there is
    one); the hub was not reached."""

    def __init__(self, proxy: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: the proxy's URL, without its password
        self.proxy = proxy
        #: the proxy's HTTP status (407, 403, 502 ...) or SOCKS reply code, else None
        self.status = status

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_proxy_error, (type(self), self.proxy, str(self), self.status))


class ProxyAuthenticationError(ProxyError):
    """The proxy refused the credentials of the proxy URL, or asked for credentials the
    URL does not have (HTTP 407 Proxy Authentication Required, a SOCKS5 proxy refusing
    the user name and password). Another attempt cannot cure it: fix the proxy URL."""


def _rebuild_proxy_error(
    cls: type[ProxyError], proxy: str, message: str, status: int | None
) -> ProxyError:
    return cls(proxy, message, status=status)


class AuthenticationError(ClientError):
    """The hub refused the device's credentials (bad SAS token, unknown certificate)."""


class NotAuthorizedError(ClientError):
    """The hub refused an operation for this identity."""


class ConnectRefusedError(AuthenticationError, NotAuthorizedError):
    """The hub answered CONNECT with return code 5, *not authorized*.

    IoT Hub gives this answer for a wrong or expired SAS token as well as for a disabled
    or unknown device and an unregistered certificate, so the error is both an
    :class:`~iothub_tls.errors.AuthenticationError` and a
    :class:`~iothub_tls.errors.NotAuthorizedError`."""


class OperationTimeoutError(ClientError, TimeoutError):
    """An operation did not complete within its timeout."""


class UnsupportedOperationError(ClientError, NotImplementedError):
    """IoT Hub does not offer this operation on the client's transport (a device twin or
    direct methods over HTTPS, rejecting or abandoning a message over MQTT). The message
    says which transport offers it."""


class DeliveryError(ClientError):
    """A message was not accepted by the hub (rejected, released, or lost)."""

    #: the hub's verdict where the protocol has one ("rejected", "released", "modified")
    outcome: str | None = None


class QueueFullError(DeliveryError):
    """The client already holds as many unacknowledged messages as
    ``MqttOptions.queue_size`` allows (typically while it is disconnected). The message
    was not accepted: send it again later, or raise ``queue_size``."""


# -- the HTTPS device API's answers -------------------------------------------------


class _FromResponse:
    """Attributes every error built from a hub response carries."""

    #: HTTP status of the response (None when raised before any request was sent).
    status: int | None = None
    #: IoT Hub's error code, e.g. "DeviceNotFound" (None when the hub sent none).
    error_code: str | None = None
    #: IoT Hub's tracking id, to quote in a support request.
    tracking_id: str | None = None


class InvalidMessageError(ClientError, ValueError):
    """HTTPS: a message that IoT Hub would refuse, found before sending it: a property
    name or value outside the characters HTTPS allows, a malformed message id."""


class BadRequestError(_FromResponse, ClientError):
    """400: the hub refused the request as malformed."""


class DeviceNotFoundError(_FromResponse, ClientError, LookupError):
    """404: the device is not registered in the hub (or the path names another one)."""


class MessageLockLostError(_FromResponse, DeliveryError):
    """412: a cloud-to-device message could not be completed, rejected or abandoned
    because its lock expired (after one minute), it was already settled, or the lock
    token is unknown. The message is delivered again; receive it again."""


class MessageTooLargeError(_FromResponse, DeliveryError, ValueError):
    """413 (or found before sending): the message or batch exceeds 256 KB."""


class ThrottledError(_FromResponse, ClientError):
    """429: the hub throttled the device and retries were exhausted. ``retry_after``
    is the delay the hub asked for, in seconds, when it sent one."""

    retry_after: float | None = None


class HubServerError(_FromResponse, ClientError):
    """5xx: the hub failed (500, 503 ...) and retries were exhausted."""


class UnexpectedResponseError(_FromResponse, ClientError):
    """A status the device API does not document for this operation."""


# -- the Device Provisioning Service ------------------------------------------------


class ProvisioningError(ClientError):
    """The Device Provisioning Service did not provision the device. ``registration``
    is what the service answered (an :class:`iothub_tls.dps.Registration`), when it
    answered."""

    registration: object | None = None


class RegistrationFailedError(ProvisioningError):
    """The registration ended with status ``failed``; ``registration.error_code`` and
    ``registration.error_message`` say why."""


class RegistrationDisabledError(ProvisioningError):
    """The registration ended with status ``disabled``: its enrollment (or enrollment
    group) is disabled in the service. Enable it; retrying does not help."""


class UntrustedAssignmentError(ProvisioningError):
    """The service assigned the device to a hub this device must not connect to: its
    name is outside the allowed hub names, or its certificate does not chain to the
    policy's roots. A provisioning service that does this is misconfigured (or not
    the one you meant): the device does not connect."""
