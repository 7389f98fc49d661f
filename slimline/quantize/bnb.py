"""bitsandbytes quantization: LLM.int8() or 4-bit NF4/FP4 weights, saved as a reloadable HF checkpoint.

int8 is LLM.int8() (Dettmers et al., 2022): row-wise int8 weights, with input columns whose
magnitude passes ``int8_threshold`` multiplied in 16 bits. NF4/FP4 (Dettmers et al., 2023,
"QLoRA") store 4-bit weights in blocks of 64 with one absmax each; double quantization stores
those absmax values in 8 bits too. The LM head stays in full precision (bitsandbytes' default).
transformers saves the quantized state to safetensors and reloads it from ``config.json``'s
``quantization_config``.

```yaml
- id: nf4
  kind: quantize.bnb
  params: {mode: nf4, double_quant: true}
```
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from slimline.artifacts import Artifact
from slimline.errors import StageError
from slimline.models import linear_layer_names, load_parent_model
from slimline.quantize.common import QUANTIZED_KEY, check_unquantized_shape, ffn_width
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec

log = logging.getLogger(__name__)

SPEC = StageSpec(kind="quantize.bnb", requires=("bitsandbytes",), extra="quant", device="cpu", data=())
# Output rows bitsandbytes packs together for its 4-bit CPU kernel (AVX512-BF16 machines).
CPU_4BIT_BLOCK = 32


class Params(StageParams):
    """Which bitsandbytes scheme."""

    mode: Literal["int8", "nf4", "fp4"] = Field(
        "nf4", description="int8 (LLM.int8()), or 4-bit NF4 (suits normally distributed weights) or FP4."
    )
    double_quant: bool = Field(
        True, description="4-bit only: quantize the per-block scales too (about 0.4 bits per weight less)."
    )
    int8_threshold: float = Field(
        6.0, gt=0, description="int8 only: inputs above this magnitude go through a 16-bit path (outlier columns)."
    )

    @model_validator(mode="after")
    def check_mode_fields(self) -> Params:
        """Settings of the other mode are refused rather than ignored."""
        if self.mode == "int8" and "double_quant" in self.model_fields_set:
            raise ValueError("double_quant applies to the 4-bit modes (nf4, fp4); mode is int8")
        if self.mode != "int8" and "int8_threshold" in self.model_fields_set:
            raise ValueError(f"int8_threshold applies to mode int8; mode is {self.mode}")
        return self


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """The input must be full precision; 4-bit layers' output widths must suit the CPU kernel's packing."""
    quantized = {"quant_method": "bitsandbytes", "mode": params.mode}
    problems = check_unquantized_shape(SPEC.kind, shape)
    if params.mode != "int8":
        problems += check_4bit_widths(shape)
    return problems, shape.changed(**{QUANTIZED_KEY: quantized})


def check_4bit_widths(shape: ModelShape) -> ShapeProblems:
    """Bitsandbytes' 4-bit CPU kernel (AVX512-BF16) packs output rows in blocks of 32: every width must divide."""
    widths = output_widths(shape)
    bad = {name: width for name, width in widths.items() if width % CPU_4BIT_BLOCK}
    if bad:
        message = (
            f"{shape.architecture}: bitsandbytes' 4-bit CPU kernel packs output rows in blocks of {CPU_4BIT_BLOCK} "
            f"and this model's {bad} are not multiples of {CPU_4BIT_BLOCK}; use mode: int8"
        )
        return [(("mode",), message)]
    return []


def output_widths(shape: ModelShape) -> dict[str, int]:
    """Output widths of the decoder's linear layers: hidden, FFN, query heads and key/value heads."""
    hidden, heads = shape.setting("hidden_size"), shape.setting("num_attention_heads")
    widths = {"hidden_size": hidden, "intermediate_size": ffn_width(shape)}
    if isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = shape.setting("head_dim") or hidden // heads
        widths["query width"] = heads * head_dim
        widths["key/value width"] = shape.setting("num_key_value_heads", heads) * head_dim
    return {name: width for name, width in widths.items() if isinstance(width, int)}


def bnb_config(params: Params) -> Any:
    """The transformers BitsAndBytesConfig for these params (float32 compute on the CPU)."""
    from transformers import BitsAndBytesConfig

    if params.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=params.int8_threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=params.mode,
        bnb_4bit_use_double_quant=params.double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )


def count_quantized(model: torch.nn.Module) -> int:
    """Linear layers that bitsandbytes replaced."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit) for m in model.modules())


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Quantize on load through transformers, save the quantized state, check it was quantized."""
    parent = inputs[0]
    model = load_parent_model(parent, SPEC.kind, quantization_config=bnb_config(params))
    quantized = count_quantized(model)
    if quantized == 0:
        raise StageError(
            f"bitsandbytes replaced none of this model's linear layers {sorted(linear_layer_names(model))}"
        )
    model.save_pretrained(ctx.work_dir, safe_serialization=True)
    log.info("%s: %d linear layers in bitsandbytes %s", ctx.stage_id, quantized, params.mode)
    return StageOutput(format="hf", metrics={"mode": params.mode, "quantized_layers": quantized})
