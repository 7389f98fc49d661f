"""Language models the engine decodes with: per-request sequences that own their KV cache.

A ``LanguageModel`` opens independent ``Sequence`` objects; a sequence appends tokens and
returns their next-token logits, and can be cut back to a shorter length (speculative decoding
drops rejected draft tokens that way). Nothing is shared between sequences but the weights, so
one request's cache is never visible to another. Two implementations: PyTorch (transformers'
``DynamicCache``; the reference) and ONNX Runtime (the exported decoder graph; the fast CPU path).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from slimline.artifacts import MANIFEST
from slimline.errors import ArtifactError


class Sequence(ABC):
    """One token sequence on a model, with its own KV cache."""

    length: int

    @abstractmethod
    def extend(self, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens``; return the next-token logits after each of them, float32 [len(tokens), vocab]."""

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length``."""


class LanguageModel(ABC):
    """Weights loaded once; sequences opened per request."""

    name: str
    context_length: int
    backend: str

    @abstractmethod
    def new_sequence(self) -> Sequence:
        """A fresh, empty sequence."""


class TorchSequence(Sequence):
    """A sequence on an HF model with transformers' dynamic cache."""

    def __init__(self, model) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        self.length = 0

    @torch.inference_mode()
    def extend(self, tokens: list[int]) -> torch.Tensor:
        """One forward pass over the new tokens on the cache."""
        output = self.model(input_ids=torch.tensor([tokens]), past_key_values=self.cache, use_cache=True)
        self.length += len(tokens)
        return output.logits[0].float()

    def truncate(self, length: int) -> None:
        """Crop the cache (transformers 5 takes the number of tokens to remove, as a negative number)."""
        if length < self.length:
            self.cache.crop(length - self.length)
        self.length = length


class TorchModel(LanguageModel):
    """An HF checkpoint run by PyTorch in float32."""

    backend = "pytorch"

    def __init__(self, folder: Path) -> None:
        from slimline.models import load_causal_lm

        self.model = load_causal_lm(folder)
        self.name = folder.name
        self.context_length = self.model.config.max_position_embeddings

    def new_sequence(self) -> Sequence:
        """A sequence with an empty dynamic cache."""
        return TorchSequence(self.model)


class OnnxModelSequence(Sequence):
    """A sequence on the exported decoder graph; the cache lives in numpy arrays."""

    def __init__(self, session) -> None:
        from slimline.evaluate.backends.onnx_backend import OnnxSequence

        self.state = OnnxSequence(session)

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self.state.length

    def extend(self, tokens: list[int]) -> torch.Tensor:
        """One graph run over the new tokens."""
        return torch.from_numpy(self.state.step(np.asarray(tokens, dtype=np.int64)).astype(np.float32, copy=False))

    def truncate(self, length: int) -> None:
        """Slice the cache arrays along their sequence axis."""
        self.state.truncate(length)


class OnnxModel(LanguageModel):
    """An ``export.onnx`` artifact run by ONNX Runtime (CUDA provider where available, else CPU)."""

    backend = "onnxruntime"

    def __init__(self, folder: Path) -> None:
        from slimline.evaluate.backends.onnx_backend import MODEL_FILE, open_session

        self.session = open_session(folder / MODEL_FILE, spinning=False)  # target and draft share the cores
        self.name = folder.name
        config = json.loads((folder / "config.json").read_text())
        self.context_length = config["max_position_embeddings"]

    def new_sequence(self) -> Sequence:
        """A sequence with an empty cache."""
        return OnnxModelSequence(self.session)


def artifact_format(folder: Path) -> str:
    """The format of an artifact folder, or 'hf' for a plain checkpoint folder without a manifest."""
    if (folder / MANIFEST).exists():
        return json.loads((folder / MANIFEST).read_text())["format"]
    if (folder / "model.onnx").exists():
        return "onnx"
    return "hf"


def load_language_model(folder: Path) -> LanguageModel:
    """Open an artifact (hf, the input model, or onnx) for serving."""
    if not folder.is_dir():
        raise ArtifactError(
            f"{folder} is not a folder: give an artifact folder (runs/<name>/stages/<id>) or a checkpoint"
        )
    fmt = artifact_format(folder)
    if fmt in ("hf", "source"):
        source = folder
        if fmt == "source":  # the run's input artifact points at the checkpoint it was read from
            source = Path(json.loads((folder / MANIFEST).read_text())["model_path"])
        return TorchModel(source)
    if fmt == "onnx":
        return OnnxModel(folder)
    raise ArtifactError(f"{folder} is a {fmt!r} artifact; the server runs 'hf' and 'onnx' artifacts")
