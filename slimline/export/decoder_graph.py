"""The decoder graph every exported artifact shares: one step of a causal LM with its KV cache.

One graph serves prefill (an empty past, ``past`` length 0) and decode (one new token on a
filled past), for any batch: the inputs are ``input_ids [batch, seq]``, ``attention_mask
[batch, past + seq]`` (1 for real tokens, 0 for left padding), ``position_ids [batch, seq]``,
``logit_positions [keep]`` (which fed positions get logits, for every row: a prompt's last only,
so its other positions skip the vocabulary projection) and ``past.<i>.key``/``past.<i>.value
[batch, kv_heads, past, head_dim]`` per layer; the outputs are ``logits [batch, keep, vocab]`` and
``present.<i>.key``/``present.<i>.value`` (past + seq long).
Runtimes (ONNX Runtime, TensorRT) feed the presents back as the next step's past; the names
and shapes live in ``slimline/runtime/layout.py``.

The graph is traced with an explicit attention, not SDPA: the exporter decomposes SDPA into a
scaled ``q @ transpose(k)`` whose key transpose stays a node of its own per layer, and ONNX
Runtime runs that node on two threads several times slower than on one (13 to 46 ms of a 53 to
90 ms 16-row decode pass of SmolLM2-135M on 2 cores). ``q @ k.transpose(2, 3)`` written out is
fused by ONNX Runtime into one ``FusedMatMul`` that reads the key transposed. Families whose
attention is plain ``softmax(q k^T * scaling + mask) v`` (``GROUPED_FAMILIES``) are traced with
``grouped_attention``, which also skips repeating each key/value head for its query heads (the
``Expand`` of grouped-query attention); the others with their own eager attention. Against the
eager graph, on SmolLM2-135M (9 query heads on 3 key/value heads), ONNX Runtime, 2 cores: a
16-row decode pass 30 against 33 ms, 16 rows of two tokens 40.5 against 45 ms, one row alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from slimline.models import cache_keyword
from slimline.runtime.layout import INPUT_NAMES, LOGIT_POSITIONS, CacheLayout

# The attention the graph is traced with, for families whose eager attention is the plain formula
# (no soft-capping, no attention sinks): grouped_attention computes exactly what it does.
GROUPED_ATTENTION = "slimline_grouped"
GROUPED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"})
# Sizes the export traces with; any size >= 2 keeps torch.export from specialising an axis, and
# distinct sizes keep it from tying two axes together.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_KEEP = 2, 3, 4, 5


class DecoderStep(torch.nn.Module):
    """Wraps an HF causal LM so its cache is flat tensors in and out (what ONNX graphs can carry)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.layout = CacheLayout.of(model.config)

    def forward(self, input_ids, attention_mask, position_ids, logit_positions, past):  # noqa: D102 - see the class
        cache = DynamicCache()
        for layer in range(self.layout.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logit_positions,  # transformers keeps these positions of every row
            **{cache_keyword(self.model): cache},
        )
        presents = []
        for layer in cache.layers:  # updated in place with this pass's keys and values
            presents += [layer.keys, layer.values]
        return (output.logits, *presents)


def export_decoder(model: PreTrainedModel, path: Path, opset: int, external_data: bool) -> None:
    """Export one decoder step with dynamic batch, sequence and past axes via torch.export (dynamo)."""
    step = DecoderStep(model).eval()
    layout = step.layout
    batch, seq, past_len = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    logit_positions = torch.randint(0, seq, (EXAMPLE_KEEP,))
    past = [torch.randn(batch, layout.kv_heads, past_len, layout.head_dim) for _ in range(2 * layout.layers)]
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("seq")
    past_dim, total_dim = torch.export.Dim("past"), torch.export.Dim("total")
    dynamic_shapes = (
        {0: batch_dim, 1: seq_dim},
        {0: batch_dim, 1: total_dim},
        {0: batch_dim, 1: seq_dim},
        {0: torch.export.Dim("keep")},
        [{0: batch_dim, 2: past_dim}] * (2 * layout.layers),
    )
    with torch.no_grad(), export_attention(model):
        torch.onnx.export(
            step,
            (input_ids, attention_mask, position_ids, logit_positions, past),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[*INPUT_NAMES, LOGIT_POSITIONS, *layout.past_names()],
            output_names=["logits", *layout.present_names()],
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            external_data=external_data,
            verbose=False,
        )


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention without repeating key/value heads: each one's query heads are stacked as its rows.

    ``query`` [batch, heads, n, dim] against ``key``/``value`` [batch, kv_heads, past, dim]; the
    signature and the mask (additive, from ``eager_mask``) are transformers' attention interface.
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    stacked = query.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    weights = (torch.matmul(stacked, key.transpose(2, 3)) * scaling).reshape(batch, heads, length, -1)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights.reshape(batch, kv_heads, heads // kv_heads * length, -1), value)
    return output.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), weights


AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)


@contextmanager
def export_attention(model: PreTrainedModel) -> Iterator[None]:
    """While the block runs, the model computes attention as the graph should have it (see the module's note)."""
    previous = model.config._attn_implementation
    grouped = model.config.model_type in GROUPED_FAMILIES
    model.set_attn_implementation(GROUPED_ATTENTION if grouped else "eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
