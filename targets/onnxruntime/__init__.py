"""The ONNX Runtime backend: the fused ONNX export run by ONNX Runtime (CPU or CUDA execution provider)."""
