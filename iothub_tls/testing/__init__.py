"""Test infrastructure shipped with the package: the one test PKI used by the tests,
the benchmarks, ``certs`` and the local hub."""
