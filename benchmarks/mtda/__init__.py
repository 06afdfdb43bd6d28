"""The multi-target benchmark (issue 5): does HDRQ keep merged quantized models accurate? Every
method (RTN, AdaRound, BRECQ, QDrop, HDRQ, Brevitas GPTQ, optionally NIPQ) quantizes each
target's adapted model at every bit-width, the quantized models are merged with every tie rule
and compared with the float merge and the other reference rows, ablations and error barriers, as
a resumable grid of cells (``plan``: the grid, ``cells``: what a cell computes, ``store``: the
cell cache, ``tasks``: cells as Ray tasks, ``summary``/``tables``/``plots``: the outputs,
``estimate``: the full grid's cost). Run it from the repository root with ``python -m
benchmarks.mtda [--quick] [--out runs/mtda]`` (``make bench``; options: ``--help``), and the
seed-paired comparison of a finished run with ``python -m benchmarks.mtda.paired RESULTS_JSON``.
"""
