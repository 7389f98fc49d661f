"""TensorRT: a serialized FP16 engine of the decoder graph, run on CUDA through torch tensors.

The engine has the decoder graph's inputs and outputs (``slimline/runtime/layout.py``); each
sequence's cache stays on the GPU between passes. A batched pass pads the rows
(``slimline/runtime/ragged.py``) within the engine profile's batch range. An engine only loads
on the GPU model and TensorRT version it was built for, so the recorded binding is checked
first, with a clear error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimline.errors import ArtifactError
from slimline.runtime.base import Feed, RuntimeModel, check_feeds
from slimline.runtime.checkpoint import folder_context
from slimline.runtime.layout import INPUT_NAMES, LOGIT_POSITIONS, LOGITS, CacheLayout
from slimline.runtime.ragged import DenseSequence, keep_presents, pad_caches, ragged_batch, row_logits

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32}


class TensorRTModel(RuntimeModel):
    """Runs a TensorRT engine built by ``export.tensorrt``."""

    backend = "tensorrt"

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
        self.outputs = [n for n in names if not is_input[n]]
        self.layout = CacheLayout.from_inputs({n: tuple(self.engine.get_tensor_shape(n)) for n in names if is_input[n]})
        self.dtypes = {n: TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        # Engines built from graphs exported before logit_positions return logits for every fed position.
        self.keeps_positions = LOGIT_POSITIONS in names
        self.feed_names = INPUT_NAMES + [LOGIT_POSITIONS] * self.keeps_positions
        # The optimisation profile's largest batch (profile 0, input_ids' max shape).
        self.max_batch = int(self.engine.get_tensor_profile_shape("input_ids", 0)[2][0])
        self.empty_cache = torch.empty(
            1, self.layout.kv_heads, 0, self.layout.head_dim, dtype=self.dtypes["past.0.key"], device="cuda"
        )
        self.stream = torch.cuda.Stream()
        self.placeholder = torch.empty(1, device="cuda")  # an address for zero-length tensors
        self.name = folder.name
        self.context_length = folder_context(folder)

    def new_sequence(self) -> DenseSequence:
        """A sequence with an empty cache."""
        return DenseSequence(self)

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """One engine execution over the padded batch; each row keeps its own part of the presents."""
        check_feeds(feeds, self.context_length)
        if len(feeds) > self.max_batch:
            raise ValueError(f"{len(feeds)} rows exceed the engine profile's batch of {self.max_batch}")
        sequences = [feed.sequence for feed in feeds]
        batch = ragged_batch([s.length for s in sequences], [f.tokens for f in feeds], [f.all_logits for f in feeds])
        inputs = {name: getattr(batch, name).to("cuda", self.dtypes[name]).contiguous() for name in self.feed_names}
        for index, name in enumerate(self.layout.past_names()):
            inputs[name] = pad_caches([s.past[index] for s in sequences], batch.padded_past).contiguous()
        results = self._execute(inputs)
        presents = [results[name] for name in self.layout.present_names()]
        keep_presents(sequences, presents, batch)
        logits = results[LOGITS].float().cpu()
        return [row_logits(logits, batch, row, feed.all_logits, self.keeps_positions) for row, feed in enumerate(feeds)]

    def _execute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind inputs and freshly allocated outputs, run on the stream, wait."""
        for name, tensor in inputs.items():
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
        return results

    def close(self) -> None:
        """Release the engine and its context."""
        self.context = None
        self.engine = None
