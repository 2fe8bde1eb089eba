"""Benchmarks of iothub-tls: measured side by side, written as markdown and JSON.

Run ``python -m bench.run`` (``--smoke`` for tiny sizes, ``--out DIR``). See
docs/performance.md for the method and the latest results.
"""
