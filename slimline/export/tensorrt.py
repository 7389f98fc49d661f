"""Build a TensorRT FP16 engine from an exported ONNX decoder graph.

TensorRT's ONNX parser reads the graph of an ``export.onnx`` artifact (fp32, not quantised:
TensorRT chooses FP16 kernels itself), one optimisation profile covers the dynamic batch,
sequence and past axes, and the serialized engine is written as ``model.plan`` with
``engine.json`` naming the GPU, compute capability and TensorRT version it is bound to (an
engine does not load on another GPU or TensorRT version; the backend checks before loading).

TensorRT and a CUDA GPU are required; preflight refuses the stage without them, or marks it
skipped with the reason when the stage has ``allow_skip: true``. Where a GPU exists but
TensorRT does not, ``export.onnx`` with ``precision: fp16`` runs on ONNX Runtime's CUDA provider.

```yaml
- id: engine
  kind: export.tensorrt
  from: onnx
  allow_skip: true
```
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pydantic import Field, model_validator

from slimline.artifacts import Artifact
from slimline.errors import StageError
from slimline.runtime.onnx_model import MODEL_FILE
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec

log = logging.getLogger(__name__)

SPEC = StageSpec(
    kind="export.tensorrt",
    requires=("tensorrt",),
    extra="tensorrt",
    device="cuda",
    data=(),
    skip_hint="on a GPU without TensorRT, export.onnx with precision: fp16 runs on ONNX Runtime's CUDA provider",
)

ENGINE_FILE = "model.plan"
ENGINE_INFO = "engine.json"


class Params(StageParams):
    """Engine build settings: the range of shapes it serves and the builder's memory."""

    max_batch: int = Field(1, ge=1, le=256, description="Largest batch the engine accepts.")
    max_sequence: int | None = Field(
        None, ge=2, description="Largest past + new tokens per sequence; default: the model's context."
    )
    optimal_past: int = Field(128, ge=0, description="Past length the kernels are tuned for (decode steps).")
    workspace_gb: float = Field(4.0, gt=0, le=64, description="Builder workspace memory limit in GB.")

    @model_validator(mode="after")
    def check_ranges(self) -> Params:
        """The tuned past length must be inside the served range."""
        if self.max_sequence is not None and self.optimal_past >= self.max_sequence:
            raise ValueError(f"optimal_past ({self.optimal_past}) must be below max_sequence ({self.max_sequence})")
        return self


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """The engine cannot serve sequences longer than the model's context."""
    context = shape.setting("max_position_embeddings")
    if isinstance(context, int) and params.max_sequence and params.max_sequence > context:
        return [
            (("max_sequence",), f"max_sequence {params.max_sequence} exceeds the model's context ({context})")
        ], shape
    return [], shape


def shape_profile(name: str, kv_shape: tuple[int, int], params: Params, longest: int) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shape of one graph input for the optimisation profile."""
    batch, past = params.max_batch, min(params.optimal_past, longest - 1)
    if name.startswith("past."):
        kv_heads, head_dim = kv_shape
        return (1, kv_heads, 0, head_dim), (1, kv_heads, past, head_dim), (batch, kv_heads, longest - 1, head_dim)
    if name == "attention_mask":
        return (1, 1), (1, past + 1), (batch, longest)
    return (1, 1), (1, 1), (batch, longest)  # input_ids, position_ids, logit_positions: one token per decode step


def check_parent(parent: Artifact) -> None:
    """TensorRT builds FP16 from an fp32, unquantised ONNX graph."""
    if parent.format != "onnx":
        raise StageError(
            f"{SPEC.kind} needs an export.onnx artifact as input; {parent.manifest['stage']!r} is {parent.format!r}"
        )
    params = parent.manifest.get("params", {})
    if params.get("precision", "fp32") != "fp32" or params.get("quantize", "none") != "none":
        raise StageError(f"{SPEC.kind} needs an fp32, unquantised ONNX graph (TensorRT picks FP16 kernels itself)")


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Parse the ONNX graph, build and serialize an FP16 engine, record what it is bound to."""
    import tensorrt
    import torch

    parent = inputs[0]
    check_parent(parent)
    model_config = json.loads((parent.path / "config.json").read_text())
    longest = params.max_sequence or model_config["max_position_embeddings"]
    logger = tensorrt.Logger(tensorrt.Logger.WARNING)
    builder = tensorrt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = tensorrt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parent.path / MODEL_FILE)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StageError(f"TensorRT could not parse {parent.path / MODEL_FILE}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(tensorrt.MemoryPoolType.WORKSPACE, int(params.workspace_gb * (1 << 30)))
    config.set_flag(tensorrt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        kv_shape = (tensor.shape[1], tensor.shape[3]) if tensor.name.startswith("past.") else (0, 0)
        profile.set_shape(tensor.name, *shape_profile(tensor.name, kv_shape, params, longest))
    config.add_optimization_profile(profile)
    with ctx.progress.task(f"{ctx.stage_id}: build TensorRT engine", 1) as advance:
        serialized = builder.build_serialized_network(network, config)
        advance(1)
    if serialized is None:
        raise StageError("TensorRT failed to build the engine (see its log above)")
    (ctx.work_dir / ENGINE_FILE).write_bytes(bytes(serialized))
    for name in ("config.json", "generation_config.json"):
        if (parent.path / name).exists():
            shutil.copy2(parent.path / name, ctx.work_dir / name)
    binding = engine_binding(tensorrt, torch)
    (ctx.work_dir / ENGINE_INFO).write_text(json.dumps({**binding, **params.model_dump()}, indent=2) + "\n")
    return StageOutput(format="tensorrt", metrics={**binding, "engine_mb": len(serialized) / 1e6})


def engine_binding(tensorrt, torch) -> dict[str, str]:
    """What a serialized engine is bound to: GPU model, compute capability, TensorRT and CUDA versions."""
    major, minor = torch.cuda.get_device_capability()
    return {
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "tensorrt": tensorrt.__version__,
        "cuda": str(torch.version.cuda),
    }


def read_binding(folder: Path) -> dict[str, str]:
    """The binding recorded beside an engine."""
    return json.loads((folder / ENGINE_INFO).read_text())
