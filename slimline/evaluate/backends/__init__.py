"""Evaluation backends by artifact format; later issues add ONNX Runtime, llama.cpp and TensorRT."""

from __future__ import annotations

from slimline.artifacts import Artifact
from slimline.errors import ArtifactError
from slimline.evaluate.backends.base import Backend
from slimline.evaluate.backends.torch_backend import TorchBackend

BACKEND_BY_FORMAT = {
    "source": "pytorch",
    "hf": "pytorch",
    "peft": "pytorch",
    "torch-int8": "pytorch",
    "onnx": "onnxruntime",
    "gguf": "llama.cpp",
    "tensorrt": "tensorrt",
    "serve": "speculative",
}


def backend_name(artifact: Artifact) -> str:
    """The backend that runs this artifact's format."""
    if artifact.format not in BACKEND_BY_FORMAT:
        raise ArtifactError(f"no evaluation backend for format {artifact.format!r} ({artifact.path})")
    return BACKEND_BY_FORMAT[artifact.format]


def open_backend(artifact: Artifact) -> Backend:
    """Load the artifact into the backend that runs its format."""
    backend_name(artifact)
    if artifact.format == "peft":
        return TorchBackend(artifact.base_model_path, adapter_path=artifact.path)
    if artifact.format == "onnx":
        from slimline.evaluate.backends.onnx_backend import OnnxBackend  # onnxruntime is an optional extra

        return OnnxBackend(artifact.path)
    if artifact.format == "gguf":
        from slimline.evaluate.backends.llama_cpp_backend import LlamaCppBackend  # an optional extra

        return LlamaCppBackend(artifact.path)
    if artifact.format == "serve":
        from slimline.evaluate.backends.speculative_backend import SpeculativeBackend

        return SpeculativeBackend(artifact.path)
    if artifact.format == "tensorrt":
        from slimline.evaluate.backends.tensorrt_backend import TensorRTBackend  # needs TensorRT and CUDA

        return TensorRTBackend(artifact.path)
    return TorchBackend(artifact.model_path)
