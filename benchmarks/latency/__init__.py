"""Exported-model speed and graph facts in onnxruntime: ``export_latency`` measures
onnxruntime-vs-Brevitas parity, INT8 / true-INT4 / FP32 latency and file sizes of CIFAR-style
ResNet-8s (random or the demo zoo's); ``edge_latency`` (also ``export_latency --suite 224``) sets
224×224 ResNet-18 and MobileNetV2 exported by hdrq-plugin against onnxruntime's own
``quantize_static`` (latency, size, fused nodes, HDRQ calibration cost); ``integer_path_facts``
counts the nodes onnxruntime runs on integer kernels vs in float before and after the exporter's
integer-path rewrites; ``ort_levels`` measures top-1 agreement of W8A8 files (Linear -> ReLU ->
Linear patterns, 224x224 ResNet-18) under every onnxruntime optimization level. Run from the repository root, e.g. ``python -m
benchmarks.latency.export_latency``, ``nice -n 10 python -m benchmarks.latency.export_latency
--suite 224`` or ``nice -n 10 python -m benchmarks.latency.integer_path_facts`` (``--help`` for
options); results go to ``benchmarks/results/``.
"""
