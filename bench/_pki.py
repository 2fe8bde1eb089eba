"""Certificates for the benchmarks, generated at start (never stored).

Two chains, shaped like IoT Hub's:

* ``rsa_root -> rsa_issuing -> {RSA-2048 leaf, ECDSA P-256 leaf}``: IoT Hub today, whose
  ECC leaf also chains to an RSA root (DigiCert Global Root G2);
* ``ec_root -> ec_issuing -> ECDSA P-256 leaf``: an all-ECC chain (what a hub anchored at
  DigiCert Global Root G3 / Microsoft ECC Root 2017 would send), the upper bound of what
  ECC can save.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import iothub_tls as it
from iothub_tls.testing.pki import CertificateAuthority, Issued, KeyType

HOST = "hub.iothub-tls.test"
#: Name the MQTT clients dial (paho sends the dialled name in SNI); on both leaves.
LOCAL_HOST = "localhost"


@dataclass(frozen=True)
class BenchPKI:
    rsa_root: CertificateAuthority
    rsa_leaf: Issued
    ec_leaf: Issued
    ec_root: CertificateAuthority
    ec_leaf_ec_chain: Issued

    @property
    def roots(self) -> it.RootSet:
        return it.RootSet.from_pem(self.rsa_root.cert_pem + self.ec_root.cert_pem)

    @property
    def roots_pem(self) -> str:
        return (self.rsa_root.cert_pem + self.ec_root.cert_pem).decode()

    def policy(self, **kwargs: object) -> it.TlsPolicy:
        return it.TlsPolicy(roots=self.roots, **kwargs)  # type: ignore[arg-type]


@functools.cache
def bench_pki() -> BenchPKI:
    rsa_root = CertificateAuthority.root("iothub-tls Bench Root RSA")
    rsa_issuing = rsa_root.intermediate("iothub-tls Bench Issuing RSA")
    ec_root = CertificateAuthority.root("iothub-tls Bench Root ECC", key_type=KeyType.EC)
    ec_issuing = ec_root.intermediate("iothub-tls Bench Issuing ECC", key_type=KeyType.EC)
    return BenchPKI(
        rsa_root=rsa_root,
        rsa_leaf=rsa_issuing.server(HOST, LOCAL_HOST),
        ec_leaf=rsa_issuing.server(HOST, LOCAL_HOST, key_type=KeyType.EC),
        ec_root=ec_root,
        ec_leaf_ec_chain=ec_issuing.server(HOST, LOCAL_HOST, key_type=KeyType.EC),
    )
