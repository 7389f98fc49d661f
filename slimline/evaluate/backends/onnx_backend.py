"""ONNX Runtime backend: the exported decoder graph (``slimline/export/decoder_graph.py``) with its KV cache.

The provider is chosen by what is there: CUDA when onnxruntime-gpu sees a GPU, else the CPU.
Inputs and outputs stay float32 on the host (an FP16 graph keeps float32 I/O), so the same
code scores every precision.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from slimline.evaluate.backends.base import Backend

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


def choose_providers(preferred: str = "auto") -> list[str]:
    """ONNX Runtime execution providers, best first: CUDA where available (or asked for), then CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if preferred == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preferred == "cuda":
        raise RuntimeError(f"the CUDA provider is not available in this onnxruntime (it has {available})")
    return ["CPUExecutionProvider"]


def open_session(path: Path, providers: list[str] | None = None, spinning: bool = True):
    """An inference session with every graph optimisation and the CPU threads torch uses.

    ``spinning=False`` stops idle worker threads from busy-waiting: needed when two sessions take
    turns on the same cores (a speculative target and draft), where one's spinning threads
    would steal the cores the other is computing on.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=providers or choose_providers())


class OnnxSequence:
    """One sequence's state on a decoder graph: its KV cache and position. Batch size 1."""

    def __init__(self, session) -> None:
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = sorted((n for n in inputs if n.startswith("past.")), key=cache_order)
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.cache_dtype = np.float16 if "float16" in first.type else np.float32
        self.past: list[np.ndarray] = []
        self.length = 0
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: an empty cache."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
        self.past = [empty] * len(self.past_names)
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (drop rejected speculative tokens)."""
        self.past = [np.ascontiguousarray(past[:, :, :length]) for past in self.past]
        self.length = length

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed ``tokens`` [seq] after the cached ones; keep the new cache; return logits [seq, vocab]."""
        seq = tokens.shape[0]
        feeds = {
            "input_ids": tokens.reshape(1, seq).astype(np.int64),
            "attention_mask": np.ones((1, self.length + seq), dtype=np.int64),
            "position_ids": np.arange(self.length, self.length + seq, dtype=np.int64).reshape(1, seq),
            **dict(zip(self.past_names, self.past, strict=True)),
        }
        logits, *presents = self.session.run(None, feeds)
        self.past = presents
        self.length += seq
        return logits[0]


def cache_order(name: str) -> tuple[int, int]:
    """Sort key for ``past.<i>.key|value``: by layer, key before value."""
    _, layer, kind = name.split(".")
    return int(layer), 0 if kind == "key" else 1


class OnnxBackend(Backend):
    """Scores and times an exported decoder graph with ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, folder: Path, provider: str = "auto") -> None:
        """Open ``folder/model.onnx`` on the best available provider."""
        self.session = open_session(folder / MODEL_FILE, choose_providers(provider))
        self.providers = self.session.get_providers()
        self.sequence = OnnxSequence(self.session)
        self.folder = folder
        log.info("onnxruntime providers: %s", self.providers)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits from an empty cache (the cache is not kept)."""
        scratch = OnnxSequence(self.session)
        return torch.from_numpy(scratch.step(input_ids.numpy()).astype(np.float32))

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence from the prompt."""
        self.sequence.reset()
        return torch.from_numpy(self.sequence.step(input_ids.numpy())[-1].astype(np.float32))

    def decode(self, token: int) -> torch.Tensor:
        """One token on the kept cache."""
        return torch.from_numpy(self.sequence.step(np.array([token]))[-1].astype(np.float32))

    def parameter_count(self) -> int | None:
        """Elements of the graph's weight initialisers (quantised weights count once, not their scales)."""
        import onnx

        graph = onnx.load(str(self.folder / MODEL_FILE), load_external_data=False).graph
        shape_types = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}  # shape constants, not weights
        return sum(
            int(np.prod(tensor.dims))
            for tensor in graph.initializer
            if tensor.dims
            and tensor.data_type not in shape_types
            and not tensor.name.endswith(("_scale", "_zero_point"))
        )

    def close(self) -> None:
        """Drop the session."""
        self.session = None
        self.sequence = None
