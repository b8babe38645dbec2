"""The fused ONNX export shared by the ONNX Runtime and TensorRT backends (``qwen2c export-onnx``)."""
