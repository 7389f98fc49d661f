"""Export to ONNX with a KV cache, optimise for ONNX Runtime, optionally quantise to int8.

The graph is one decoder step (see ``decoder_graph.py``) exported with ``torch.onnx.export(
dynamo=True)``; ONNX Runtime's transformer optimiser then fuses what it recognises (RMSNorm +
residual into ``SkipSimplifiedLayerNormalization``), and ``onnxruntime.quantization`` can
quantise the weights to int8, dynamically or statically with calibration data. The stage
checks the graph against PyTorch on real tokens before it publishes: logits (max abs/rel
difference in the report; an fp32 graph beyond ``tolerance`` fails the stage) and greedy
decoding with the cache on a few prompts.

```yaml
- id: onnx-int8
  kind: export.onnx
  params: {quantize: dynamic}
```
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from slimline.artifacts import Artifact
from slimline.errors import StageError
from slimline.export.decoder_graph import export_decoder
from slimline.export.int8_graph import quantize_graph_per_token
from slimline.hardware import cpu_flags, has_vnni, safe_int8_weight_bits
from slimline.models import cache_keyword, load_parent_model
from slimline.runtime.layout import LOGIT_POSITIONS, CacheLayout
from slimline.runtime.onnx_model import MODEL_FILE, open_session, session_layout
from slimline.runtime.onnx_model import OnnxModel as GraphModel
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec

log = logging.getLogger(__name__)

SPEC = StageSpec(
    kind="export.onnx",
    requires=("onnx", "onnxscript", "onnxruntime"),
    extra="onnx",
    device="cpu",  # the graph is traced and checked on the CPU, where ONNX Runtime runs it here
    data=("calibration",),
)

# Protobuf cannot hold a file over 2 GB: larger weights go to an external data file.
EXTERNAL_DATA_BYTES = 1_800_000_000
CONFIG_FILES = ("config.json", "generation_config.json")


class Params(StageParams):
    """How to export, optimise and quantise the graph, and how hard to check it."""

    opset: int = Field(18, ge=18, le=23, description="ONNX opset of the exported graph.")
    precision: Literal["fp32", "fp16"] = Field(
        "fp32", description="fp16 halves the weights for GPU providers (inputs/outputs stay float32)."
    )
    optimize: bool = Field(True, description="Apply ONNX Runtime's transformer fusions (RMSNorm + residual, ...).")
    quantize: Literal["none", "dynamic", "static"] = Field(
        "none",
        description="int8 weights: dynamic quantises activations at run time; static calibrates them on data.",
    )
    activations: Literal["per_token", "per_tensor"] = Field(
        "per_token",
        description="Dynamic only: one activation range per token (slimline's MatMulInteger rewrite; robust to the "
        "outlier tokens of real checkpoints) or one per tensor (onnxruntime.quantization.quantize_dynamic).",
    )
    per_channel: bool = Field(True, description="One int8 scale per output channel instead of per tensor.")
    symmetric_activations: bool = Field(
        False, description="Static only: signed int8 activations around zero instead of asymmetric uint8."
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="Static only: how activation ranges are chosen from the calibration data."
    )
    calibration_samples: int = Field(16, ge=1, le=1024, description="Static only: calibration sequences.")
    calibration_length: int = Field(128, ge=8, description="Static only: tokens per calibration sequence.")
    check_tokens: int = Field(128, ge=8, description="Real tokens the logits check compares against PyTorch.")
    check_prompts: int = Field(4, ge=0, description="Prompts the greedy check decodes with the KV cache (0: none).")
    check_new_tokens: int = Field(16, ge=1, description="Greedy tokens per check prompt.")
    tolerance: float = Field(
        1e-3, gt=0, description="Max abs logit difference allowed for an fp32, unquantised graph (else it fails)."
    )
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="Store weights in model.onnx.data; auto does so above 1.8 GB (protobuf's 2 GB limit)."
    )

    @model_validator(mode="after")
    def check_combination(self) -> Params:
        """Quantisation works on the fp32 graph; an fp16 graph is for GPU providers."""
        if self.quantize != "none" and self.precision == "fp16":
            raise ValueError("int8 quantization applies to an fp32 graph; set precision: fp32 or quantize: none")
        if self.quantize != "dynamic" and "activations" in self.model_fields_set:
            raise ValueError("activations applies to quantize: dynamic only; drop it")
        return self


# Families on whose exported graph ONNX Runtime's transformer fusions (model_type 'gpt2') fail, by model_type.
OPTIMIZER_FAILS = {"gpt2": "onnx_model_gpt2.postprocess raises IndexError on a Gemm node without a bias input"}


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """Refuse ``optimize`` for families whose graph ONNX Runtime's fusions fail on (the export itself works)."""
    if params.optimize and shape.model_type in OPTIMIZER_FAILS:
        message = (
            f"{shape.architecture}: ONNX Runtime's transformer optimizer fails on its exported graph "
            f"({OPTIMIZER_FAILS[shape.model_type]}); set optimize: false"
        )
        return [(("optimize",), message)], shape
    return [], shape


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Export, optimise, quantise, check against PyTorch, and leave model.onnx in the work folder."""
    parent = inputs[0]
    model = load_parent_model(parent, SPEC.kind)
    layout = CacheLayout.of(model.config)
    weight_bytes = sum(p.numel() for p in model.parameters()) * 4
    external = params.external_data == "always" or (
        params.external_data == "auto" and weight_bytes > EXTERNAL_DATA_BYTES
    )
    scratch = ctx.work_dir / "_build"
    scratch.mkdir()
    with ctx.progress.task(f"{ctx.stage_id}: export", 3) as advance:
        export_decoder(model, scratch / "exported.onnx", params.opset, external)
        advance(1)
        current = scratch / "exported.onnx"
        if params.optimize or params.precision == "fp16":
            current = optimize_graph(current, scratch / "optimized.onnx", model.config, params, external)
        advance(1)
        if params.quantize != "none":
            calibration = calibration_batches(ctx.data.stream("calibration"), params)
            current = quantize_graph(current, scratch / "quantized.onnx", params, calibration, external)
        advance(1)
    move_graph(current, ctx.work_dir / MODEL_FILE)
    shutil.rmtree(scratch)
    for name in CONFIG_FILES:  # the shape of the model the graph came from, for readers of the artifact
        if (parent.model_path / name).exists():
            shutil.copy2(parent.model_path / name, ctx.work_dir / name)
    metrics = check_against_pytorch(model, ctx.work_dir / MODEL_FILE, ctx.data.stream("calibration"), params)
    metrics.update({"external_data": external, "cache_layers": layout.layers, "opset": params.opset})
    if params.quantize != "none":
        metrics["int8_activations"] = params.activations if params.quantize == "dynamic" else "static per tensor"
        metrics["int8_weight_bits"] = safe_int8_weight_bits()
        metrics["cpu_vnni"] = has_vnni(cpu_flags())
    exact_graph = params.precision == "fp32" and params.quantize == "none"
    if exact_graph and metrics["max_abs_logit_difference"] > params.tolerance:
        raise StageError(
            f"the exported graph's logits differ from PyTorch's by {metrics['max_abs_logit_difference']:.3g} "
            f"(tolerance {params.tolerance:g}); the export is wrong for this model"
        )
    return StageOutput(format="onnx", metrics=metrics)


def optimize_graph(source: Path, target: Path, config, params: Params, external: bool) -> Path:
    """ONNX Runtime's transformer fusions and/or the fp16 conversion, saved to ``target``."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_model

    if params.optimize:
        graph = optimize_model(
            str(source),
            model_type="gpt2",  # the decoder-only fusion rules; they match Llama-style RMSNorm blocks too
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
            opt_level=0,  # graph fusions only: the session applies ORT's own optimisations at load
        )
        fused = {op: count for op, count in graph.get_fused_operator_statistics().items() if count}
        log.info("onnx fusions: %s", fused or "none")
    else:
        graph = OnnxModel(onnx.load(str(source)))
    if params.precision == "fp16":
        graph.convert_float_to_float16(keep_io_types=True)
    graph.save_model_to_file(str(target), use_external_data_format=external)
    return target


def calibration_batches(stream: torch.Tensor, params: Params) -> list[np.ndarray]:
    """Static calibration inputs: consecutive windows of the calibration split."""
    length = params.calibration_length
    count = min(params.calibration_samples, stream.numel() // length)
    if count == 0:
        raise StageError(f"the calibration split has {stream.numel()} tokens, fewer than one {length}-token window")
    return [stream[i * length : (i + 1) * length].numpy() for i in range(count)]


class PrefillReader:
    """onnxruntime's CalibrationDataReader: each window as a prefill from an empty cache."""

    def __init__(self, session, windows: list[np.ndarray]) -> None:
        layout, dtype = session_layout(session)
        empty = np.zeros((1, layout.kv_heads, 0, layout.head_dim), dtype=dtype)
        self.empty_past = dict.fromkeys(layout.past_names(), empty)
        self.windows = iter(windows)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next window's feeds, or None when done."""
        window = next(self.windows, None)
        if window is None:
            return None
        return {
            "input_ids": window.reshape(1, -1).astype(np.int64),
            "attention_mask": np.ones((1, window.size), dtype=np.int64),
            "position_ids": np.arange(window.size, dtype=np.int64).reshape(1, -1),
            LOGIT_POSITIONS: np.arange(window.size, dtype=np.int64),  # every position: all calibrated
            **self.empty_past,
        }


def quantize_graph(source: Path, target: Path, params: Params, calibration: list[np.ndarray], external: bool) -> Path:
    """int8 weights: per-token dynamic (our rewrite), or onnxruntime.quantization's per-tensor dynamic or static."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if params.quantize == "dynamic" and params.activations == "per_token":
        import onnx

        graph = onnx.load(str(source))
        quantize_graph_per_token(graph, params.per_channel, safe_int8_weight_bits())
        onnx.save_model(graph, str(target), save_as_external_data=external, location=target.name + ".data")
        return target
    if params.quantize == "dynamic":
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=params.per_channel,
            reduce_range=safe_int8_weight_bits() == 7,
            use_external_data_format=external,
        )
        return target
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    reader = PrefillReader(open_session(source, ["CPUExecutionProvider"]), calibration)
    quantize_static(
        str(source),
        str(target),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],  # attention's softmax/rotary stay in float: they are sensitive
        per_channel=params.per_channel,
        activation_type=QuantType.QInt8 if params.symmetric_activations else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=methods[params.calibration_method],
        use_external_data_format=external,
        extra_options={"ActivationSymmetric": params.symmetric_activations},
    )
    return target


def move_graph(source: Path, target: Path) -> None:
    """Move a graph and its external data file (if any) to ``target``, fixing the data file's name."""
    import onnx

    data_files = list(source.parent.glob(source.name + ".data")) or list(source.parent.glob("*.data"))
    if not data_files:
        shutil.move(source, target)
        return
    graph = onnx.load(str(source))  # loads the external data, then writes it under the new name
    onnx.save_model(graph, str(target), save_as_external_data=True, location=target.name + ".data")


@torch.inference_mode()
def check_against_pytorch(model, path: Path, stream: torch.Tensor, params: Params) -> dict[str, float | int]:
    """Logit differences on real tokens and greedy agreement with the KV cache, graph vs PyTorch."""
    graph = GraphModel(path.parent, graph=path, context_length=model.config.max_position_embeddings)
    tokens = stream[: params.check_tokens]
    expected = model(input_ids=tokens[None]).logits[0].float().numpy()
    actual = graph.logits(tokens).numpy()
    difference = np.abs(actual - expected)
    metrics: dict[str, float | int] = {
        "max_abs_logit_difference": float(difference.max()),
        # relative to the logits' scale: elementwise ratios explode on logits near zero
        "max_rel_logit_difference": float(difference.max() / np.abs(expected).max()),
        "mean_abs_logit_difference": float(difference.mean()),
        "check_top1_agreement": float((actual.argmax(-1) == expected.argmax(-1)).mean()),
        "providers": ",".join(graph.providers),
    }
    if params.check_prompts:
        matches = sum(
            greedy_onnx(graph, prompt, params.check_new_tokens) == greedy_torch(model, prompt, params.check_new_tokens)
            for prompt in check_prompts(stream, params)
        )
        metrics["greedy_prompts_identical"] = matches
        metrics["greedy_prompts"] = params.check_prompts
    return metrics


def check_prompts(stream: torch.Tensor, params: Params) -> list[torch.Tensor]:
    """Prompts of 16 to 64 real tokens, spread over the calibration split."""
    lengths = [16 + (48 * i) // max(params.check_prompts - 1, 1) for i in range(params.check_prompts)]
    starts = np.linspace(0, max(stream.numel() - 64, 0), params.check_prompts).astype(int)
    return [stream[start : start + length] for start, length in zip(starts, lengths, strict=True)]


def greedy_onnx(graph, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens from the graph: prefill, then one token at a time on its cache."""
    sequence = graph.new_sequence()
    tokens = [int(sequence.extend(prompt.tolist(), all_logits=False)[-1].argmax())]
    for _ in range(new_tokens - 1):
        tokens.append(int(sequence.extend(tokens[-1:], all_logits=False)[-1].argmax()))
    return tokens


def greedy_torch(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens from PyTorch with transformers' KV cache (plain argmax, no logits processors)."""
    from transformers import DynamicCache

    cache = {cache_keyword(model): DynamicCache()}
    logits = model(input_ids=prompt[None], use_cache=True, **cache).logits
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **cache).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens
