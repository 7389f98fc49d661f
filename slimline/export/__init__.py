"""Export stages: ONNX (with a KV cache) for ONNX Runtime, and TensorRT FP16 engines built from it."""
