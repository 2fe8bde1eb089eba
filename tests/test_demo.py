"""The README's first command: ``iothub-tls demo`` runs end to end and checks itself."""

from __future__ import annotations

import json

from iothub_tls.cli import main


def test_demo_runs_every_step(capsys):
    code = main(["demo", "--json"])
    report = json.loads(capsys.readouterr().out)
    failed = [o for o in report["outcomes"] if not o["ok"]]
    assert code == 0, failed
    assert report["ok"] is True
    steps = {(o["protocol"], o["step"]): o for o in report["outcomes"]}
    for protocol in ("MQTT", "AMQP", "HTTPS"):
        trip = next(o for (p, s), o in steps.items() if p == protocol and s.startswith("telemetry"))
        assert trip["info"]["version"] == "TLSv1.3"
        assert trip["info"]["anchor"] == "iothub-tls Local Hub Root"
        # a dual-certificate hub presents RSA unless the device accepts only ECDSA
        assert trip["info"]["server_key_type"] == "RSA"
        assert steps[(protocol, "legacy client, TLS 1.1")]["info"]["refused"]
        assert steps[(protocol, "legacy client, weak suite")]["info"]["refused"]
    assert steps[("MQTT", "reconnect (session resumed)")]["info"]["session_reused"] is True
    assert steps[("MQTT", "ECC-only device")]["info"]["server_key_type"] == "EC"
    # the hub logged every refusal with OpenSSL's reason, like IoT Hub's diagnostic log
    refusals = [r for r in report["log"] if r["result"] == "Failure"]
    assert len(refusals) == 6
    assert {r["reason"] for r in refusals} == {
        "TLS handshake failed: UNSUPPORTED_PROTOCOL",
        "TLS handshake failed: NO_SHARED_CIPHER",
    }
    assert report["stats"]["failedConnections"] == {"Mqtt": 2, "Amqp": 2, "Https": 2}


def test_demo_help_explains_itself(capsys):
    assert main(["demo", "--help"]) == 0
    assert "legacy clients" in capsys.readouterr().out
