"""What the quantization stages share: refusing already-quantized inputs, calibration windows, group-size checks."""

from __future__ import annotations

import json

import torch

from slimline.artifacts import Artifact, require_full_model
from slimline.data import sample_windows
from slimline.errors import StageError
from slimline.stage import ModelShape, ShapeProblems, StageContext

# Config key a quantization stage sets on the shape it hands on, so a second quantization is refused at validation.
QUANTIZED_KEY = "quantization_config"


def require_unquantized_model(parent: Artifact, kind: str) -> None:
    """Quantization stages read a full-precision HF model; an already-quantized one is refused."""
    require_full_model(parent, kind)
    config = json.loads((parent.model_path / "config.json").read_text())
    if QUANTIZED_KEY in config:
        method = config[QUANTIZED_KEY].get("quant_method", "unknown")
        raise StageError(f"{kind} needs a full-precision model; {parent.manifest['stage']!r} is already {method}")


def check_unquantized_shape(kind: str, shape: ModelShape) -> ShapeProblems:
    """Validation-time twin of ``require_unquantized_model``."""
    if QUANTIZED_KEY in shape.config:
        method = shape.config[QUANTIZED_KEY].get("quant_method", "unknown")
        return [((), f"{kind} needs a full-precision input; this stage's input is already quantized ({method})")]
    return []


def check_sequence_length(field: str, length: int, shape: ModelShape) -> ShapeProblems:
    """Calibration or training sequences must fit the model's context."""
    context = shape.config.get("max_position_embeddings")
    if context is not None and length > context:
        return [((field,), f"{length} tokens exceed the model's context of {context}")]
    return []


def check_group_size(group_size: int, shape: ModelShape) -> ShapeProblems:
    """A quantization group must divide every linear layer's input width (hidden and FFN sizes)."""
    widths = {
        "hidden_size": shape.config.get("hidden_size"),
        "intermediate_size": shape.config.get("intermediate_size"),
    }
    bad = {name: width for name, width in widths.items() if width is not None and width % group_size}
    if bad:
        return [(("group_size",), f"{group_size} does not divide the model's {bad}; pick a divisor of every width")]
    return []


def calibration_windows(ctx: StageContext, count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens from the calibration split, drawn with the run's seed."""
    return sample_windows(ctx.data.stream("calibration"), count, length, torch.Generator().manual_seed(ctx.seed))
