"""NIPQ on the digits zoo (``run``): learned mixed precision at an average of 4 bits against
uniform W4A4 LSQ/STE QAT and HDRQ W4A4 post-training quantization, per target and merged — the
learned widths, QAT epoch cost against float fine-tuning, and the mixed-precision ONNX files
checked in onnxruntime; ``--phase bops`` checks a BOPs budget instead. Run from the repository
root with ``python -m benchmarks.nipq [--seeds 0 1 2] [--epochs 10]`` (``--help`` for options);
results go to ``benchmarks/results/nipq.json`` (``nipq_bops.json`` for ``--phase bops``).
"""
