"""Reproducible performance runs: ``python benchmarks/run.py --list`` (see run.py)."""
