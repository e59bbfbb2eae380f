"""Benchmarks for clip_core; run modules with ``python -m bench.<name>``."""
