"""The asyncio Device Provisioning Service client: :class:`ProvisioningClient`.

One registration is one connection: TCP and TLS with the hardened context of the
client's :class:`~iothub_tls.TlsPolicy` (the library's own TLS layer,
:mod:`iothub_tls._io.tls`), then DPS's MQTT exchange (the library's MQTT codec,
:mod:`iothub_tls.mqtt.packets`) or its REST exchange (the library's HTTP/1.1 reader and
writer, :mod:`iothub_tls.https.http11`): the register request, then polls after the
``retry-after`` the service asks for, until the registration is assigned, failed or
disabled, or the time given to :meth:`ProvisioningClient.register` runs out. The topics,
paths and JSON come from :mod:`.conventions`, which the local hub's DPS door uses too.

The synchronous :class:`iothub_tls.dps.ProvisioningClient` is a facade over this class
on the process's shared I/O loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import __version__
from .._io.base import check_host, check_port
from .._io.proxy import proxy_for
from .._io.tls import open_tls
from ..auth import ClientIdentity, SasTokenProvider
from ..errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    IoTHubTLSError,
    NotAuthorizedError,
    OperationTimeoutError,
    PolicyError,
    ProvisioningError,
    RegistrationDisabledError,
    RegistrationFailedError,
)
from ..https.channel import Channel, Lost, Outcome
from ..https.http11 import RequestWriter, Response
from ..mqtt import packets
from ..mqtt.conventions import connack_error, is_certificate_alert
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context
from ..tls.info import TlsInfo
from . import conventions as dps
from .conventions import Registration

__all__ = ["ProvisioningClient"]

logger = logging.getLogger("iothub_tls.dps")

TRANSPORTS = ("mqtt", "https")
#: Seconds between polls when the service names none (what DPS's SDKs wait).
DEFAULT_POLL_INTERVAL = 2.0
#: How long connecting (TCP and the TLS handshake) may take at most.
CONNECT_TIMEOUT = 10.0
#: Waits before retrying a throttled or failed request the service gave no delay for.
_BACKOFF = (1.0, 2.0, 4.0, 8.0)

Sleep = Callable[[float], Awaitable[Any]]


@dataclass(frozen=True)
class _Origin:
    """What a registration remembers of the client that made it (for device_client)."""

    policy: TlsPolicy | None
    allowed_hubs: tuple[str, ...] | None
    key: str | None
    identity: ClientIdentity | None


class _Answer:
    """One answer of the service: status, retry-after, body."""

    __slots__ = ("body", "retry_after", "status")

    def __init__(self, status: int, retry_after: float | None, body: bytes) -> None:
        self.status = status
        self.retry_after = retry_after
        self.body = body


class ProvisioningClient:
    """Registers one device with the Device Provisioning Service (asyncio).

    Build it with :meth:`from_symmetric_key` or :meth:`from_x509`; ``await
    client.register()`` returns the :class:`~iothub_tls.dps.Registration`.

    :param policy: the TLS policy for the provisioning endpoint (and, by default, for the
        assigned hub: :meth:`Registration.device_client`).
    :param endpoint: the service's host name (its certificate must be for it).
    :param port: default 8883 (MQTT) or 443 (HTTPS).
    :param transport: "mqtt" or "https".
    :param proxy: reach the endpoint through a proxy, as the device clients do:
        ``"http://[user:password@]host:port"`` (HTTP CONNECT), ``"socks5://..."``,
        ``"socks4://..."`` or ``"env"`` (``HTTPS_PROXY``/``NO_PROXY``); TLS runs end to
        end with the service through the tunnel.
    :param host: the address to dial instead of ``endpoint`` (a test endpoint).
    :param allowed_hubs: host name patterns (``fnmatch``, case-insensitive, e.g.
        ``"*.azure-devices.net"``) a registration may assign the device to; None allows
        any name (the hub's certificate must still chain to the policy's roots).
    :param sas_ttl: lifetime of the SAS token sent, in seconds.
    :param sleep: how to wait between polls (a coroutine function).
    :param clock: the time source of SAS tokens.
    """

    def __init__(
        self,
        id_scope: str,
        registration_id: str,
        *,
        key: str | None = None,
        identity: ClientIdentity | None = None,
        policy: TlsPolicy | None = None,
        endpoint: str = dps.GLOBAL_ENDPOINT,
        port: int | None = None,
        transport: str = "mqtt",
        proxy: object = None,
        host: str | None = None,
        allowed_hubs: Sequence[str] | None = None,
        api_version: str = dps.API_VERSION,
        sas_ttl: float = 3600,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if transport not in TRANSPORTS:
            raise PolicyError(
                f"transport must be 'mqtt' or 'https', not {transport!r} (DPS has no AMQP "
                "device API in this library)"
            )
        if (key is None) == (identity is None):
            raise PolicyError("give the device's symmetric key or its X.509 identity (one of them)")
        if not isinstance(endpoint, str) or not endpoint.strip() or "/" in endpoint:
            raise PolicyError(
                f"endpoint must be the provisioning service's host name (e.g. "
                f"{dps.GLOBAL_ENDPOINT}), not {endpoint!r}"
            )
        if identity is not None and not isinstance(identity, ClientIdentity):
            raise PolicyError(f"identity must be a ClientIdentity, not {type(identity).__name__}")
        self.id_scope = dps.check_id_scope(id_scope)
        self.registration_id = dps.check_registration_id(registration_id)
        self.endpoint = endpoint
        self.transport = transport
        self.port = check_port(port, dps.MQTT_PORT if transport == "mqtt" else dps.HTTPS_PORT)
        self._host = check_host(host) or endpoint
        self._proxy = proxy_for(proxy, self._host, self.port)
        self._api_version = api_version
        self._allowed = None if allowed_hubs is None else tuple(allowed_hubs)
        if self._allowed is not None and not all(isinstance(p, str) and p for p in self._allowed):
            raise PolicyError("allowed_hubs must be host name patterns (non-empty strings)")
        self._policy = policy
        self._identity = identity
        self._key = key
        self._tokens: SasTokenProvider | None = None
        if key is not None:
            self._tokens = SasTokenProvider(
                dps.resource_uri(self.id_scope, self.registration_id),
                key,
                policy_name=dps.SAS_KEY_NAME,
                ttl=sas_ttl,
                clock=clock,
            )
        # one context for the client's life: a new registration resumes the TLS session
        self.ssl_context: HardenedSSLContext = create_ssl_context(policy, identity=identity)
        self._sleep = sleep
        self._ids = itertools.count(1)
        self._tls_info: TlsInfo | None = None

    # -- factories ------------------------------------------------------------------------

    @classmethod
    def from_symmetric_key(
        cls, id_scope: str, registration_id: str, key: str, **kwargs: Any
    ) -> ProvisioningClient:
        """A client for an individual enrollment's key, or the key derived from an
        enrollment group's key (:func:`~iothub_tls.dps.derive_device_key`)."""
        return cls(id_scope, registration_id, key=key, **kwargs)

    @classmethod
    def from_x509(
        cls, id_scope: str, registration_id: str, identity: ClientIdentity, **kwargs: Any
    ) -> ProvisioningClient:
        """A client for an X.509 enrollment: the certificate's subject CN is the
        registration id."""
        return cls(id_scope, registration_id, identity=identity, **kwargs)

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the last connection to the provisioning endpoint negotiated."""
        return self._tls_info

    def __repr__(self) -> str:
        auth = "x509" if self._identity is not None else "symmetric key"
        return (
            f"<ProvisioningClient {self.registration_id} in {self.id_scope} via "
            f"{self.transport} {self.endpoint}:{self.port} ({auth})>"
        )

    # -- registering ----------------------------------------------------------------------

    async def register(self, payload: Any = None, timeout: float = 60.0) -> Registration:
        """Register the device and wait until the service has assigned it.

        :param payload: JSON-serializable data for the service (custom allocation).
        :param timeout: seconds for the whole registration, polls included.
        :returns: the registration (``status == "assigned"``).
        :raises RegistrationFailedError: the registration ended "failed".
        :raises RegistrationDisabledError: the enrollment is disabled.
        :raises AuthenticationError: the service refused the credentials (401).
        :raises ThrottledError: still throttled (429) when the time ran out.
        :raises OperationTimeoutError: not finished within ``timeout``.
        :raises ConnectionFailedError: the endpoint cannot be reached.
        """
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise PolicyError(f"timeout must be a positive number of seconds, not {timeout!r}")
        body = dps.register_body(self.registration_id, payload)  # TypeError: not JSON
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        session: _Session = (
            _MqttSession(self, deadline)
            if self.transport == "mqtt"
            else _HttpsSession(self, deadline)
        )
        try:
            return await self._run(session, body, deadline, timeout)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            if isinstance(exc, IoTHubTLSError):
                raise
            raise OperationTimeoutError(
                f"registration of {self.registration_id!r} with {self.endpoint} did not "
                f"finish within {timeout:g} s"
            ) from None
        finally:
            await session.close()

    async def _run(
        self, session: _Session, body: bytes, deadline: float, timeout: float
    ) -> Registration:
        loop = asyncio.get_running_loop()
        operation_id: str | None = None
        retries = 0
        while True:
            answer = await session.exchange(operation_id, body if operation_id is None else b"")
            status = answer.status
            if status in (200, 202):
                try:
                    operation = dps.parse_operation(answer.body)
                except (UnicodeDecodeError, ValueError) as exc:
                    raise ProvisioningError(
                        f"{self.endpoint} answered {status} with a body that is not a DPS "
                        f"operation status ({exc})"
                    ) from None
                if operation.status == "assigning":
                    operation_id = operation.operation_id
                    delay = answer.retry_after
                    if delay is None:
                        delay = DEFAULT_POLL_INTERVAL
                    await self._wait(delay, deadline, timeout, "assigning")
                    continue
                return self._finish(operation)
            if status == 429 or status >= 500:
                delay = answer.retry_after
                if delay is None:
                    delay = _BACKOFF[min(retries, len(_BACKOFF) - 1)]
                retries += 1
                if loop.time() + delay <= deadline:
                    logger.info(
                        "%s: %s answered %d; asking again in %g s",
                        self.registration_id,
                        self.endpoint,
                        status,
                        delay,
                    )
                    await self._sleep(delay)
                    continue
            raise dps.error_for_status(
                status,
                dps.parse_error(answer.body),
                endpoint=self.endpoint,
                registration_id=self.registration_id,
                retry_after=answer.retry_after,
            )

    async def _wait(self, delay: float, deadline: float, timeout: float, status: str) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() + delay > deadline:
            raise OperationTimeoutError(
                f"registration of {self.registration_id!r} with {self.endpoint} was still "
                f"{status!r} when its {timeout:g} s ran out (the service asked to wait "
                f"{delay:g} s more): register again with a longer timeout"
            )
        await self._sleep(delay)

    def _finish(self, operation: dps.Operation) -> Registration:
        state = operation.registration or Registration(self.registration_id, operation.status)
        registration = replace(
            state,
            registration_id=state.registration_id or self.registration_id,
            operation_id=operation.operation_id,
            _origin=_Origin(self._policy, self._allowed, self._key, self._identity),
        )
        status = registration.status
        if status == "assigned":
            if not registration.assigned_hub or not registration.device_id:
                raise self._with(
                    ProvisioningError(
                        f"{self.endpoint} reported {self.registration_id!r} as assigned "
                        "without naming its hub and device id"
                    ),
                    registration,
                )
            logger.info(
                "%s assigned to %s as %s",
                self.registration_id,
                registration.assigned_hub,
                registration.device_id,
            )
            return registration
        if status == "failed":
            code = registration.error_code
            raise self._with(
                RegistrationFailedError(
                    f"registration of {self.registration_id!r} failed at {self.endpoint}: "
                    f"{registration.error_message or 'no reason given'}"
                    f"{f' (errorCode {code})' if code else ''}"
                ),
                registration,
            )
        if status == "disabled":
            raise self._with(
                RegistrationDisabledError(
                    f"the enrollment of {self.registration_id!r} is disabled at "
                    f"{self.endpoint}: enable the enrollment (or its group) and register again"
                ),
                registration,
            )
        raise self._with(
            ProvisioningError(
                f"{self.endpoint} answered registration status {status!r}, which DPS does "
                "not document"
            ),
            registration,
        )

    @staticmethod
    def _with(error: ProvisioningError, registration: Registration) -> ProvisioningError:
        error.registration = registration
        return error

    # -- what the sessions share -----------------------------------------------------------

    def _token(self) -> str | None:
        return self._tokens.token() if self._tokens is not None else None

    async def _open(self, inner: asyncio.Protocol, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        budget = max(min(CONNECT_TIMEOUT, deadline - loop.time()), 0.001)
        where = f"{self._host}:{self.port}"
        try:
            layer = await open_tls(
                inner,
                self._host,
                self.port,
                context=self.ssl_context,
                server_hostname=self.endpoint,
                connect_timeout=budget,
                handshake_timeout=budget,
                proxy=self._proxy,
            )
        except IoTHubTLSError:
            raise  # the core's TLS refusals and the proxy's (ProxyError), unchanged
        except (TimeoutError, asyncio.TimeoutError):
            raise ConnectionFailedError(
                f"could not connect to the provisioning endpoint {where} within {budget:g} s"
            ) from None
        except OSError as exc:
            raise ConnectionFailedError(
                f"could not connect to the provisioning endpoint {where}: {exc}"
            ) from exc
        found = getattr(layer.get_extra_info("ssl_object"), "tls_info", None)
        if isinstance(found, TlsInfo):
            self._tls_info = found

    def _lost(self, fault: BaseException | None, when: str) -> ClientError:
        """The error for a connection that ended before the service answered."""
        detail = f"{type(fault).__name__}: {fault}" if fault is not None else None
        if detail is not None and is_certificate_alert(detail):
            error: ClientError = AuthenticationError(
                f"{self.endpoint} refused the device certificate ({detail}): enroll it (or "
                "its CA in an enrollment group) and check that it has not expired"
            )
        elif self._identity is None and detail is not None and "CERTIFICATE_REQUIRED" in detail:
            error = AuthenticationError(
                f"{self.endpoint} asks for a device certificate ({detail}): use from_x509()"
            )
        else:
            error = ConnectionFailedError(
                f"{self.endpoint} closed the connection {when}{f' ({detail})' if detail else ''}"
            )
        error.__cause__ = fault
        return error


class _Session:
    """One connection to the service, carrying requests and their answers."""

    async def exchange(self, operation_id: str | None, body: bytes) -> _Answer:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


# -- MQTT -----------------------------------------------------------------------------------------


class _MqttLink(asyncio.Protocol):
    """The MQTT packets of one connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = packets.Decoder(from_server=True)
        self.incoming: asyncio.Queue[packets.Packet] = asyncio.Queue()
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            received = self.decoder.feed(data)
        except packets.MqttProtocolError as exc:
            self.abort(exc)
            return
        for packet in received:
            if isinstance(packet, packets.Publish) and packet.qos and packet.packet_id:
                self.write(packets.puback(packet.packet_id))
            self.incoming.put_nowait(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self, reason: BaseException | None = None) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        if self.transport is not None:
            self.transport.abort()


class _MqttSession(_Session):
    def __init__(self, client: ProvisioningClient, deadline: float) -> None:
        self.client = client
        self.deadline = deadline
        self.link: _MqttLink | None = None
        self.packet_ids = itertools.count(1)

    async def _next(self, what: str, when: str) -> packets.Packet:
        link = self.link
        assert link is not None
        loop = asyncio.get_running_loop()
        getter: asyncio.Future[Any] = asyncio.ensure_future(link.incoming.get())
        lost: asyncio.Future[Any] = link.lost
        try:
            done, _ = await asyncio.wait(
                {getter, lost},
                timeout=max(self.deadline - loop.time(), 0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done:
            packet: packets.Packet = getter.result()
            return packet
        if link.lost in done:
            raise self.client._lost(link.lost.result(), when)
        raise asyncio.TimeoutError(f"no {what}")

    async def _connect(self) -> _MqttLink:
        client = self.client
        link = self.link = _MqttLink()
        await client._open(link, self.deadline)
        password = client._token()
        link.write(
            packets.connect(
                client.registration_id,
                username=dps.mqtt_username(
                    client.id_scope,
                    client.registration_id,
                    api_version=client._api_version,
                    client_version=f"iothub-tls/{__version__}",
                ),
                password=password.encode("utf-8") if password is not None else None,
                keepalive=60,
                clean_session=True,  # DPS keeps no session
            )
        )
        while True:
            packet = await self._next("CONNACK", "before answering MQTT CONNECT")
            if isinstance(packet, packets.ConnAck):
                break
        refusal = connack_error(packet.return_code, client.endpoint)
        if refusal is not None:
            error = refusal[0]
            if isinstance(error, AuthenticationError):
                # DPS checks the credentials at CONNECT: say what it checks.
                error = type(error)(
                    f"{client.endpoint} refused the registration of {client.registration_id!r} "
                    f"(MQTT CONNACK {packet.return_code}, not authorized): check the ID scope "
                    f"({client.id_scope}), the registration id (for X.509: the certificate's "
                    "subject CN), and the key (for an enrollment group: the key derived from "
                    "the group key with derive_device_key) or that the certificate is enrolled"
                )
            raise error
        link.write(packets.subscribe(next(self.packet_ids), [(dps.RESPONSE_FILTER, 1)]))
        while True:
            packet = await self._next("SUBACK", "while subscribing")
            if isinstance(packet, packets.SubAck):
                break
        if not packet.granted or packet.granted[0] >= 0x80:
            raise NotAuthorizedError(
                f"{client.endpoint} refused the subscription to {dps.RESPONSE_FILTER}"
            )
        return link

    async def exchange(self, operation_id: str | None, body: bytes) -> _Answer:
        link = self.link
        if link is None or link.lost.done():
            link = await self._connect()
        rid = str(next(self.client._ids))
        topic = (
            dps.register_topic(rid)
            if operation_id is None
            else dps.operation_status_topic(rid, operation_id)
        )
        link.write(packets.publish(topic, body, qos=1, packet_id=next(self.packet_ids)))
        while True:
            packet = await self._next("answer", "before answering the registration")
            if not isinstance(packet, packets.Publish):
                continue  # the PUBACK of our request
            response = dps.parse_response_topic(packet.topic)
            if response is None or response.request_id != rid:
                logger.debug("ignored a publish on %r", packet.topic)
                continue
            return _Answer(response.status, response.retry_after, packet.payload)

    async def close(self) -> None:
        link, self.link = self.link, None
        if link is None:
            return
        if not link.lost.done() and link.transport is not None:
            link.write(packets.disconnect())
            link.transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(link.lost), 2.0)
            except (asyncio.TimeoutError, TimeoutError):
                link.abort()


# -- HTTPS ----------------------------------------------------------------------------------------


class _HttpsSession(_Session):
    def __init__(self, client: ProvisioningClient, deadline: float) -> None:
        self.client = client
        self.deadline = deadline
        self.channel: Channel | None = None
        self.writer = RequestWriter(
            {
                "Host": client.endpoint,
                "User-Agent": f"iothub-tls/{__version__}",
                "Accept": "application/json",
            }
        )

    async def exchange(self, operation_id: str | None, body: bytes) -> _Answer:
        client = self.client
        loop = asyncio.get_running_loop()
        channel = self.channel
        if channel is None or channel.closed:
            channel = self.channel = Channel(loop)
            await client._open(channel, self.deadline)
        headers = {"Content-Type": "application/json; charset=utf-8"}
        token = client._token()
        if token is not None:
            headers["Authorization"] = token
        if operation_id is None:
            method = "PUT"
            path = dps.register_path(client.id_scope, client.registration_id, client._api_version)
        else:
            method = "GET"
            path = dps.operation_path(
                client.id_scope, client.registration_id, operation_id, client._api_version
            )
        data = self.writer.encode(method, path, headers, body)
        answered: asyncio.Future[Outcome] = loop.create_future()
        channel.send(method, data, max(self.deadline - loop.time(), 0.001), answered.set_result)
        outcome = await answered
        if isinstance(outcome, Response):
            retry = dps.parse_retry_after(
                next((v for k, v in outcome.headers.items() if k.lower() == "retry-after"), None)
            )
            return _Answer(outcome.status, retry, outcome.body)
        if isinstance(outcome, Lost):
            raise client._lost(outcome.fault, f"before answering {method} {path.split('?')[0]}")
        raise asyncio.TimeoutError("no answer")

    async def close(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()
            await channel.wait_closed(2.0)
