"""Test infrastructure shipped with the package, for this project's tests, benchmarks and
CLI, and for your own test suites. Nothing here is imported by ``import iothub_tls``;
import each module when you need it (none of them needs pytest):

* :mod:`~iothub_tls.testing.pki` — the one test PKI: CAs, server and device
  certificates, deliberately broken ones for refusal tests, a key pool;
* :mod:`~iothub_tls.testing.server` — TLS servers on loopback: configurable
  (:class:`~iothub_tls.testing.server.TLSServer`), shaped like IoT Hub's front door
  (``HubLikeServer``), and ``openssl s_server`` (``OpenSSLServer``);
* :mod:`~iothub_tls.testing.relay` — a TCP relay that reads TLS record headers;
* :mod:`~iothub_tls.testing.faultproxy` — a TCP proxy that cuts, resets and corrupts;
* :mod:`~iothub_tls.testing.brokers` — private Mosquitto and RabbitMQ processes;
* :mod:`~iothub_tls.testing.ports` — free loopback ports, waiting for a listener;
* :mod:`~iothub_tls.testing.fleetlogs` — made-up fleet connection logs for the audit;
* :mod:`~iothub_tls.testing.hardware` — SoftHSM2 and software TPM labs.

These certificates and servers are for tests and labs, never for production.
"""
