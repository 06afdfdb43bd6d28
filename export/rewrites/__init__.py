"""Exact ONNX graph rewrites applied after Brevitas' export: each changes storage or layout,
never an output bit (tests check every one on real graphs).

``integer_path`` keeps onnxruntime's integer kernels connected, ``unsigned_grids`` stores signed
grids as uint8 where x86 kernels need it, ``int4`` turns 4-bit weights into true INT4
initializers (opset 21), ``linear_weights`` gives a bias-free Linear's transposed weight to a Gemm.
An ONNX rewrite a newly supported op needs goes here.
"""
