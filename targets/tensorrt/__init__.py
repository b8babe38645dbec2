"""The TensorRT backend: a serialized TensorRT engine built from the fused ONNX export (standard ops)."""
