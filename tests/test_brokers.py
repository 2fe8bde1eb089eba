"""The broker launchers of ``iothub_tls.testing.brokers`` (with the skip logic of
``tests/brokers.py``) drive real Mosquitto and RabbitMQ processes.

Certificates come from ``iothub_tls.testing.pki`` at test time. RabbitMQ takes ~5 s to
boot, so one node is shared by the module (``rabbit`` fixture); Mosquitto starts in well
under a second and gets a fresh process per test.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iothub_tls.testing.pki import KeyType
from tests.brokers import (
    MARKER_ENV,
    BrokerError,
    Mosquitto,
    MosquittoListener,
    RabbitMQ,
    free_port,
    port_open,
    require_binary,
)
from tests.conftest import new_root

AMQP_SASL_HEADER = b"AMQP\x03\x01\x00\x00"


# --------------------------------------------------------------------------- PKI
# (named ``bpki`` so it does not shadow conftest's ``pki``)


@dataclass(frozen=True)
class Pki:
    ca: Path  # CA certificate (trust anchor for clients, client-cert CA for brokers)
    chain: Path  # server leaf + CA, EC key, SAN localhost / 127.0.0.1
    key: Path
    client_chain: Path  # client certificate, CN "device-1"
    client_key: Path
    rsa_ca: Path  # a second, RSA-only hierarchy (needed for RSA key-exchange suites)
    rsa_chain: Path
    rsa_key: Path


@pytest.fixture(scope="module")
def bpki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("broker-pki")
    ca = new_root("Broker Test Root", key_type=KeyType.EC)
    (d / "ca.pem").write_bytes(ca.cert_pem)
    # certfile = leaf (+ intermediates: none here), the key separate, as brokers expect
    ca.issue("localhost", "127.0.0.1", key_type=KeyType.EC).write(d, "server")
    ca.issue(cn="device-1", client=True, key_type=KeyType.EC).write(d, "client")
    rsa_ca = new_root("Broker Test Root RSA")
    (d / "rsa_ca.pem").write_bytes(rsa_ca.cert_pem)
    rsa_ca.issue("localhost", "127.0.0.1").write(d, "rsa_server")
    return Pki(
        ca=d / "ca.pem",
        chain=d / "server.pem",
        key=d / "server.key",
        client_chain=d / "client.pem",
        client_key=d / "client.key",
        rsa_ca=d / "rsa_ca.pem",
        rsa_chain=d / "rsa_server.pem",
        rsa_key=d / "rsa_server.key",
    )


def client_context(bpki: Pki, *, client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(bpki.ca))
    if client_cert:
        ctx.load_cert_chain(str(bpki.client_chain), str(bpki.client_key))
    return ctx


def legacy_context(cafile: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client pinned to one old TLS version (OpenSSL 3 needs security level 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """TLS handshake with 127.0.0.1:port (SNI localhost); returns (version, cipher)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        version, cipher = tls.version(), tls.cipher()
        assert version is not None and cipher is not None
        return version, cipher[0]


# --------------------------------------------------------------------------- paho


class Paho:
    """A paho-mqtt 2.x client with its callbacks turned into waitable events."""

    def __init__(
        self,
        *,
        client_id: str = "",
        transport: str = "tcp",
        clean_session: bool = True,
        ctx: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        version2 = mqtt.CallbackAPIVersion.VERSION2  # type: ignore[attr-defined]
        self.client = mqtt.Client(
            version2,
            client_id=client_id,
            transport=transport,  # type: ignore[arg-type]
            clean_session=clean_session,
            reconnect_on_failure=False,
        )
        if ctx is not None:
            self.client.tls_set_context(ctx)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reason: Any = None
        self.messages: list[tuple[str, bytes, int]] = []
        self.got_message = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.reason = reason
        self.connected.set()

    def _on_subscribe(self, *args: Any) -> None:
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.messages.append((message.topic, message.payload, message.qos))
        self.got_message.set()

    def connect(self, port: int, timeout: float = 10) -> Any:
        """Connect, wait for CONNACK and return its reason code."""
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(timeout), "no CONNACK"
        return self.reason

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self.subscribed.wait(timeout), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def paho_clients() -> Iterator[list[Paho]]:
    pytest.importorskip("paho.mqtt.client")
    clients: list[Paho] = []
    yield clients
    for c in clients:
        c.close()


# --------------------------------------------------------------------------- no broker


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_require_binary_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = f"itls-no-such-binary-{uuid.uuid4().hex[:6]}"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed: apt-get install"):
        require_binary(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require_binary(missing)
    assert require_binary("sh").endswith("/sh")


def test_a_broker_missing_its_program_skips_outside_ci_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from iothub_tls.testing import brokers as package

    def nowhere(name: str) -> str:
        raise package.MissingBinaryError(name)

    monkeypatch.setattr(package, "find_binary", nowhere)
    broker = Mosquitto([MosquittoListener()], workdir=tmp_path / "mosq")
    # the package's own error names the Debian package, and is a FileNotFoundError
    with pytest.raises(package.MissingBinaryError, match=r"apt-get install mosquitto$") as info:
        package.Mosquitto([MosquittoListener()], workdir=tmp_path / "plain").start()
    assert isinstance(info.value, FileNotFoundError) and info.value.package == "mosquitto"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="mosquitto not installed: apt-get"):
        broker.start()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="mosquitto not installed"):
        broker.start()
    assert not broker.running()


def test_mosquitto_rejects_mixed_tls_max_version(tmp_path: Path, bpki: Pki) -> None:
    listeners = [
        MosquittoListener(tls=True, certfile=bpki.chain, keyfile=bpki.key),
        MosquittoListener(
            tls=True, certfile=bpki.chain, keyfile=bpki.key, tls_max_version="tlsv1.1"
        ),
    ]
    with pytest.raises(ValueError, match="process-wide"):
        Mosquitto(listeners, workdir=tmp_path)


def test_rabbitmq_config_keeps_cipher_order(tmp_path: Path, bpki: Pki) -> None:
    rabbit = RabbitMQ(
        workdir=tmp_path,
        certfile=bpki.chain,
        keyfile=bpki.key,
        ciphers=["ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
    )
    lines = [x for x in rabbit.config_text().splitlines() if "ciphers" in x]
    assert lines[0].endswith("= ECDHE-ECDSA-AES256-GCM-SHA384")
    assert lines[1].endswith("= TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
    assert lines[2].endswith("= TLS_AES_256_GCM_SHA384")  # TLS 1.3 suites appended


# --------------------------------------------------------------------------- Mosquitto


@pytest.mark.broker
def test_mosquitto_tls_handshake_and_paho_qos1(
    tmp_path: Path, bpki: Pki, paho_clients: list[Paho]
) -> None:
    require_binary("mosquitto")
    listener = MosquittoListener(
        tls=True, certfile=bpki.chain, keyfile=bpki.key, tls_version="tlsv1.2"
    )
    with Mosquitto([listener], workdir=tmp_path) as mosq:
        assert mosq.startup_seconds is not None and mosq.startup_seconds < 5
        assert handshake(mosq.port, client_context(bpki))[0] == "TLSv1.3"
        tls12 = client_context(bpki)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        tls12.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        assert handshake(mosq.port, tls12) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")

        sub = Paho(client_id="sub", ctx=client_context(bpki))
        pub = Paho(client_id="pub", ctx=client_context(bpki))
        paho_clients += [sub, pub]
        assert not sub.connect(mosq.port).is_failure
        sub.subscribe("itls/test", qos=1)
        assert not pub.connect(mosq.port).is_failure
        pub.publish("itls/test", b"hello", qos=1)
        assert sub.got_message.wait(10)
        assert sub.messages == [("itls/test", b"hello", 1)]
        assert "New client connected" in mosq.log_text()


@pytest.mark.broker
def test_mosquitto_password_listener_refuses_wrong_password(
    tmp_path: Path, bpki: Pki, paho_clients: list[Paho]
) -> None:
    require_binary("mosquitto_passwd")
    listener = MosquittoListener(
        tls=True, certfile=bpki.chain, keyfile=bpki.key, password_file=True, allow_anonymous=False
    )
    with Mosquitto([listener], users={"alice": "s3cret"}, workdir=tmp_path) as mosq:
        wrong = Paho(ctx=client_context(bpki), username="alice", password="nope")
        anonymous = Paho(ctx=client_context(bpki))
        right = Paho(ctx=client_context(bpki), username="alice", password="s3cret")
        paho_clients += [wrong, anonymous, right]
        assert wrong.connect(mosq.port) == "Not authorized"
        assert anonymous.connect(mosq.port) == "Not authorized"
        assert not right.connect(mosq.port).is_failure
        assert "not authorised" in mosq.log_text()


@pytest.mark.broker
def test_mosquitto_mutual_tls_identity_and_acl(
    tmp_path: Path, bpki: Pki, paho_clients: list[Paho]
) -> None:
    listener = MosquittoListener(
        tls=True,
        certfile=bpki.chain,
        keyfile=bpki.key,
        cafile=bpki.ca,
        require_certificate=True,
        use_identity_as_username=True,
        allow_anonymous=False,
    )
    acl = "user device-1\ntopic readwrite devices/device-1/#\n"
    with Mosquitto([listener], acl=acl, workdir=tmp_path) as mosq:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with (
                socket.create_connection(("127.0.0.1", mosq.port), timeout=10) as raw,
                client_context(bpki).wrap_socket(raw, server_hostname="localhost") as t,
            ):
                t.recv(1)  # TLS 1.3: the missing certificate is reported after the handshake
        device = Paho(client_id="device-1", ctx=client_context(bpki, client_cert=True))
        paho_clients.append(device)
        assert not device.connect(mosq.port).is_failure
        device.subscribe("devices/device-1/#")
        device.publish("devices/device-1/telemetry", b"ok")
        device.publish("devices/other/telemetry", b"denied")  # dropped by the ACL
        assert device.got_message.wait(10)
        time.sleep(0.2)
        assert [m[1] for m in device.messages] == [b"ok"]


@pytest.mark.broker
def test_mosquitto_websockets_listener(tmp_path: Path, bpki: Pki, paho_clients: list[Paho]) -> None:
    listeners = [
        MosquittoListener(protocol="websockets"),
        MosquittoListener(protocol="websockets", tls=True, certfile=bpki.chain, keyfile=bpki.key),
    ]
    with Mosquitto(listeners, workdir=tmp_path) as mosq:
        plain = Paho(transport="websockets")
        secure = Paho(transport="websockets", ctx=client_context(bpki))
        paho_clients += [plain, secure]
        assert not plain.connect(mosq.ports[0]).is_failure
        assert not secure.connect(mosq.ports[1]).is_failure
        secure.subscribe("ws/#")
        plain.publish("ws/x", b"over websockets")
        assert secure.got_message.wait(10)
        assert secure.messages == [("ws/x", b"over websockets", 1)]


@pytest.mark.broker
def test_mosquitto_restart_keeps_port_and_persistent_session(
    tmp_path: Path, bpki: Pki, paho_clients: list[Paho]
) -> None:
    listener = MosquittoListener(tls=True, certfile=bpki.chain, keyfile=bpki.key)
    with Mosquitto([listener], workdir=tmp_path) as mosq:
        port, first_pid = mosq.port, mosq.pid
        sub = Paho(client_id="persistent-sub", clean_session=False, ctx=client_context(bpki))
        sub.connect(port)
        sub.subscribe("q/#", qos=1)
        sub.close()

        mosq.restart()
        assert mosq.port == port and mosq.pid != first_pid
        pub = Paho(ctx=client_context(bpki))
        paho_clients.append(pub)
        pub.connect(port)
        pub.publish("q/1", b"queued while offline", qos=1)

        again = Paho(client_id="persistent-sub", clean_session=False, ctx=client_context(bpki))
        paho_clients.append(again)
        again.connect(port)
        assert again.got_message.wait(10)
        assert again.messages == [("q/1", b"queued while offline", 1)]


@pytest.mark.broker
def test_mosquitto_tls11_only_listener(tmp_path: Path, bpki: Pki) -> None:
    listener = MosquittoListener(
        tls=True,
        certfile=bpki.chain,
        keyfile=bpki.key,
        tls_version="tlsv1.1",
        tls_max_version="tlsv1.1",
    )
    with Mosquitto([listener], workdir=tmp_path) as mosq:
        version, _ = handshake(mosq.port, legacy_context(bpki.ca, ssl.TLSVersion.TLSv1_1))
        assert version == "TLSv1.1"
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            handshake(mosq.port, client_context(bpki))  # TLS 1.2+ client is refused
        with pytest.raises(ssl.SSLError):
            handshake(mosq.port, legacy_context(bpki.ca, ssl.TLSVersion.TLSv1))


@pytest.mark.broker
def test_mosquitto_weak_cipher_only_listener(tmp_path: Path, bpki: Pki) -> None:
    listener = MosquittoListener(
        tls=True,
        certfile=bpki.rsa_chain,
        keyfile=bpki.rsa_key,
        tls_max_version="tlsv1.2",
        ciphers="AES128-SHA",
    )
    with Mosquitto([listener], workdir=tmp_path) as mosq:
        weak = ssl.create_default_context(cafile=str(bpki.rsa_ca))
        weak.set_ciphers("AES128-SHA")
        assert handshake(mosq.port, weak) == ("TLSv1.2", "AES128-SHA")
        strong = ssl.create_default_context(cafile=str(bpki.rsa_ca))
        with pytest.raises(ssl.SSLError):
            handshake(mosq.port, strong)  # no TLS 1.3 (max 1.2), no common 1.2 suite


@pytest.mark.broker
def test_mosquitto_start_failure_carries_the_log(tmp_path: Path, bpki: Pki) -> None:
    listener = MosquittoListener(tls=True, certfile=tmp_path / "missing.pem", keyfile=bpki.key)
    mosq = Mosquitto([listener], workdir=tmp_path)
    with pytest.raises(BrokerError, match=r"exited with status[\s\S]*missing\.pem"):
        mosq.start()
    assert not mosq.running()


@pytest.mark.broker
def test_mosquitto_stop_leaves_no_process(tmp_path: Path, bpki: Pki) -> None:
    mosq = Mosquitto([MosquittoListener()], workdir=tmp_path)
    mosq.start()
    pid, port = mosq.pid, mosq.port
    assert pid is not None and port_open(port)
    mosq.stop()
    assert not _alive(pid)
    assert mosq.leftover_pids() == []
    assert not port_open(port)
    mosq.stop()  # idempotent


# --------------------------------------------------------------------------- RabbitMQ


@pytest.fixture(scope="module")
def rabbit(bpki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    require_binary("rabbitmq-server")
    node = RabbitMQ(
        workdir=tmp_path_factory.mktemp("rabbit"),
        certfile=bpki.chain,
        keyfile=bpki.key,
        cacertfile=bpki.ca,
        verify="verify_peer",
        fail_if_no_peer_cert=False,
        auth_mechanisms=("PLAIN", "EXTERNAL"),
        users={"alice": "s3cret", "device-1": None},
    )
    node.start()
    yield node
    node.stop()
    assert node.leftover_pids() == [], "RabbitMQ left processes behind"


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def sasl_mechanisms(port: int, ctx: ssl.SSLContext) -> bytes:
    """Send the AMQP 1.0 SASL header over TLS; return the sasl-mechanisms frame body."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(AMQP_SASL_HEADER)
        assert _read_exact(tls, 8) == AMQP_SASL_HEADER
        size = int.from_bytes(_read_exact(tls, 4), "big")
        frame = _read_exact(tls, size - 4)
        assert frame[1] == 1  # frame type 1 = SASL
        return frame


def amqp10_roundtrip(
    port: int,
    ctx: ssl.SSLContext,
    *,
    mech: str,
    user: str | None = None,
    password: str | None = None,
    timeout: float = 10,
) -> bytes:
    """Open an AMQP 1.0 connection with proton's engine over *our* TLS socket, send one
    message to a queue and receive it back. Returns the body; raises on refusal."""
    proton = pytest.importorskip("proton")
    from proton import Connection, Delivery, Endpoint, Message, Transport

    queue = f"/queue/itls-{uuid.uuid4().hex[:8]}"
    conn = Connection()
    conn.container = "itls-test"
    conn.hostname = "localhost"
    if user is not None:
        conn.user = user
    if password is not None:
        conn.password = password
    transport = Transport()
    sasl = transport.sasl()
    sasl.allowed_mechs(mech)
    sasl.allow_insecure_mechs = True  # proton does not see that we already run TLS
    transport.bind(conn)
    conn.open()
    session = conn.session()
    session.open()
    sender = session.sender("s")
    sender.target.address = queue
    sender.open()
    receiver = session.receiver("r")
    receiver.source.address = queue
    receiver.open()
    receiver.flow(1)
    body: list[bytes] = []
    sent: list[Any] = []

    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        deadline = time.monotonic() + timeout
        while not body:
            if time.monotonic() > deadline:
                raise TimeoutError("AMQP 1.0 round trip timed out")
            cond = transport.condition or conn.remote_condition
            if cond is not None:
                raise ConnectionRefusedError(f"{cond.name}: {cond.description}")
            if sasl.outcome not in (None, proton.SASL.OK):
                raise PermissionError(f"SASL outcome {sasl.outcome}")
            if sender.credit > 0 and not sent:
                delivery = sender.delivery("1")
                sender.send(Message(body="hello over amqps").encode())
                sender.advance()
                sent.append(delivery)
            current = receiver.current
            if current is not None and current.readable and not current.partial:
                message = Message()
                message.decode(receiver.recv(current.pending) or b"")
                current.update(Delivery.ACCEPTED)
                current.settle()
                receiver.advance()
                body.append(str(message.body).encode())
                break
            pending = transport.pending()
            if pending > 0:
                tls.sendall(transport.peek(pending) or b"")
                transport.pop(pending)
                continue
            if transport.closed:
                raise ConnectionError("transport closed")
            if tls.pending() or select.select([tls], [], [], 0.2)[0]:
                data = tls.recv(max(transport.capacity(), 1))
                if not data:
                    transport.close_tail()
                else:
                    transport.push(data)
        conn.close()
        pending = transport.pending()
        if pending > 0:
            tls.sendall(transport.peek(pending) or b"")
    assert conn.state & Endpoint.LOCAL_CLOSED
    return body[0]


@pytest.mark.broker
def test_rabbitmq_tls_listener_handshake(rabbit: RabbitMQ, bpki: Pki) -> None:
    assert rabbit.startup_seconds is not None
    assert rabbit.amqps_port != rabbit.amqp_port
    assert handshake(rabbit.amqps_port, client_context(bpki))[0] == "TLSv1.3"
    tls12 = client_context(bpki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(rabbit.amqps_port, tls12)[0] == "TLSv1.2"
    assert "started TLS (SSL) listener on 127.0.0.1" in rabbit.log_text()


@pytest.mark.broker
def test_rabbitmq_speaks_amqp10_sasl(rabbit: RabbitMQ, bpki: Pki) -> None:
    frame = sasl_mechanisms(rabbit.amqps_port, client_context(bpki, client_cert=True))
    assert b"PLAIN" in frame
    assert b"EXTERNAL" in frame


@pytest.mark.broker
def test_rabbitmq_amqp10_plain_round_trip(rabbit: RabbitMQ, bpki: Pki) -> None:
    ctx = client_context(bpki)
    assert (
        amqp10_roundtrip(rabbit.amqps_port, ctx, mech="PLAIN", user="alice", password="s3cret")
        == b"hello over amqps"
    )
    # (a wrong password ends in SASL outcome "auth" only after RabbitMQ's ~3 s
    # anti-brute-force delay, so the refusal is checked through rabbitmqctl below)


@pytest.mark.broker
def test_rabbitmq_amqp10_external_round_trip(rabbit: RabbitMQ, bpki: Pki) -> None:
    ctx = client_context(bpki, client_cert=True)
    assert amqp10_roundtrip(rabbit.amqps_port, ctx, mech="EXTERNAL") == b"hello over amqps"


@pytest.mark.broker
def test_rabbitmq_ctl_reaches_the_private_node(rabbit: RabbitMQ) -> None:
    rabbit.add_user("bob", "pw2")
    assert rabbit.ctl("authenticate_user", "bob", "pw2", check=False).returncode == 0
    users = rabbit.ctl("list_users", "--quiet").stdout.split()
    assert {"alice", "bob", "device-1"} <= set(users)
    assert "guest" not in users  # no default user when definitions are loaded at boot
    refused = rabbit.ctl("authenticate_user", "alice", "wrong", check=False)
    assert refused.returncode != 0


@pytest.mark.broker
def test_rabbitmq_tls11_only_listener_and_clean_stop(tmp_path: Path, bpki: Pki) -> None:
    """Erlang/OTP 25 still implements TLS 1.1 when asked explicitly; legacy CBC-SHA1
    suites (here RSA key exchange, IANA and OpenSSL names mixed) are accepted too."""
    require_binary("rabbitmq-server")
    node = RabbitMQ(
        workdir=tmp_path,
        certfile=bpki.rsa_chain,
        keyfile=bpki.rsa_key,
        versions=["tlsv1.1"],
        ciphers=["TLS_RSA_WITH_AES_128_CBC_SHA", "ECDHE-RSA-AES256-SHA"],
    )
    node.start()
    try:
        port = node.amqps_port
        ctx = legacy_context(bpki.rsa_ca, ssl.TLSVersion.TLSv1_1)
        assert handshake(port, ctx) == ("TLSv1.1", "AES128-SHA")  # server order wins
        ctx.set_ciphers("ECDHE-RSA-AES256-SHA:@SECLEVEL=0")
        assert handshake(port, ctx) == ("TLSv1.1", "ECDHE-RSA-AES256-SHA")
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            handshake(port, ssl.create_default_context(cafile=str(bpki.rsa_ca)))
        assert node.pid is not None
        pids = [node.pid, *_marked_pids(node)]
        assert len(pids) >= 2  # the start script, beam.smp, epmd, ...
    finally:
        node.stop()
    assert node.leftover_pids() == []
    assert not port_open(port) and not port_open(node.epmd_port)
    assert [pid for pid in pids if _alive(pid)] == []


def _alive(pid: int) -> bool:
    """True for a running process; a zombie awaiting its reaper counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _marked_pids(node: RabbitMQ) -> list[int]:
    """Every live process that carries this node's marker (for the no-leftover check)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if (
            f"RABBITMQ_NODENAME={node.nodename}".encode() in environ.split(b"\0")
            and MARKER_ENV.encode() in environ
        ):
            pids.append(int(entry.name))
    return pids
