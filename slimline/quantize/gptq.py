"""Weight-only 4- and 3-bit quantization through gptqmodel: GPTQ, and its round-to-nearest baseline.

GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") quantizes each linear layer column by column and corrects the
columns not yet quantized with the inverse Hessian of the layer's inputs, collected on
calibration windows. ``method: rtn`` rounds every weight to the nearest grid point of the same
bits, group size and symmetry, through gptqmodel's own weight-only path, and is saved in the
same GPTQ checkpoint format and evaluated through the same kernel, so the two differ only in
how the integer weights were chosen: GPTQ's benefit is measured, not assumed.

```yaml
- id: int4
  kind: quantize.gptq
  params: {bits: 4, group_size: 128, calibration_samples: 128}
- id: int4-rtn
  kind: quantize.gptq
  from: input
  params: {method: rtn, bits: 4, group_size: 128}
```
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from slimline.artifacts import Artifact, require_full_model
from slimline.errors import StageError
from slimline.models import TOKENIZER_FILES, stored_dtype
from slimline.quantize.common import (
    QUANTIZED_KEY,
    calibration_windows,
    check_group_size,
    check_sequence_length,
    check_unquantized_shape,
)
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec

log = logging.getLogger(__name__)

SPEC = StageSpec(
    kind="quantize.gptq", requires=("gptqmodel", "optimum"), extra="quant", device="cpu", data=("calibration",)
)
# gptqmodel files that only describe its run; they are kept out of the artifact.
RUN_LOG = "quant_log.csv"
GENERATION_CONFIG = "generation_config.json"
# Families whose GPTQ checkpoints gptqmodel writes but that cannot be loaded back and run (measured with
# transformers 5.24, optimum 2, gptqmodel 7.6 on CPU): refused at validation, by model_type.
UNSUPPORTED = {
    "gpt2": "loading its GPTQ checkpoint fails in transformers' GPT-2 weight initialisation, which reads "
    "`.weight` of gptqmodel's TorchAtenLinear (it has none), so the artifact cannot be evaluated",
    "phi3": "gptqmodel saves the fused gate_up_proj as separate gate_proj/up_proj tensors, which transformers' "
    "Phi-3 does not load (its gate_up_proj stays uninitialised), so the artifact cannot be evaluated",
}


class Params(StageParams):
    """Bits, grouping and calibration of the weight quantization."""

    method: Literal["gptq", "rtn"] = Field(
        "gptq",
        description="gptq corrects rounding error with calibration data; rtn rounds to nearest (the baseline, no data).",
    )
    bits: Literal[3, 4] = Field(4, description="Bits per weight; 3 bits is smaller and loses more than 4.")
    group_size: Literal[32, 64, 128, 256] = Field(
        128,
        description="Weights sharing one scale; smaller groups track outliers better and cost size. Must divide every layer width.",
    )
    sym: bool = Field(True, description="Symmetric grid (no zero point); asymmetric fits skewed groups better.")
    act_order: bool = Field(
        False,
        description="GPTQ only: quantize columns in order of decreasing activation size (desc_act); often better at 3 bits, slower kernels.",
    )
    calibration_samples: int = Field(
        128, ge=1, description="GPTQ only: calibration windows from data.calibration; more gives a better Hessian."
    )
    calibration_length: int = Field(256, ge=16, description="GPTQ only: tokens per calibration window.")
    damp_percent: float = Field(
        0.05, gt=0, lt=1, description="GPTQ only: Hessian dampening, as a fraction of its mean diagonal."
    )
    batch_size: int = Field(8, ge=1, description="Calibration windows per forward pass (memory against speed).")

    @model_validator(mode="after")
    def check_rtn_options(self) -> Params:
        """Round-to-nearest uses no activations, so act_order means nothing there."""
        if self.method == "rtn" and self.act_order:
            raise ValueError("act_order orders columns by calibration activations; method 'rtn' uses none: drop one")
        return self


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """Groups must divide every width; calibration windows must fit; the input must be full precision."""
    problems = check_unquantized_shape(SPEC.kind, shape) + check_group_size(params.group_size, shape)
    if shape.model_type in UNSUPPORTED:
        problems.append(((), f"{shape.architecture} is not supported: {UNSUPPORTED[shape.model_type]}"))
    problems += check_sequence_length("calibration_length", params.calibration_length, shape)
    quantized = {"quant_method": "gptq", "bits": params.bits, "group_size": params.group_size}
    return problems, shape.changed(**{QUANTIZED_KEY: quantized})


def gptq_config(params: Params) -> Any:
    """The gptqmodel QuantizeConfig for these params (an RTNConfig for ``method: rtn``)."""
    from gptqmodel import QuantizeConfig

    options: dict[str, Any] = {
        "bits": params.bits,
        "group_size": params.group_size,
        "sym": params.sym,
        "desc_act": params.act_order,
        "offload_to_disk": False,
    }
    if params.method == "rtn":
        return QuantizeConfig(**options, weight_only={"method": "rtn"})
    # fallback=None: a module GPTQ cannot calibrate fails instead of silently becoming round-to-nearest.
    return QuantizeConfig(
        **options, damp_percent=params.damp_percent, act_group_aware=not params.act_order, fallback=None
    )


def calibration_set(params: Params, ctx: StageContext) -> list[dict[str, torch.Tensor]] | None:
    """Calibration windows as gptqmodel takes them; none for round-to-nearest."""
    if params.method == "rtn":
        return None
    windows = calibration_windows(ctx, params.calibration_samples, params.calibration_length)
    return [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]


def layer_losses(folder: Path) -> dict[str, float]:
    """GPTQ's per-module reconstruction loss from gptqmodel's run log (empty for rtn)."""
    path = folder / RUN_LOG
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # rows read "0.0001" for GPTQ and "rtn: 0.0016" for round-to-nearest
    return {f"{r['layer']}.{r['module']}": float(r["loss"].rsplit(":", 1)[-1]) for r in rows if r.get("loss")}


def keep_parent_side_files(folder: Path, parent: Path) -> None:
    """Drop the tokenizer and generation files gptqmodel rewrote (it sets do_sample: true); keep the parent's.

    The runner then copies the parent's tokenizer files forward, as for every other stage.
    """
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        (folder / name).unlink(missing_ok=True)
    if (parent / GENERATION_CONFIG).exists():
        shutil.copy2(parent / GENERATION_CONFIG, folder / GENERATION_CONFIG)


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Load the parent in its storage dtype, quantize its decoder linears, save the GPTQ checkpoint."""
    parent = inputs[0]
    require_full_model(parent, SPEC.kind)
    # gptqmodel's CPU pool defaults to (cores + 1) // 2 workers and refuses fewer than 2.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    from gptqmodel import GPTQModel

    config = gptq_config(params)
    model = GPTQModel.load(str(parent.model_path), config, dtype=stored_dtype(parent.model_path))
    calibration = calibration_set(params, ctx)
    with ctx.progress.task(f"{ctx.stage_id}: {params.method} {params.bits}-bit", 1) as advance:
        model.quantize(calibration, batch_size=params.batch_size)
        advance(1)
    model.save(str(ctx.work_dir))
    keep_parent_side_files(ctx.work_dir, parent.model_path)
    losses = layer_losses(ctx.work_dir)
    (ctx.work_dir / RUN_LOG).unlink(missing_ok=True)
    if not any(ctx.work_dir.glob("*.safetensors")):
        raise StageError(f"gptqmodel wrote no safetensors weights into {ctx.work_dir}")
    log.info("%s: %s %d-bit g%d done", ctx.stage_id, params.method, params.bits, params.group_size)
    metrics: dict[str, Any] = {"method": params.method, "bits": params.bits, "group_size": params.group_size}
    if losses:  # gptqmodel's per-module output error after quantization, for either method
        metrics["mean_layer_loss"] = sum(losses.values()) / len(losses)
        metrics["layer_loss"] = losses
    return StageOutput(format="hf", metrics=metrics)
