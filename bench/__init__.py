"""Benchmarks of xnatmigrate against the tools users would otherwise use (``make bench``).

Not timed tests: ``python -m bench.run`` measures side by side and writes ``docs/benchmarks.md``.
"""
