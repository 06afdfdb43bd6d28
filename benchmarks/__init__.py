"""Benchmarks of hdrq-plugin, one subpackage per benchmark; run them as modules from the repository
root, e.g. ``python -m benchmarks.mtda --quick`` (see each subpackage's docstring and README)."""
