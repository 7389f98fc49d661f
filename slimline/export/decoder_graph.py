"""The decoder graph every exported artifact shares: one step of a causal LM with its KV cache.

One graph serves prefill (an empty past, ``past`` length 0) and decode (one new token on a
filled past), for any batch: the inputs are ``input_ids [batch, seq]``, ``attention_mask
[batch, past + seq]`` (1 for real tokens, 0 for left padding), ``position_ids [batch, seq]`` and
``past.<i>.key``/``past.<i>.value [batch, kv_heads, past, head_dim]`` per layer; the outputs are
``logits [batch, seq, vocab]`` and ``present.<i>.key``/``present.<i>.value`` (past + seq long).
Runtimes (ONNX Runtime, TensorRT) feed the presents back as the next step's past; the names
and shapes live in ``slimline/runtime/layout.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from slimline.runtime.layout import INPUT_NAMES, CacheLayout

# Sizes the export traces with; any size >= 2 keeps torch.export from specialising an axis.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


class DecoderStep(torch.nn.Module):
    """Wraps an HF causal LM so its cache is flat tensors in and out (what ONNX graphs can carry)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.layout = CacheLayout.of(model.config)

    def forward(self, input_ids, attention_mask, position_ids, past):  # noqa: D102 - see the class
        cache = DynamicCache()
        for layer in range(self.layout.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = []
        for layer in output.past_key_values.layers:
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
    past = [torch.randn(batch, layout.kv_heads, past_len, layout.head_dim) for _ in range(2 * layout.layers)]
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("seq")
    past_dim, total_dim = torch.export.Dim("past"), torch.export.Dim("total")
    dynamic_shapes = (
        {0: batch_dim, 1: seq_dim},
        {0: batch_dim, 1: total_dim},
        {0: batch_dim, 1: seq_dim},
        [{0: batch_dim, 2: past_dim}] * (2 * layout.layers),
    )
    with torch.no_grad():
        torch.onnx.export(
            step,
            (input_ids, attention_mask, position_ids, past),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=INPUT_NAMES + layout.past_names(),
            output_names=["logits", *layout.present_names()],
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            external_data=external_data,
            verbose=False,
        )
