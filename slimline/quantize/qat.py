"""Quantization-aware training through torchao, converted to the same int8 artifact as ``quantize.ptq``.

torchao's QAT (prepare -> train -> convert) replaces every quantized linear layer by a
``FakeQuantizedLinear`` that rounds its weights (int8 or int4 grid, per output channel) and its
input activations (int8, asymmetric, per token) in the forward pass and lets gradients pass
straight through the rounding (Jacob et al., 2018; Bengio et al., 2013). The model is then
fine-tuned on ``data.train`` so it learns weights that survive rounding. ``convert`` restores
plain linear layers holding the trained weights, which are quantized exactly as
``quantize.ptq`` with ``mode: dynamic`` and the same ``weight_bits``/granularity/symmetry would
quantize them (torch.ao int8 kernels, format ``torch-int8``); so QAT and PTQ of the same
checkpoint compare on the same scheme, kernel and yardstick.

```yaml
- id: qat-w4
  kind: quantize.qat
  params: {weight_bits: 4, steps: 100, learning_rate: 0.00002}
```
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from slimline.artifacts import Artifact
from slimline.distributed import fit
from slimline.hardware import Precision
from slimline.models import load_parent_model, stored_dtype
from slimline.quantize import int8
from slimline.quantize.common import (
    QUANTIZED_KEY,
    check_sequence_length,
    check_torch_linear_layers,
    check_unquantized_shape,
)
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec
from slimline.training import Training, TrainSettings, causal_lm_loss

log = logging.getLogger(__name__)

# Trains where the stage runs; its int8 layers (torch.ao) are made and stored on the CPU.
SPEC = StageSpec(kind="quantize.qat", requires=("torchao",), extra="quant", device="any", data=("train",))
FORMAT = "torch-int8"
# Where Params keeps its training settings (a ``launch:`` block trains under torchrun: slimline/distributed.py).
TRAIN_SETTINGS: tuple[str, ...] = ()


class Params(StageParams, TrainSettings):
    """The target scheme (as quantize.ptq dynamic) and the fine-tuning settings."""

    weight_bits: Literal[8, 4] = Field(
        4, description="Weight grid trained for: int8, or int4 (-8..7) where QAT recovers the most."
    )
    weight_granularity: Literal["per_channel", "per_tensor"] = Field(
        "per_channel", description="One weight scale per output channel (accurate) or per layer."
    )
    weight_symmetric: bool = Field(
        True, description="Symmetric weight grid (zero point 0); the per-token int8 kernel it converts to needs it."
    )
    include_lm_head: bool = Field(
        True, description="Also quantize (and train for) the LM head, as quantize.ptq does by default."
    )
    steps: int = Field(100, ge=1, description="Optimizer steps with fake quantization.")
    learning_rate: float = Field(
        2e-5, gt=0, description="Peak learning rate; low, since the model is already trained and only adapts."
    )
    precision: Precision = Field(
        "fp32",
        description="fp32 keeps the fake-quantization arithmetic exact; auto takes bf16 autocast where the hardware "
        "runs it natively (faster, less exact); bf16 forces it.",
    )

    @model_validator(mode="after")
    def check_symmetric(self) -> Params:
        """The converted artifact runs per-token int8 activations against symmetric weights only."""
        if not self.weight_symmetric:
            raise ValueError(
                "weight_symmetric: false has no int8 kernel here (per-token activations need symmetric weights)"
            )
        return self


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """The input must be full precision; training windows must fit the context."""
    problems = check_unquantized_shape(SPEC.kind, shape) + check_torch_linear_layers(SPEC.kind, shape)
    problems += check_sequence_length("sequence_length", params.sequence_length, shape)
    return problems, shape.changed(**{QUANTIZED_KEY: {"quant_method": "torch.ao int8 dynamic (qat)"}})


def fake_quantize_configs(params: Params) -> tuple[Any, Any]:
    """The torchao fake-quantization configs of the activations and weights."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    # per-token asymmetric: the activation scheme of the int8 artifact it converts to (int8.PerTokenInt8Linear)
    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight_dtype = torch.int8 if params.weight_bits == 8 else torch.int4
    granularity = "per_channel" if params.weight_granularity == "per_channel" else "per_tensor"
    weight = IntxFakeQuantizeConfig(weight_dtype, granularity, is_symmetric=params.weight_symmetric)
    return activation, weight


def prepare(model: torch.nn.Module, names: list[str], params: Params) -> None:
    """Swap the named linear layers for torchao's fake-quantized linears."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    activation, weight = fake_quantize_configs(params)
    chosen = set(names)
    quantize_(
        model,
        QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
        filter_fn=lambda module, fqn: fqn in chosen,
    )


def convert(model: torch.nn.Module) -> None:
    """Turn torchao's fake-quantized linears back into plain linears holding the trained weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))


def build_training(params: Params, inputs: list[Artifact], prepared: Path | None = None) -> Training:
    """The parent with fake-quantized linears, and its loss: as ``run`` builds it, and every launched rank."""
    model = load_parent_model(inputs[0], SPEC.kind)
    names = int8.quantizable_linears(model, params.include_lm_head)
    if params.include_lm_head and model.config.tie_word_embeddings:
        # the LM head gets its own trainable copy: fake-quantizing it must not round the input embeddings
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    prepare(model, names, params)
    return Training(model, params, causal_lm_loss)


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Prepare, fine-tune with fake quantization, convert, then quantize to the int8 artifact."""
    parent = inputs[0]
    training, losses = fit(SPEC.kind, params, inputs, ctx, lambda: build_training(params, inputs))
    model = training.model.to("cpu")  # the int8 layers are CPU kernels
    names = int8.quantizable_linears(model, params.include_lm_head)  # torchao's fake-quantized linears are Linears
    convert(model)
    int8.quantize_per_token_layers(model, names, params.weight_granularity, params.weight_bits)
    recipe = {
        "mode": "dynamic",
        "activations": "per_token",
        "engine": "torch._int_mm",
        "storage_dtype": str(stored_dtype(parent.model_path)).removeprefix("torch."),
        "params": params.model_dump(mode="json"),
    }
    int8.save_int8_model(model, names, ctx.work_dir, recipe)
    log.info("%s: %d layers trained for int%d weights, saved as int8", ctx.stage_id, len(names), params.weight_bits)
    return StageOutput(
        format=FORMAT,
        metrics={
            "weight_bits": params.weight_bits,
            "quantized_layers": len(names),
            "loss_curve": losses,
            "final_loss": math.fsum(losses[-10:]) / len(losses[-10:]),
        },
    )
