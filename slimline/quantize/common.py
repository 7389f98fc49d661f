"""What the quantization stages share: refusing already-quantized inputs, calibration windows, group-size checks."""

from __future__ import annotations

import torch

from slimline.data import sample_windows
from slimline.stage import ModelShape, ShapeProblems, StageContext

# Config key a quantization stage sets on the shape it hands on, so a second quantization is refused at validation.
QUANTIZED_KEY = "quantization_config"


def check_unquantized_shape(kind: str, shape: ModelShape) -> ShapeProblems:
    """Quantization stages read a full-precision model; one whose config has a ``quantization_config`` is refused.

    Checked on the predicted shape at validation and on the real parent's config before ``run``.
    """
    if QUANTIZED_KEY in shape.config:
        method = shape.config[QUANTIZED_KEY].get("quant_method", "unknown")
        return [((), f"{kind} needs a full-precision input; this stage's input is already quantized ({method})")]
    return []


def check_sequence_length(field: str, length: int, shape: ModelShape) -> ShapeProblems:
    """Calibration or training sequences must fit the model's context."""
    context = shape.setting("max_position_embeddings")
    if isinstance(context, int) and length > context:
        return [((field,), f"{length} tokens exceed the model's context of {context}")]
    return []


def input_widths(shape: ModelShape) -> dict[str, int]:
    """Input widths of the model's linear layers: hidden size, attention output (heads x head size) and FFN width."""
    hidden, heads = shape.setting("hidden_size"), shape.setting("num_attention_heads")
    widths = {"hidden_size": hidden, "intermediate_size": ffn_width(shape)}
    if isinstance(hidden, int) and isinstance(heads, int) and heads:
        widths["attention width"] = heads * (shape.setting("head_dim") or hidden // heads)
    return {name: width for name, width in widths.items() if isinstance(width, int)}


def ffn_width(shape: ModelShape) -> int | None:
    """The FFN's inner width: ``intermediate_size``, or GPT-2's ``n_inner`` (4 x hidden when unset)."""
    width = shape.setting("intermediate_size")
    if width is None and "n_inner" in shape.config:
        hidden = shape.setting("hidden_size")
        width = shape.config["n_inner"] or (4 * hidden if isinstance(hidden, int) else None)
    return width


def check_group_size(group_size: int, shape: ModelShape) -> ShapeProblems:
    """A quantization group must divide every linear layer's input width (hidden, attention and FFN widths)."""
    bad = {name: width for name, width in input_widths(shape).items() if width % group_size}
    if bad:
        return [(("group_size",), f"{group_size} does not divide the model's {bad}; pick a divisor of every width")]
    return []


def check_torch_linear_layers(kind: str, shape: ModelShape) -> ShapeProblems:
    """torch.ao's int8 path quantizes ``torch.nn.Linear`` layers; refuse models whose projections are Conv1D."""
    if shape.conv1d_names:
        return [
            (
                (),
                f"{shape.architecture} is not supported: {kind} quantizes torch.nn.Linear layers and this model's "
                f"projections {sorted(shape.conv1d_names)} are transformers Conv1D layers",
            )
        ]
    return []


# Config keys llama.cpp's converter reads for a model_type that transformers 5's config object may not
# hold (the converter reads the config through AutoConfig(...).to_dict()): key -> what to do about it.
GGUF_CONVERTER_KEYS = {
    "gpt2": ("n_ctx", 'add "n_ctx" (the context length) to its config.json'),
    "gpt_neox": ("rotary_pct", "transformers 5 folds it into rope_parameters, so no GPT-NeoX checkpoint converts"),
}


def check_gguf_converter_keys(shape: ModelShape) -> ShapeProblems:
    """Refuse families whose config lacks a key llama.cpp's converter reads (it would fail with a KeyError)."""
    if shape.model_type not in GGUF_CONVERTER_KEYS:
        return []
    key, remedy = GGUF_CONVERTER_KEYS[shape.model_type]
    if key in shape.config:
        return []
    message = f"{shape.architecture} is not supported here: llama.cpp's converter reads {key!r} from the config, which this checkpoint's config lacks; {remedy}"
    return [((), message)]


def calibration_windows(ctx: StageContext, count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens from the calibration split, drawn with the run's seed."""
    return sample_windows(ctx.data.stream("calibration"), count, length, torch.Generator().manual_seed(ctx.seed))
