"""Scaling out on Ray (``hdrq_plugin.run.distributed``): ``speedup`` measures Ray against the sequential
runner on this machine — per-task overhead, ``quantize_targets`` on three targets and a slice of the
multi-target grid (:mod:`benchmarks.mtda`) — and ``estimate`` simulates the full default grid's wall
time on N workers from the per-cell costs of finished cell stores and the measured overhead. Run
from the repository root with ``python -m benchmarks.distributed.speedup`` (needs the
``distributed`` extra) and ``python -m benchmarks.distributed.estimate --records DIR ... [--workers
64]``; results go to ``benchmarks/results/distributed_*.json``.
"""
