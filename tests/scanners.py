"""An independent scanner (Debian's sslscan) as a witness: what protocols and TLS 1.2
suites does a server accept, according to a tool that is not ours?"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET

from iothub_tls.policy import CIPHER_SUITES
from tests.brokers import require_binary

_SSLSCAN_VERSIONS = {"1.0": "TLSv1", "1.1": "TLSv1.1", "1.2": "TLSv1.2", "1.3": "TLSv1.3"}
_IANA = {s.openssl: s.iana for s in CIPHER_SUITES}


def sslscan(port: int, sni: str) -> tuple[set[str], set[str]]:
    """(accepted protocol versions, accepted TLS 1.2 suites of the table) per sslscan."""
    binary = require_binary("sslscan")
    out = subprocess.run(
        [
            binary,
            "--xml=-",
            "--no-colour",
            "--no-heartbleed",
            "--no-renegotiation",
            "--no-compression",
            "--no-fallback",
            "--no-groups",
            "--no-check-certificate",
            "--no-cipher-details",
            f"--sni-name={sni}",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    test = ET.fromstring(out[out.index("<?xml") :]).find("ssltest")
    assert test is not None, out
    protocols = {
        _SSLSCAN_VERSIONS[p.get("version", "")]
        for p in test.iter("protocol")
        if p.get("type") == "tls" and p.get("enabled") == "1"
    }
    suites = {
        _IANA[c.get("cipher", "")]
        for c in test.iter("cipher")
        if c.get("sslversion") == "TLSv1.2"
        and c.get("status") in ("accepted", "preferred")
        and c.get("cipher") in _IANA
    }
    return protocols, suites
