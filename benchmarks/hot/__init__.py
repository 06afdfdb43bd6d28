"""HOT (``hdrq_plugin.hot.mode``) against plain backprop: ``memory`` measures the bytes the backward
pass saves, the peak memory of one training step (in a fresh child process) and backward time,
and ``parity`` (run through ``memory --parity``) the accuracy of adapting θ0 to every target with
HOT vs plain, per target and after the float (and optionally HDRQ W4A4) merge. Run from the
repository root with ``python -m benchmarks.hot.memory [--parity]`` (``--help`` for options); it
prints tables and updates ``benchmarks/results/hot.json``.
"""
