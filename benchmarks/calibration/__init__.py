"""What calibration costs: ``cost`` measures single-model accuracy and calibration time of RTN,
AdaRound, BRECQ, QDrop, HDRQ and Brevitas GPTQ on the same model, images and iteration budget
(CPU time as a ratio to QDrop's); ``noise_cost`` times one forward + backward of an HDRQ-quantized
conv weight with pseudo-quantization noise against STE rounding. Run from the repository root
with ``python -m benchmarks.calibration.cost [--model zoo|handwritten]`` (JSON in
``benchmarks/results/calibration_cost.json``) and ``python -m benchmarks.calibration.noise_cost``
(prints a table); ``--help`` lists the options.
"""
