"""ONNX Runtime: the exported decoder graph (``slimline/export/decoder_graph.py``) with its KV cache.

The provider is chosen by what is there: CUDA when onnxruntime-gpu sees a GPU, else the CPU.
Inputs and outputs stay float32 on the host (an FP16 graph keeps float32 I/O), so the same code
runs every precision. A batched pass feeds the graph's batch axis: rows are padded
(``slimline/runtime/ragged.py``) and each row keeps its own part of the presents.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from slimline.runtime.base import Feed, RuntimeModel, check_feeds
from slimline.runtime.checkpoint import folder_context
from slimline.runtime.layout import LOGIT_POSITIONS, LOGITS, CacheLayout
from slimline.runtime.ragged import DenseSequence, KeptBatch, kept_batch_inputs, row_logits

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# Hole columns (padding, dropped proposals) a kept batch may carry before its rows are padded afresh.
SPARE_COLUMNS = 32


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

    ``spinning=False`` stops idle worker threads from busy-waiting. In a speculative pair the draft
    takes it and the target does not: a pass of the target runs some 1,800 small graph nodes, and
    waking a sleeping worker for each one left a fifth of the cores idle, while the target's
    spinning threads slow the draft's short passes less than that gains. Measured on SmolLM2-135M
    drafted by its 42M student, ONNX Runtime, 2 cores, engine in-process, greedy: one request at a
    time 76-79 tok/s with the target spinning against 63-69 with neither and 69 with both; 16
    requests batched 307-321 against 252-284 and 281-287.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=providers or choose_providers())


def session_layout(session) -> tuple[CacheLayout, type]:
    """The cache layout of a session's graph and the numpy dtype its cache is kept in."""
    inputs = {i.name: i for i in session.get_inputs()}
    layout = CacheLayout.from_inputs({name: tuple(i.shape) for name, i in inputs.items()})
    dtype = np.float16 if "float16" in inputs["past.0.key"].type else np.float32
    return layout, dtype


class OnnxModel(RuntimeModel):
    """An ``export.onnx`` artifact run by ONNX Runtime (CUDA provider where available, else CPU)."""

    backend = "onnxruntime"

    def __init__(
        self,
        folder: Path,
        provider: str = "auto",
        spinning: bool = True,
        graph: Path | None = None,
        context_length: int | None = None,
    ) -> None:
        """Open ``folder/model.onnx`` (or ``graph``) on the best available provider.

        Pass ``spinning=False`` when another model shares the cores turn by turn (a speculative
        pair). ``context_length`` defaults to the folder's ``config.json``.
        """
        self.folder = folder
        self.graph = graph or folder / MODEL_FILE
        self.session = open_session(self.graph, choose_providers(provider), spinning=spinning)
        self.providers = self.session.get_providers()
        self.layout, self.cache_dtype = session_layout(self.session)
        # Graphs exported before logit_positions return logits for every fed position.
        self.keeps_positions = LOGIT_POSITIONS in {i.name for i in self.session.get_inputs()}
        empty = np.zeros((1, self.layout.kv_heads, 0, self.layout.head_dim), dtype=self.cache_dtype)
        self.empty_cache = torch.from_numpy(empty)
        self.name = folder.name
        self.kept: KeptBatch | None = None  # the last pass's rows and caches
        self.context_length = context_length or folder_context(folder)
        log.info("onnxruntime providers: %s", self.providers)

    def new_sequence(self) -> DenseSequence:
        """A sequence with an empty cache."""
        return DenseSequence(self)

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """One graph run over the padded batch; the presents are kept whole for a next pass over the same rows."""
        check_feeds(feeds, self.context_length)
        sequences = [feed.sequence for feed in feeds]
        kept = self.kept if self.kept is not None and self.kept.holds(sequences) else None
        if kept is None:
            self.dissolve_kept()
        all_logits = [feed.all_logits for feed in feeds]
        batch, caches, valid = kept_batch_inputs(sequences, [feed.tokens for feed in feeds], kept, all_logits)
        inputs = {
            "input_ids": batch.input_ids.numpy(),
            "attention_mask": valid.astype(np.int64),
            "position_ids": batch.position_ids.numpy(),
        }
        if self.keeps_positions:
            inputs[LOGIT_POSITIONS] = batch.logit_positions.numpy()
        inputs.update(zip(self.layout.past_names(), caches, strict=True))
        outputs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, inputs), strict=True))
        self.kept = KeptBatch(list(sequences), [outputs[name] for name in self.layout.present_names()], valid)
        for row, feed in enumerate(feeds):
            feed.sequence.kept, feed.sequence.row = self.kept, row
            feed.sequence.length += len(feed.tokens)
        if self.kept.spare_columns > max(SPARE_COLUMNS, self.kept.valid.shape[1] // 4):
            self.dissolve_kept()  # the next pass pads the rows afresh, without the holes
        logits = torch.from_numpy(outputs[LOGITS])
        return [row_logits(logits, batch, row, feed.all_logits, self.keeps_positions) for row, feed in enumerate(feeds)]

    def dissolve_kept(self) -> None:
        """Hand the rows of the last pass their own caches (before a pass over other rows)."""
        if self.kept is not None:
            self.kept.dissolve()
            self.kept = None

    def parameter_count(self) -> int | None:
        """Elements of the graph's weight initialisers (quantised weights count once, not their scales)."""
        import onnx

        graph = onnx.load(str(self.graph), load_external_data=False).graph
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
        self.dissolve_kept()
        self.session = None
