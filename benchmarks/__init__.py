"""Benchmarks for hago_py against peer PTQ recipes on a real model corpus (see benchmarks/README.md).

Not part of the installed package; run as ``python -m benchmarks.run`` from the repository root.
"""
