"""One runtime layer for every artifact format: the evaluator and the server both run models here.

``open_model`` loads an artifact folder into the ``RuntimeModel`` of its format (PyTorch for
``hf``/``source``/``peft``/``torch-int8`` and GPTQ checkpoints, ONNX Runtime for ``onnx``,
llama.cpp for ``gguf``, TensorRT for ``tensorrt``). Each opens per-request sequences and runs a
ragged batch of them in one pass (``slimline/runtime/base.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimline.artifacts import MANIFEST
from slimline.errors import ArtifactError
from slimline.runtime.base import Feed, RuntimeModel, Sequence
from slimline.runtime.checkpoint import checkpoint_context, gguf_cache_bytes_per_token, gguf_context

__all__ = [
    "RUNTIME_BY_FORMAT",
    "Feed",
    "RuntimeModel",
    "Sequence",
    "artifact_format",
    "checkpoint_context",
    "gguf_cache_bytes_per_token",
    "gguf_context",
    "open_model",
]

RUNTIME_BY_FORMAT = {
    "source": "pytorch",
    "hf": "pytorch",
    "peft": "pytorch",
    "torch-int8": "pytorch",
    "onnx": "onnxruntime",
    "gguf": "llama.cpp",
    "tensorrt": "tensorrt",
}


def read_manifest(folder: Path) -> dict:
    """An artifact folder's manifest, or {} for a plain folder."""
    return json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).exists() else {}


def model_folder(folder: Path) -> Path:
    """Where an artifact's model and tokenizer files are: the folder, or the input artifact's source checkpoint."""
    return Path(read_manifest(folder).get("model_path") or folder)


def artifact_format(folder: Path) -> str:
    """The format of an artifact folder, or what a plain folder holds (a checkpoint, a graph, a GGUF file)."""
    manifest = read_manifest(folder)
    if manifest:
        return manifest["format"]
    if (folder / "model.onnx").exists():
        return "onnx"
    if (folder / "model.gguf").exists():
        return "gguf"
    return "hf"


def open_model(
    folder: Path,
    max_sequences: int = 1,
    shares_cores: bool = False,
    serving: bool = False,
    batch_invariant: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RuntimeModel:
    """Load an artifact folder into the runtime of its format.

    ``max_sequences``: sequences open at once (llama.cpp sizes one context for them; the dense
    runtimes have no such bound). ``shares_cores``: the model yields its cores to another between
    passes (the draft of a speculative pair), so ONNX Runtime's idle threads must not spin; the
    target keeps spinning threads (see ``onnx_model.open_session``). ``serving``: run as the
    server would, llama.cpp as llama-server runs it: fused (flash) attention and a cache split
    per sequence (a request's attention never sums over another's cells), and with
    ``batch_invariant`` no one-token pass, so a request's greedy output is the same alone, batched
    and verified speculatively (see ``llama_cpp_model``). Evaluation keeps one unified cache
    without fused attention, so scores match llama.cpp's reference scoring.
    """
    if not folder.is_dir():
        raise ArtifactError(
            f"{folder} is not a folder: give an artifact folder (runs/<name>/stages/<id>) or a checkpoint"
        )
    fmt = artifact_format(folder)
    manifest = read_manifest(folder)
    if fmt not in RUNTIME_BY_FORMAT:
        raise ArtifactError(f"{folder} is a {fmt!r} artifact; models run from {', '.join(RUNTIME_BY_FORMAT)}")
    if fmt in ("hf", "source", "torch-int8"):
        from slimline.runtime.torch_model import TorchModel

        return TorchModel(model_folder(folder), name=folder.name, device=device, dtype=dtype)
    if fmt == "peft":
        from slimline.runtime.torch_model import TorchModel

        return TorchModel(
            Path(manifest["base_model_path"]),
            adapter_path=folder,
            name=folder.name,
            device=device,
            dtype=dtype,
        )
    if fmt == "onnx":
        from slimline.runtime.onnx_model import OnnxModel  # onnxruntime is an optional extra

        return OnnxModel(folder, spinning=not shares_cores)
    if fmt == "gguf":
        from slimline.runtime.llama_cpp_model import LlamaCppModel  # an optional extra

        return LlamaCppModel(
            folder,
            max_sequences=max_sequences,
            flash_attention=serving,
            unified_cache=not serving,
            steady_shapes=serving and batch_invariant,
        )
    from slimline.runtime.tensorrt_model import TensorRTModel  # needs TensorRT and CUDA

    return TensorRTModel(folder)
