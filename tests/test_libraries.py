"""The same hardened context inside other libraries' handshakes: urllib3, requests-free
urllib3 pools and paho-mqtt call ``wrap_socket`` themselves, and the policy still holds."""

from __future__ import annotations

import pytest

import iothub_tls as it

HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _chain(exc: BaseException) -> list[BaseException]:
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        nxt = exc.__cause__ or exc.__context__
        if nxt is None and exc.args and isinstance(exc.args[0], BaseException):
            nxt = exc.args[0]
        exc = nxt
    return seen


# -- urllib3 ---------------------------------------------------------------------------------


def _pool(ctx, port):
    urllib3 = pytest.importorskip("urllib3")
    return urllib3.HTTPSConnectionPool("localhost", port, ssl_context=ctx, retries=False)


def test_urllib3_keeps_ecc_only_refusal(pki, tls_server):
    urllib3 = pytest.importorskip("urllib3")
    server = tls_server([pki.rsa_leaf], payload=HTTP_OK)
    ctx = it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY))
    with pytest.raises(urllib3.exceptions.SSLError) as err:
        _pool(ctx, server.port).request("GET", "/")
    assert any(isinstance(e, it.CipherSuiteError) for e in _chain(err.value))
    assert "ECC-only mode needs an ECDSA certificate" in str(err.value)


def test_urllib3_negotiates_fragment_length_and_reports(pki, tls_server):
    server = tls_server([pki.ec_leaf], payload=HTTP_OK)
    ctx = it.create_ssl_context(
        pki.policy(ciphers=it.CipherProfile.ECC_ONLY, max_fragment_length=512)
    )
    response = _pool(ctx, server.port).request(
        "GET", "/", preload_content=False, release_conn=False
    )
    info = it.tls_info(response.connection.sock)
    assert response.read() == b"ok"
    assert info.max_fragment_length == 512
    assert info.server_key_type == "EC"


# -- paho-mqtt -------------------------------------------------------------------------------


def _paho_client():
    mqtt = pytest.importorskip("paho.mqtt.client")
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="device-1")
    return mqtt.Client(client_id="device-1")


def test_paho_keeps_ecc_only_refusal(pki, tls_server):
    server = tls_server([pki.rsa_leaf])
    client = _paho_client()
    client.tls_set_context(it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY)))
    with pytest.raises(it.CipherSuiteError, match="ECDSA certificate"):
        client.connect("localhost", server.port)


def test_paho_negotiates_fragment_length_and_reports(pki, tls_server):
    server = tls_server([pki.ec_leaf])
    client = _paho_client()
    client.tls_set_context(it.create_ssl_context(pki.policy(max_fragment_length=1024)))
    client.connect("localhost", server.port)
    try:
        info = it.tls_info(client.socket())
    finally:
        client.socket().close()
    assert info.max_fragment_length == 1024
    assert info.sni == "localhost"
    assert info.anchor == "iothub-tls Test Root G2"


def test_paho_keeps_pinning(pki, tls_server):
    server = tls_server([pki.rsa_leaf])
    client = _paho_client()
    client.tls_set_context(it.create_ssl_context())  # pinned to the Azure roots
    with pytest.raises(it.CertificateVerificationError, match="DigiCert Global Root G2"):
        client.connect("localhost", server.port)
