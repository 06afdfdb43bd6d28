"""Benchmarks of hdrq-plugin (run as scripts, e.g. ``python benchmarks/mtda.py``; see README)."""
