"""TensorRT backend: a serialized FP16 engine of the decoder graph, run on CUDA through torch tensors.

The engine has the decoder graph's inputs and outputs (``slimline/export/decoder_graph.py``);
the cache stays on the GPU between steps. An engine only loads on the GPU model and TensorRT
version it was built for, so the recorded binding is checked first, with a clear error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimline.errors import ArtifactError
from slimline.evaluate.backends.base import Backend
from slimline.evaluate.backends.onnx_backend import cache_order

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32}


class TensorRTBackend(Backend):
    """Scores and times a TensorRT engine, batch size 1."""

    name = "tensorrt"

    def __init__(self, folder: Path) -> None:
        """Check the engine's binding, deserialize it and prepare an execution context."""
        import tensorrt

        from slimline.export.tensorrt import ENGINE_FILE, engine_binding, read_binding

        recorded, here = read_binding(folder), engine_binding(tensorrt, torch)
        for field in ("gpu", "compute_capability", "tensorrt"):
            if recorded[field] != here[field]:
                raise ArtifactError(
                    f"{folder / ENGINE_FILE} was built for {field} {recorded[field]!r}; this machine has "
                    f"{here[field]!r}: rebuild the engine here (re-run the export.tensorrt stage)"
                )
        self.runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((folder / ENGINE_FILE).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {name: self.engine.get_tensor_mode(name) == tensorrt.TensorIOMode.INPUT for name in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.past_names = sorted((n for n in self.inputs if n.startswith("past.")), key=cache_order)
        self.present_names = [n.replace("past.", "present.") for n in self.past_names]
        self.dtypes = {n: TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        kv_shape = self.engine.get_tensor_shape(self.past_names[0])
        self.kv_heads, self.head_dim = kv_shape[1], kv_shape[3]
        self.stream = torch.cuda.Stream()
        self.placeholder = torch.empty(1, device="cuda")  # an address for zero-length tensors
        self.past: list[torch.Tensor] = []
        self.length = 0

    def _reset(self) -> None:
        cache_dtype = self.dtypes[self.past_names[0]]
        empty = torch.empty(1, self.kv_heads, 0, self.head_dim, dtype=cache_dtype, device="cuda")
        self.past = [empty] * len(self.past_names)
        self.length = 0

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the engine on ``tokens`` after the cached ones; keep the presents; return logits [seq, vocab]."""
        seq = tokens.numel()
        feeds = {
            "input_ids": tokens.reshape(1, seq).to("cuda", self.dtypes["input_ids"]),
            "attention_mask": torch.ones(1, self.length + seq, dtype=self.dtypes["attention_mask"], device="cuda"),
            "position_ids": torch.arange(self.length, self.length + seq, device="cuda")
            .reshape(1, seq)
            .to(self.dtypes["position_ids"]),
            **dict(zip(self.past_names, self.past, strict=True)),
        }
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            address = tensor.data_ptr() if tensor.numel() else self.placeholder.data_ptr()
            self.context.set_tensor_address(name, address)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        self.past = [results[name] for name in self.present_names]
        self.length += seq
        return results["logits"][0].float().cpu()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits from an empty cache."""
        self._reset()
        return self._step(input_ids)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence from the prompt."""
        self._reset()
        return self._step(input_ids)[-1]

    def decode(self, token: int) -> torch.Tensor:
        """One token on the cached sequence."""
        return self._step(torch.tensor([token]))[-1]

    def close(self) -> None:
        """Release the engine and its context."""
        self.context = None
        self.engine = None
        self.past = []
