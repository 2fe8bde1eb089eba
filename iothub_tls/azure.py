"""The TLS policy for applications built on Microsoft's azure-iot-device (2.x) SDK.

The SDK builds its own ``ssl.SSLContext`` for every transport: pinned to exactly
TLS 1.2 (``PROTOCOL_TLSv1_2``, deprecated since Python 3.10), trusting the whole OS
store unless ``server_verification_cert`` is given, offering OpenSSL's default suites
unless ``cipher`` is given, and with no way to pass a context in. Two routes give an
existing SDK application this package's policy without rewriting it:

``client_kwargs(policy)`` — public and supported by the SDK::

    client = IoTHubDeviceClient.create_from_connection_string(cs, **client_kwargs(policy))

It sets the SDK's own ``server_verification_cert`` (the policy's roots) and ``cipher``
(the policy's suites). TLS stays at exactly 1.2 and nothing is checked after the
handshake; see ``docs/azure-iot-device.md`` for exactly what it enforces.

``harden(client_or_class, policy, identity=None)`` — the full policy::

    client = harden(IoTHubDeviceClient.create_from_connection_string(cs), policy)

It makes the client's MQTT and HTTPS transports use :func:`~iothub_tls.create_ssl_context`
(TLS 1.3 when the hub offers it, ECDSA-only signatures in ECC-only mode, max fragment
length, the post-handshake checks, session resumption, :func:`tls_info`). It replaces
objects inside the SDK, so it runs only on the SDK versions listed in
:data:`TESTED_SDK_VERSIONS` and refuses any other with
:class:`IncompatibleDependencyError`. Nothing is patched at import time.
"""

from __future__ import annotations

import functools
import importlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any, TypeVar

from .auth import ClientIdentity
from .errors import (
    ClientError,
    IdentityError,
    IncompatibleDependencyError,
    MissingDependencyError,
    PolicyError,
    RootStoreError,
)
from .policy import CipherProfile, TlsPolicy, Trust
from .roots import RootSet
from .tls.context import HardenedSSLContext, create_ssl_context
from .tls.info import TlsInfo
from .tls.info import tls_info as _tls_info

__all__ = [
    "TESTED_SDK_VERSIONS",
    "IncompatibleDependencyError",
    "client_kwargs",
    "harden",
    "is_hardened",
    "tls_info",
    "unharden",
]

logger = logging.getLogger("iothub_tls")

#: azure-iot-device versions :func:`harden` was verified against (real clients, real
#: brokers). Any other version is refused rather than patched blindly.
TESTED_SDK_VERSIONS: tuple[str, ...] = ("2.12.0", "2.13.0", "2.13.1", "2.14.0")
_UNTESTED_REMEDY = (
    "harden() replaces objects inside the SDK and refuses to do that on a version it was "
    f"not tested with: pin azure-iot-device=={TESTED_SDK_VERSIONS[-1]}, or use "
    "client_kwargs(policy), the SDK's public options (TLS 1.2 only, no post-handshake checks)"
)

_EXTRA = "azure"
_PACKAGE = "azure-iot-device"
# Where the hardening of an instance is recorded (in the client's __dict__).
_STATE_ATTR = "_iothub_tls_hardening"
# Marks the __init__ wrapper that hardens every new instance of a class.
_CLASS_MARK = "__iothub_tls_hardening__"

_T = TypeVar("_T")


# -- the public route: the SDK's own keyword arguments ------------------------------------


def client_kwargs(policy: TlsPolicy | None = None) -> dict[str, str]:
    """Keyword arguments for the SDK's client factories that carry the policy.

    ``server_verification_cert`` is the policy's roots as PEM, ``cipher`` its TLS 1.2
    suites in OpenSSL's cipher-list format (the format the SDK documents), followed by
    ``@SECLEVEL=2``. Pass them to ``create_from_connection_string``,
    ``create_from_symmetric_key``, ``create_from_x509_certificate`` or
    ``create_from_sastoken`` of the sync or asyncio clients.

    The SDK keeps its own TLS 1.2-only context, so a policy asking for what that context
    cannot do is refused instead of silently weakened: ``min_version=TLSv1_3``,
    ``max_fragment_length`` and ``Trust.SYSTEM`` raise :class:`PolicyError`
    (use :func:`harden` for those).
    """
    policy = _check_policy(policy)
    if policy.min_version is ssl.TLSVersion.TLSv1_3:
        raise PolicyError(
            "min_version=TLSv1_3 cannot be expressed through the SDK's options: "
            "azure-iot-device 2.x builds its context with PROTOCOL_TLSv1_2 (exactly TLS "
            "1.2) and would never connect. Use harden(client, policy) for TLS 1.3"
        )
    if policy.max_fragment_length is not None:
        raise PolicyError(
            f"max_fragment_length={policy.max_fragment_length} cannot be expressed through "
            "the SDK's options (they have no fragment length setting). Use "
            "harden(client, policy), or drop max_fragment_length from the policy"
        )
    if policy.trust is Trust.SYSTEM:
        raise PolicyError(
            "Trust.SYSTEM cannot be expressed through the SDK's options: its "
            "server_verification_cert replaces the OS store for MQTT, and the anchor "
            "check after the handshake needs harden(client, policy). Use Trust.PINNED "
            "(the policy's roots) with client_kwargs"
        )
    return {
        # load_verify_locations(cadata=...) on a context that has no other anchors.
        "server_verification_cert": policy.roots.to_pem(),
        # ssl.SSLContext.set_ciphers(...): only these suites in TLS 1.2; security
        # level 2 refuses RSA keys under 2048 bits and SHA-1 signatures in the chain.
        "cipher": policy.ciphers.openssl_cipher_string + ":@SECLEVEL=2",
    }


# -- the full route: the hardened context inside the SDK's transports -------------------


@dataclass
class _Hardening:
    """What :func:`harden` did to one client, so it can report and undo it."""

    policy: TlsPolicy
    context: HardenedSSLContext
    mqtt_transport: Any
    http_transport: Any
    original_http_adapter: Any


def harden(
    client_or_class: _T,
    policy: TlsPolicy | None = None,
    identity: ClientIdentity | None = None,
) -> _T:
    """Make an azure-iot-device IoT Hub client use :func:`~iothub_tls.create_ssl_context`.

    ``client_or_class`` is a client (``IoTHubDeviceClient`` or ``IoTHubModuleClient``,
    sync or ``azure.iot.device.aio``) that has not connected yet, or one of those
    classes. Returns it, so creating and hardening fit on one line.

    * A client: its MQTT transport (TCP and WebSockets) and its HTTPS transport (file
      upload, module method invocation) get one hardened context. Only this client is
      affected.
    * A class: every client that class (and its subclasses) creates from now on, in this
      process, is hardened as above; clients created before are not, and neither are
      other classes (hardening the sync ``IoTHubDeviceClient`` leaves the asyncio one
      alone). :func:`unharden` on the class stops it.

    ``identity`` is the X.509 device identity presented in the handshake; by default it
    is the ``X509`` the client was created with (``create_from_x509_certificate``).
    Calling ``harden`` again replaces the previous policy.

    :raises MissingDependencyError: azure-iot-device is not installed.
    :raises IncompatibleDependencyError: its version is not in :data:`TESTED_SDK_VERSIONS`.
    :raises PolicyError: the client was created with ``server_verification_cert`` or
        ``cipher`` values that contradict the policy (they would be silently ignored).
    :raises IdentityError: ``identity`` is not the certificate the client was made with.
    :raises ClientError: the client is connected (harden it before it connects).
    :raises TypeError: not an IoT Hub client or client class of the SDK.
    """
    sdk = _sdk()
    policy = _check_policy(policy)
    if identity is not None and not isinstance(identity, ClientIdentity):
        raise TypeError(f"identity must be a ClientIdentity, got {type(identity).__name__}")
    if isinstance(client_or_class, type):
        _harden_class(sdk, client_or_class, policy, identity)
    else:
        _harden_client(sdk, client_or_class, policy, identity)
    return client_or_class


def unharden(client_or_class: _T) -> _T:
    """Undo :func:`harden`: the client's transports get the SDK's own contexts back (a
    client must not be connected), or the class stops hardening new clients (clients it
    already made stay hardened). Harmless on something that was never hardened."""
    sdk = _sdk()
    if isinstance(client_or_class, type):
        init = client_or_class.__dict__.get("__init__")
        mark = getattr(init, _CLASS_MARK, None)
        if mark is not None:
            original = mark["original"]
            if original is None:
                delattr(client_or_class, "__init__")
            else:
                type.__setattr__(client_or_class, "__init__", original)
        return client_or_class
    _require_client(sdk, client_or_class)
    state = vars(client_or_class).get(_STATE_ATTR)
    if isinstance(state, _Hardening):
        _require_disconnected(client_or_class, "unharden()")
        _restore(state)
        del vars(client_or_class)[_STATE_ATTR]
    return client_or_class


def is_hardened(client_or_class: object) -> bool:
    """True when :func:`harden` applies to this client (or class)."""
    if isinstance(client_or_class, type):
        init = client_or_class.__dict__.get("__init__")
        return getattr(init, _CLASS_MARK, None) is not None
    state = getattr(client_or_class, "__dict__", {}).get(_STATE_ATTR)
    return isinstance(state, _Hardening)


def tls_info(client: object) -> TlsInfo:
    """What the client's live MQTT connection negotiated.

    For a hardened client this is the report its context captured after the handshake
    (with the anchor, the fragment length and resumption); for a plain SDK client the
    handshake is inspected on the spot.

    :raises ClientError: the client is not connected.
    """
    sdk = _sdk()
    _require_client(sdk, client)
    mqtt_transport = _find_transport(sdk, client, "_mqtt_pipeline", "MQTTTransport")
    sock = mqtt_transport._mqtt_client.socket()
    # MQTT over WebSockets: paho wraps the TLS socket (WebsocketWrapper._socket).
    sock = getattr(sock, "_socket", sock) if sock is not None else None
    if not isinstance(sock, ssl.SSLSocket):
        raise ClientError(
            "the client has no live MQTT connection: call client.connect() (or send "
            "something) first"
        )
    return _tls_info(sock)


# -- internals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sdk:
    version: str
    abstract_client: type
    mqtt_transport: type
    http_transport: type


def _sdk() -> _Sdk:
    """Import the SDK lazily, check its version and the internals harden() replaces."""
    try:
        constant = importlib.import_module("azure.iot.device.constant")
        clients = importlib.import_module("azure.iot.device.iothub.abstract_clients")
        mqtt = importlib.import_module("azure.iot.device.common.mqtt_transport")
        http = importlib.import_module("azure.iot.device.common.http_transport")
    except ImportError as exc:
        raise MissingDependencyError(_EXTRA, _PACKAGE) from exc
    version = str(getattr(constant, "VERSION", "unknown"))
    if version not in TESTED_SDK_VERSIONS:
        raise IncompatibleDependencyError(
            _PACKAGE, version, TESTED_SDK_VERSIONS, "harden()", _UNTESTED_REMEDY
        )
    sdk = _Sdk(
        version=version,
        abstract_client=clients.AbstractIoTHubClient,
        mqtt_transport=mqtt.MQTTTransport,
        http_transport=http.HTTPTransport,
    )
    for cls, names in (
        (sdk.mqtt_transport, ("_create_ssl_context", "_create_mqtt_client", "connect")),
        (sdk.http_transport, ("_create_ssl_context", "_create_http_adapter", "request")),
    ):
        missing = [n for n in names if not callable(getattr(cls, n, None))]
        if missing:  # a modified installation of a tested version
            raise IncompatibleDependencyError(
                _PACKAGE,
                f"{version} (without {cls.__name__}.{missing[0]})",
                TESTED_SDK_VERSIONS,
                "harden()",
                _UNTESTED_REMEDY,
            )
    return sdk


def _check_policy(policy: TlsPolicy | None) -> TlsPolicy:
    if policy is None:
        return TlsPolicy()
    if not isinstance(policy, TlsPolicy):
        raise PolicyError(f"policy must be a TlsPolicy, got {type(policy).__name__}")
    return policy


def _require_client(sdk: _Sdk, client: object) -> None:
    if not isinstance(client, sdk.abstract_client):
        raise TypeError(
            "expected an azure-iot-device IoT Hub client (IoTHubDeviceClient or "
            "IoTHubModuleClient, sync or azure.iot.device.aio) or one of those classes, "
            f"got {type(client).__name__}"
        )


def _require_disconnected(client: Any, what: str) -> None:
    if client.connected:
        raise ClientError(
            f"{what} needs a client that is not connected: its TLS connection is already "
            "made. Call it before client.connect() (or after client.disconnect())"
        )


def _find_transport(sdk: _Sdk, client: Any, pipeline_attr: str, kind: str) -> Any:
    """The transport object at the bottom of one of the client's pipelines."""
    wanted = sdk.mqtt_transport if kind == "MQTTTransport" else sdk.http_transport
    stage = getattr(getattr(client, pipeline_attr, None), "_pipeline", None)
    while stage is not None:
        found = getattr(stage, "transport", None)
        if isinstance(found, wanted):
            return found
        stage = getattr(stage, "next", None)
    raise IncompatibleDependencyError(
        _PACKAGE,
        f"{sdk.version} (no {kind} in {pipeline_attr})",
        TESTED_SDK_VERSIONS,
        "harden()",
        _UNTESTED_REMEDY,
    )


def _harden_class(sdk: _Sdk, cls: type, policy: TlsPolicy, identity: ClientIdentity | None) -> None:
    if not issubclass(cls, sdk.abstract_client):
        raise TypeError(
            "expected an azure-iot-device IoT Hub client class (IoTHubDeviceClient or "
            f"IoTHubModuleClient, sync or azure.iot.device.aio), got {cls.__name__}"
        )
    unharden(cls)  # harden() again replaces the previous policy
    own = cls.__dict__.get("__init__")
    inherited = cls.__init__

    @functools.wraps(inherited)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        inherited(self, *args, **kwargs)
        _harden_client(sdk, self, policy, identity)

    setattr(__init__, _CLASS_MARK, {"original": own, "policy": policy})
    type.__setattr__(cls, "__init__", __init__)


def _harden_client(
    sdk: _Sdk, client: Any, policy: TlsPolicy, identity: ClientIdentity | None
) -> None:
    _require_client(sdk, client)
    _require_disconnected(client, "harden()")
    mqtt_transport = _find_transport(sdk, client, "_mqtt_pipeline", "MQTTTransport")
    http_transport = _find_transport(sdk, client, "_http_pipeline", "HTTPTransport")
    config = client._mqtt_pipeline.pipeline_configuration
    _check_sdk_options(config, policy)
    identity = _identity_for(config, identity)

    previous = vars(client).get(_STATE_ATTR)
    if isinstance(previous, _Hardening):
        _restore(previous)

    # One context for both transports: one policy, one session cache.
    context = create_ssl_context(policy, identity=identity)
    state = _Hardening(
        policy=policy,
        context=context,
        mqtt_transport=mqtt_transport,
        http_transport=http_transport,
        original_http_adapter=http_transport._http_adapter,
    )
    # MQTT: the SDK asks _create_ssl_context() for a context when it builds its paho
    # client, then hands it to paho's tls_set_context(). Shadow the method on this
    # transport only and rebuild the (not yet connected) paho client through the SDK.
    mqtt_transport._create_ssl_context = lambda: context
    mqtt_transport._mqtt_client = mqtt_transport._create_mqtt_client()
    # HTTPS: the SDK mounts a requests adapter holding its context; mount ours instead.
    http_transport._http_adapter = _pinned_adapter_class()(context)
    vars(client)[_STATE_ATTR] = state
    logger.debug(
        "azure-iot-device %s client hardened: %r (identity: %s)",
        sdk.version,
        context,
        identity.thumbprint_sha256 if identity else "none",
    )


def _restore(state: _Hardening) -> None:
    """Give the transports the SDK's own contexts back."""
    vars(state.mqtt_transport).pop("_create_ssl_context", None)
    state.mqtt_transport._mqtt_client = state.mqtt_transport._create_mqtt_client()
    state.http_transport._http_adapter = state.original_http_adapter


def _check_sdk_options(config: Any, policy: TlsPolicy) -> None:
    """Refuse SDK options the hardened context would silently override."""
    pem = config.server_verification_cert
    if pem:
        try:
            same = RootSet.from_pem(pem) == policy.roots
        except RootStoreError:
            same = False
        if not same:
            raise PolicyError(
                "the client was created with server_verification_cert, which harden() would "
                "ignore: the hardened context trusts exactly the policy's roots "
                f"({', '.join(policy.roots.common_names)}). Pass those roots in the policy "
                "(TlsPolicy(roots=RootSet.from_pem(pem)); roots only, never intermediates) "
                "or create the client without server_verification_cert"
            )
    cipher = config.cipher
    if cipher:
        asked = _tls12_suites(cipher)
        offered = {s.openssl for s in policy.cipher_suites}
        if asked != offered:
            hint = (
                " (that is CipherProfile.ECC_ONLY)"
                if asked == {s.openssl for s in CipherProfile.ECC_ONLY.suites}
                else ""
            )
            raise PolicyError(
                f"the client was created with cipher={cipher!r}, which harden() would "
                f"ignore: the hardened context offers the policy's {policy.ciphers.name} "
                f"suites. Choose the suites with TlsPolicy(ciphers=...){hint}, or create "
                "the client without cipher"
            )


def _tls12_suites(cipher: str) -> set[str]:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.set_ciphers(cipher)
    except ssl.SSLError:
        return set()
    return {c["name"] for c in probe.get_ciphers() if c["protocol"] != "TLSv1.3"}


def _identity_for(config: Any, identity: ClientIdentity | None) -> ClientIdentity | None:
    """The identity to present: the explicit one, else the SDK's X509 object."""
    x509 = config.x509
    if x509 is None:
        return identity
    from_sdk = ClientIdentity.from_files(x509.certificate_file, x509.key_file, x509.pass_phrase)
    if identity is not None and identity.thumbprint_sha256 != from_sdk.thumbprint_sha256:
        raise IdentityError(
            f"identity (thumbprint {identity.thumbprint_sha256}) is not the certificate the "
            f"client was created with ({x509.certificate_file}, thumbprint "
            f"{from_sdk.thumbprint_sha256}): the hub would see one identity in TLS and "
            "expect the other. Omit identity= to use the client's own X509"
        )
    return from_sdk


_ADAPTER_CLASS: type | None = None


def _pinned_adapter_class() -> type:
    """A requests adapter for the SDK's HTTPS transport that uses the hardened context
    and never lets requests add trust anchors to it (requests' own CA bundle, certifi or
    ``REQUESTS_CA_BUNDLE``, would otherwise be loaded into the context on every
    request). Built on first use: requests is the SDK's dependency, not ours."""
    global _ADAPTER_CLASS
    if _ADAPTER_CLASS is not None:
        return _ADAPTER_CLASS
    from requests.adapters import HTTPAdapter

    class PinnedContextAdapter(HTTPAdapter):
        def __init__(self, context: HardenedSSLContext) -> None:
            self._context = context
            super().__init__()

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = self._context
            super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["ssl_context"] = self._context
            return super().proxy_manager_for(*args, **kwargs)

        def build_connection_pool_key_attributes(
            self, request: Any, verify: Any, cert: Any = None
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            host_params, _ = super().build_connection_pool_key_attributes(request, True, None)
            return host_params, {"cert_reqs": "CERT_REQUIRED"}

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            if verify is False:
                raise PolicyError(
                    "verify=False is not allowed on a hardened client: the hub's "
                    "certificate is always verified"
                )
            # Anchors come from the context alone (the policy's roots).
            conn.cert_reqs = "CERT_REQUIRED"
            conn.ca_certs = None
            conn.ca_cert_dir = None

    _ADAPTER_CLASS = PinnedContextAdapter
    return _ADAPTER_CLASS
