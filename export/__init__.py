"""ONNX QDQ export and onnxruntime validation for hdrq-plugin models."""
