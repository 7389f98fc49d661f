"""Post-training int8 quantization of a PyTorch model through torch.ao: dynamic or static (calibrated).

Dynamic: weights are quantized to int8 ahead of time; activations are quantized on the fly from
their own range, by default one scale per token (``torch._int_mm`` int8 GEMM), or one per tensor
through torch.ao's fbgemm/x86 kernels. Per token is the default because real checkpoints have
outlier tokens: on SmolLM2-135M one scale per tensor cost +217% perplexity, one per token +1.8%.
Static: activation ranges are fixed ahead from the calibration split through an observer
(min-max, moving-average min-max, or the histogram observer that minimises the quantization
error), so no range is computed at run time. Weights: per output channel or per tensor,
symmetric or with zero points. (Jacob et al., 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference".)

```yaml
- id: int8
  kind: quantize.ptq
  params: {mode: dynamic}
- id: int8-static
  kind: quantize.ptq
  from: input
  params: {mode: static, observer: histogram, calibration_samples: 32}
```
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from slimline.artifacts import Artifact
from slimline.hardware import cpu_flags, has_vnni, safe_int8_weight_bits
from slimline.models import load_parent_model, stored_dtype
from slimline.quantize import int8
from slimline.quantize.common import (
    QUANTIZED_KEY,
    calibration_windows,
    check_sequence_length,
    check_torch_linear_layers,
    check_unquantized_shape,
)
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec

log = logging.getLogger(__name__)

SPEC = StageSpec(kind="quantize.ptq", requires=(), extra=None, device="cpu", data=("calibration",))
FORMAT = "torch-int8"


class Params(StageParams):
    """Which int8 scheme, and how static ranges are calibrated."""

    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="dynamic measures each activation's range at run time (robust); static fixes ranges from calibration (no run-time range pass).",
    )
    activations: Literal["per_token", "per_tensor"] = Field(
        "per_token",
        description="Dynamic only: one activation scale per token (robust to the outlier tokens of real checkpoints; "
        "int8 GEMM through torch._int_mm, symmetric weights only) or one per tensor (torch.ao/fbgemm; an outlier "
        "token costs every other token its resolution).",
    )
    weight_granularity: Literal["per_channel", "per_tensor"] = Field(
        "per_channel", description="One weight scale per output channel (accurate) or per layer."
    )
    weight_symmetric: bool = Field(
        True, description="Symmetric weight grid (zero point 0), or asymmetric with zero points."
    )
    weight_bits: Literal[8, 4] = Field(
        8,
        description="8, or 4: weights on the int4 grid (-8..7) in int8 storage and kernels; less accurate, no smaller; the scheme quantize.qat trains for.",
    )
    include_lm_head: bool = Field(
        True,
        description="Also quantize the LM head (the largest layer of a small model; speed against a little accuracy).",
    )
    observer: Literal["minmax", "moving_average", "histogram"] = Field(
        "histogram",
        description="Static only: activation range from the calibration min/max, its moving average, or the histogram that minimises quantization error (clips outliers).",
    )
    activation_symmetric: bool = Field(
        False, description="Static only: symmetric activation grid; asymmetric suits one-sided activations better."
    )
    calibration_samples: int = Field(32, ge=1, description="Static only: calibration windows from data.calibration.")
    calibration_length: int = Field(256, ge=16, description="Static only: tokens per calibration window.")

    @model_validator(mode="after")
    def check_static_only_fields(self) -> Params:
        """Calibration settings mean nothing to dynamic quantization; refuse them rather than ignore them."""
        static_only = {"observer", "activation_symmetric", "calibration_samples", "calibration_length"}
        given = sorted(static_only & self.model_fields_set)
        if self.mode == "dynamic" and given:
            raise ValueError(f"{given} apply to mode 'static' only; drop them or set mode: static")
        if self.mode == "static" and "activations" in self.model_fields_set:
            raise ValueError("activations applies to mode 'dynamic' only (static ranges are per tensor); drop it")
        if self.mode == "dynamic" and self.activations == "per_token" and not self.weight_symmetric:
            raise ValueError(
                "per-token activations run a symmetric int8 kernel: set weight_symmetric: true, "
                "or activations: per_tensor for zero-point weights"
            )
        return self

    @property
    def per_token(self) -> bool:
        """True when activations are quantized per token at run time."""
        return self.mode == "dynamic" and self.activations == "per_token"


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """The input must be full precision; static calibration windows must fit the context."""
    problems = check_unquantized_shape(SPEC.kind, shape) + check_torch_linear_layers(SPEC.kind, shape)
    if params.mode == "static":
        problems += check_sequence_length("calibration_length", params.calibration_length, shape)
    return problems, shape.changed(**{QUANTIZED_KEY: {"quant_method": f"torch.ao int8 {params.mode}"}})


def quantize_model(model: torch.nn.Module, params: Params, ctx: StageContext) -> list[str]:
    """Quantize the model's linear layers in place; return their names."""
    names = int8.quantizable_linears(model, params.include_lm_head)
    granularity, symmetric, bits = params.weight_granularity, params.weight_symmetric, params.weight_bits
    if params.per_token:
        int8.quantize_per_token_layers(model, names, granularity, min(bits, safe_int8_weight_bits()))
        return names
    if params.mode == "dynamic":
        int8.quantize_dynamic_layers(model, names, int8.dynamic_qconfig(granularity, symmetric, bits))
        return names
    qconfig = int8.static_qconfig(granularity, symmetric, params.observer, params.activation_symmetric, bits)
    int8.prepare_static_layers(model, names, qconfig)
    windows = calibration_windows(ctx, params.calibration_samples, params.calibration_length)
    with ctx.progress.task(f"{ctx.stage_id}: calibrating", len(windows)) as advance:
        int8.calibrate(model, windows, advance)
    int8.convert_static_layers(model)
    return names


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Load the parent in float32, quantize its linear layers to int8, save tensors and recipe."""
    parent = inputs[0]
    model = load_parent_model(parent, SPEC.kind)
    names = quantize_model(model, params, ctx)
    recipe = {
        "mode": params.mode,
        "activations": "per_token" if params.per_token else "per_tensor",
        "engine": "torch._int_mm" if params.per_token else torch.backends.quantized.engine,
        "storage_dtype": str(stored_dtype(parent.model_path)).removeprefix("torch."),
        "params": params.model_dump(mode="json"),
    }
    int8.save_int8_model(model, names, ctx.work_dir, recipe)
    log.info("%s: %d linear layers quantized to int8 (%s)", ctx.stage_id, len(names), params.mode)
    metrics = {"mode": params.mode, "activations": recipe["activations"], "kernel": recipe["engine"]}
    if params.per_token:
        metrics["stored_weight_bits"] = min(params.weight_bits, safe_int8_weight_bits())
        metrics["cpu_vnni"] = has_vnni(cpu_flags())
    return StageOutput(format=FORMAT, metrics=metrics | {"quantized_layers": len(names)})
