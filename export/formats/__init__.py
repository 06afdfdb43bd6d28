"""Export targets: one module per file format a Brevitas model is written to.

``qdq`` (ONNX QDQ, INT8 or true INT4 weights), ``float_export`` (the FP32 twin for latency and
size comparisons), ``ort_format`` (onnxruntime's ORT format for mobile/edge builds). A new
target is a module here whose entry point ``hdrq_plugin.export`` re-exports.
"""
