"""Target descriptions (``registry``) and the backends that lower to them (``backends``: tvm, onnxruntime,
tensorrt)."""
