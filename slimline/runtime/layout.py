"""The decoder graph's feed names and cache shapes, in one place (ONNX export, ONNX Runtime, TensorRT).

An exported decoder step (``slimline/export/decoder_graph.py``) takes ``input_ids [batch, seq]``,
``attention_mask [batch, past + seq]`` (1 for a real token, 0 for padding), ``position_ids
[batch, seq]``, ``logit_positions [keep]`` (which of the fed positions get logits) and
``past.<i>.key``/``past.<i>.value [batch, kv_heads, past, head_dim]`` per layer; it returns
``logits [batch, keep, vocab]`` and ``present.<i>.key``/``present.<i>.value``. Graphs exported
before ``logit_positions`` existed return ``logits [batch, seq, vocab]``; runtimes feed the input
only where a graph has it (``LOGIT_POSITIONS``).
"""

from __future__ import annotations

from dataclasses import dataclass

INPUT_NAMES = ["input_ids", "attention_mask", "position_ids"]
# The positions of the fed tokens whose logits a pass returns (the same for every row): a prompt's
# pass needs only its last (the vocabulary projection of every other position and its output are wasted work).
LOGIT_POSITIONS = "logit_positions"
LOGITS = "logits"


@dataclass(frozen=True)
class CacheLayout:
    """Shape of one layer's cached keys/values: [batch, kv_heads, length, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> CacheLayout:
        """Read the layout from an HF config."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    @classmethod
    def from_inputs(cls, shapes: dict[str, tuple]) -> CacheLayout:
        """Read the layout from a graph's (or engine's) input shapes by name."""
        layers = sum(1 for name in shapes if name.startswith("past.") and name.endswith(".key"))
        first = shapes["past.0.key"]
        return cls(layers, int(first[1]), int(first[3]))

    def past_names(self) -> list[str]:
        """Input names of the cache, layer by layer, key then value."""
        return [f"past.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        """Output names of the updated cache, in the same order."""
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
