"""Generic AMQP 1.0 interop: :class:`iothub_tls.amqp.AmqpConnection` against a real
RabbitMQ (``rabbitmq_amqp1_0``) whose TLS listener is Erlang's TLS stack, not OpenSSL.

The shared node enforces TLS 1.2+ and only IoT Hub's strong suites and requests client
certificates (SASL PLAIN and EXTERNAL). Each accepted connection has refusal twins,
asserted by error type and message: wrong password, unknown certificate, wrong root,
ECC-only device against an RSA listener, a TLS 1.1-only listener, a weak-suites-only
listener, a peer that insists on SASL when the client sends none.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import iothub_tls as it
from iothub_tls.amqp import AmqpConnection, AmqpMessage, AmqpOptions
from iothub_tls.policy import STRONG_SUITES, WEAK_SUITES
from iothub_tls.testing.pki import Issued
from tests.brokers import RabbitMQ, require_binary
from tests.conftest import HOST, PKI, new_root

pytestmark = pytest.mark.broker

DEVICE_CN = "amqp-device-1"


@dataclass
class Files:
    pki: PKI
    server_chain: Path
    server_key: Path
    client_cas: Path
    device: Issued
    stranger: Issued  # a valid certificate whose CN is no RabbitMQ user


@pytest.fixture(scope="module")
def files(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("rmq-pki")
    chain, key = pki.rsa_leaf.write(d, "server")
    cas = d / "client-cas.pem"
    cas.write_bytes(pki.root.cert_pem + pki.intermediate.cert_pem)
    device = pki.intermediate.issue(cn=DEVICE_CN, client=True, key_type="ec")
    stranger = pki.intermediate.issue(cn="nobody-registered", client=True, key_type="ec")
    return Files(pki, Path(chain), Path(key), cas, device, stranger)


@pytest.fixture(scope="module")
def rabbit(files: Files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    require_binary("rabbitmq-server")
    node = RabbitMQ(
        workdir=tmp_path_factory.mktemp("rabbit-amqp"),
        certfile=files.server_chain,
        keyfile=files.server_key,
        cacertfile=files.client_cas,
        versions=("tlsv1.2", "tlsv1.3"),
        ciphers=[s.iana for s in STRONG_SUITES],
        verify="verify_peer",
        fail_if_no_peer_cert=False,
        auth_mechanisms=("PLAIN", "EXTERNAL"),
        users={"alice": "s3cret", DEVICE_CN: None},
    )
    node.start()
    yield node
    node.stop()


def identity(issued: Issued) -> it.ClientIdentity:
    return it.ClientIdentity.from_pem(issued.cert_chain_pem, issued.key_pem)


def connection(rabbit: RabbitMQ, files: Files, **kwargs: object) -> AmqpConnection:
    kwargs.setdefault("policy", files.pki.policy())
    options = AmqpOptions(connect_timeout=15, retry=None)
    return AmqpConnection(  # type: ignore[arg-type]
        "127.0.0.1", rabbit.amqps_port, server_hostname=HOST, options=options, **kwargs
    )


def queue_address() -> str:
    return f"/queue/itls-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- accepted


def test_plain_send_and_receive_with_settlement(rabbit: RabbitMQ, files: Files) -> None:
    address = queue_address()
    conn = connection(rabbit, files, sasl="PLAIN", username="alice", password="s3cret")
    sender = conn.sender(address)
    receiver = conn.receiver(address, credit=5)
    with conn:
        info = conn.tls_info
        assert info is not None and info.version == "TLSv1.3"
        assert info.anchor == "iothub-tls Test Root G2" and info.sni == HOST
        # send() returns only once RabbitMQ's disposition (accepted) has arrived
        sender.send(
            AmqpMessage(
                body=b"\x00\x01binary",
                properties={"k": "v", "n": 7},
                message_id="m-1",
                content_type="application/octet-stream",
            )
        )
        sender.send("text body")
        first = receiver.receive(timeout=10)
        assert first is not None
        assert first.message.body == b"\x00\x01binary"
        assert first.message.properties == {"k": "v", "n": 7}
        assert first.message.message_id == "m-1"
        assert first.message.content_type == "application/octet-stream"
        first.accept()
        second = receiver.receive(timeout=10)
        assert second is not None and second.message.body == "text body"
        second.accept()
        with pytest.raises(it.DeliveryError, match="already settled"):
            second.accept()


def test_release_redelivers_and_reject_drops(rabbit: RabbitMQ, files: Files) -> None:
    address = queue_address()
    conn = connection(rabbit, files, sasl="PLAIN", username="alice", password="s3cret")
    sender = conn.sender(address)
    receiver = conn.receiver(address, credit=1)
    with conn:
        sender.send(AmqpMessage(body=b"again", message_id="r-1"))
        delivery = receiver.receive(timeout=10)
        assert delivery is not None and delivery.message.message_id == "r-1"
        delivery.release()
        redelivered = receiver.receive(timeout=10)
        assert redelivered is not None and redelivered.message.message_id == "r-1"
        redelivered.reject()
        sender.send(AmqpMessage(body=b"next", message_id="r-2"))
        following = receiver.receive(timeout=10)
        # the rejected message is gone: the next one in the queue is the new message
        assert following is not None and following.message.message_id == "r-2"
        following.accept()


def test_external_with_client_certificate(rabbit: RabbitMQ, files: Files) -> None:
    address = queue_address()
    conn = connection(
        rabbit,
        files,
        sasl="EXTERNAL",
        policy=None,
        context=it.create_ssl_context(files.pki.policy(), identity=identity(files.device)),
    )
    sender = conn.sender(address)
    receiver = conn.receiver(address)
    with conn:
        sender.send(b"from the device certificate")
        delivery = receiver.receive(timeout=10)
        assert delivery is not None and delivery.message.body == b"from the device certificate"
        delivery.accept()


def test_tls12_negotiates_a_strong_suite(rabbit: RabbitMQ, files: Files) -> None:
    policy = files.pki.policy(max_version=__import__("ssl").TLSVersion.TLSv1_2)
    conn = connection(
        rabbit, files, policy=policy, sasl="PLAIN", username="alice", password="s3cret"
    )
    with conn:
        info = conn.tls_info
        assert info is not None and info.version == "TLSv1.2"
        assert info.iana_cipher in {s.iana for s in STRONG_SUITES}
        assert info.server_key_type == "RSA"


# --------------------------------------------------------------------------- refused


def test_wrong_password_is_refused(rabbit: RabbitMQ, files: Files) -> None:
    conn = connection(rabbit, files, sasl="PLAIN", username="alice", password="wrong")
    conn.sender(queue_address())
    # RabbitMQ delays a failed SASL outcome by ~3 s (brute-force protection)
    with pytest.raises(it.AuthenticationError, match=r"refused SASL PLAIN authentication"):
        conn.connect()
    conn.close()


def test_external_with_unknown_certificate_is_refused(rabbit: RabbitMQ, files: Files) -> None:
    conn = connection(
        rabbit,
        files,
        sasl="EXTERNAL",
        policy=None,
        context=it.create_ssl_context(files.pki.policy(), identity=identity(files.stranger)),
    )
    with pytest.raises(it.AuthenticationError, match=r"refused SASL EXTERNAL authentication"):
        conn.connect()
    conn.close()


def test_wrong_root_is_refused(rabbit: RabbitMQ, files: Files) -> None:
    other = new_root("Some Other Root")
    policy = it.TlsPolicy(roots=it.RootSet.from_pem(other.cert_pem))
    conn = connection(
        rabbit, files, policy=policy, sasl="PLAIN", username="alice", password="s3cret"
    )
    with pytest.raises(it.CertificateVerificationError, match="certificate verify failed"):
        conn.connect()
    conn.close()


def test_ecc_only_device_refuses_rsa_listener(rabbit: RabbitMQ, files: Files) -> None:
    policy = files.pki.policy(ciphers=it.CipherProfile.ECC_ONLY)
    conn = connection(
        rabbit, files, policy=policy, sasl="PLAIN", username="alice", password="s3cret"
    )
    with pytest.raises(it.CipherSuiteError, match="ECC-only mode needs an ECDSA certificate"):
        conn.connect()
    conn.close()


def test_no_sasl_layer_against_a_sasl_only_broker(rabbit: RabbitMQ, files: Files) -> None:
    conn = connection(rabbit, files, sasl=None)
    with pytest.raises(it.ConnectionFailedError, match="disagree about the SASL layer"):
        conn.connect()
    conn.close()


def test_tls11_only_listener_is_refused(files: Files, tmp_path: Path) -> None:
    require_binary("rabbitmq-server")
    node = RabbitMQ(
        workdir=tmp_path,
        certfile=files.server_chain,
        keyfile=files.server_key,
        versions=["tlsv1.1"],
        ciphers=["TLS_RSA_WITH_AES_128_CBC_SHA", "ECDHE-RSA-AES256-SHA"],
    )
    node.start()
    try:
        conn = connection(node, files, sasl="PLAIN", username="guest", password="guest")
        with pytest.raises(it.ProtocolVersionError, match=r"does not accept TLS 1\.2 or later"):
            conn.connect()
        conn.close()
    finally:
        node.stop()


def test_weak_suites_only_listener_is_refused(files: Files, tmp_path: Path) -> None:
    require_binary("rabbitmq-server")
    node = RabbitMQ(
        workdir=tmp_path,
        certfile=files.server_chain,
        keyfile=files.server_key,
        versions=["tlsv1.2"],
        ciphers=[s.iana for s in WEAK_SUITES],
    )
    node.start()
    try:
        conn = connection(node, files, sasl="PLAIN", username="guest", password="guest")
        with pytest.raises(it.CipherSuiteError, match="no cipher suite in common"):
            conn.connect()
        conn.close()
    finally:
        node.stop()
