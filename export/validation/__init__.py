"""Does an exported file compute the model? onnxruntime sessions (``ort_runtime``), integer
codes on both sides (``activation_codes``), the parity rules on the integer grid (``parity``)
and the ``validate`` verb that puts them together (docs/export.md).
"""
