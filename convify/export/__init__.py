"""Export to ONNX and verification in onnxruntime: the exporter, sessions and
their execution providers, the op census, and ``verify``."""
