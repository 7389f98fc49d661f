"""Memory preflight: what each stage will hold at its peak, against the free memory of its device.

``estimate_stage_memory`` adds up named parts in bytes, from the model's config alone (the model is
built on the meta device to count its parameters and read its layer widths; no weights load):

- **weights**: parameters x bytes per parameter. Stages load their parent in float32
  (``load_parent_model``) whatever ``precision`` says: bf16 is autocast, which keeps float32
  weights. GPTQ loads the checkpoint's stored dtype. LoRA with ``quantize_base: nf4`` holds the
  decoder's linear weights at ``NF4_BYTES`` (4-bit NF4 plus double-quantized block scales).
- **gradients** and **optimizer_state**: float32 gradients (4 bytes) and AdamW's two moments
  (8 bytes) per trainable parameter: the adapters alone for LoRA (rank x (in + out) per adapted
  module), every parameter for distillation's student, QAT and pruning's recovery (whose tied
  embeddings add two ``vocab x hidden`` gradient halves, summed at the end of backward).
- **teacher** (distill, prune recovery in distill mode): the frozen teacher in float32;
  **draft** (serve): the draft in float32; **fake_quant** (QAT): two float32 copies of the
  fake-quantized linear weights, saved for backward (measured).
- **activations**, per micro-batch of ``tokens = batch_size x sequence_length``::

      tokens x [a x (layers x (8 hidden + 2 kv + 4 intermediate) + 3 hidden) + l x vocab]

  ``kv`` is ``kv_heads x head_dim``; ``a`` the bytes of a saved activation (4 in float32, 2.75
  under bf16 autocast); ``l`` the bytes per logit (16 in float32: the logits, their log-softmax, its
  gradient and the logits' gradient; 14 under bf16). LoRA adds ``a + 1.75`` bytes per adapted
  input feature per token (dropout's output and mask; ``BatchDropout`` draws the whole launch's
  float32 mask in every rank: ``4 x (world - 1)`` more); QAT adds ``2 a`` per quantized input
  feature; distillation holds the student's activations, the teacher's KV cache (``4 x (2 kv + 2
  hidden)`` bytes per teacher layer per token) and seven float32 logit-sized tensors (``l = 28``).
  bf16 autocast saves a bf16 copy of every linear weight for backward (``2`` bytes each). SDPA
  attention stores no ``seq x seq`` scores: no quadratic term. Backward frees activations as it
  makes gradients, so the smaller of the two is left out of the total.
- **calibration** (GPTQ): the layer inputs and outputs kept for every window (``2 x samples x
  length x hidden`` at the stored dtype) and one decoder layer's float32 Hessians (``in^2 x 4``
  per linear); (structured pruning) every layer's inputs and outputs when it drops layers, and a
  calibration batch's logits; counted instead of the recovery when larger (they come first).
- **kv_cache** (serve): ``2 x layers x kv x context x max_batch x 4`` bytes, target and draft.
- **allocator** (CPU training): glibc keeps freed blocks under its 32 MiB mmap ceiling in its
  heaps, and a training step's many such tensors left the process's RSS 2.6x (LoRA) to 3.5x (full
  fine-tuning) its live activations; ``ALLOCATOR_FACTOR - 1`` times them, 0 when
  ``MALLOC_MMAP_THRESHOLD_`` is set (then RSS matched the live tensors).
- **merge** (QLoRA with ``merge``) and **output_check** (the runner loads the output beside its
  parent, in float32, before publishing): what those later peaks need beyond the stage's own.

The factors were measured, not derived: the peak of live tensor bytes during training steps of
random Llama models on this CPU (a ``TorchDispatchMode`` counting storages), fitted over layers,
widths, vocabularies and batch sizes, then checked on the example model's shape: within -5% and
+25% of the measured peaks (docs/scale.md, "Memory preflight").

Under a ``launch:`` block each rank takes ``batch_size / world_size`` rows. ``fsdp`` divides
weights, teacher, gradients and optimizer state by the world size and adds two gathered units (a
decoder layer or the embeddings, the larger); each rank still loads the whole model before
sharding it, which bounds its peak from below. ``ddp`` keeps everything per rank, and its
gradient buckets double the gradients. On a CPU the ``nproc_per_node`` ranks share the machine.

Free memory is ``MemAvailable`` (psutil, else ``/proc/meminfo``) for CPU stages and the least free
memory of the visible CUDA devices (``torch.cuda.mem_get_info``) for stages that run on CUDA;
``SLIMLINE_MEMORY_BYTES`` (bytes, for tests and planning) replaces both. A stage is refused when
its estimate exceeds the free memory (no margin beyond the measured factors); a warning is logged
above ``WARN_FRACTION`` of it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from slimline.config import INPUT_ID, Pipeline, check_stage_shape, topological_order
from slimline.devices import resolve_device
from slimline.errors import PreflightError
from slimline.registry import stage_spec
from slimline.stage import ModelShape

MEMORY_ENV = "SLIMLINE_MEMORY_BYTES"
WARN_FRACTION = 0.8
GB = 1e9
FP32 = 4
BF16 = 2
ADAMW = 2 * FP32  # exp_avg and exp_avg_sq, float32
# Measured bytes per saved activation element and per logit per token (module docstring).
ACTIVATION_BYTES = {"fp32": 4.0, "bf16": 2.75}
LOGIT_BYTES = {"fp32": 16.0, "bf16": 14.0}
DISTILL_LOGIT_BYTES = 28.0
LORA_DROPOUT_EXTRA = 1.75  # beyond one activation: the dropout mask, measured
QAT_WEIGHT_COPIES = 2  # fake-quantized weights saved for backward, measured
NF4_BYTES = 0.52  # 4-bit NF4 + 8-bit block scales of 64 + their double-quantized scales
STORED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# glibc malloc keeps freed blocks below its mmap ceiling (32 MiB) in its heaps, and a training step's
# many such activation and gradient tensors leave the process's RSS well above its live tensors:
# measured 2.6x (LoRA) and 3.5x (full fine-tuning) at batch 8 on the example model (docs/scale.md).
ALLOCATOR_FACTOR = 3.0
MMAP_CEILING = 32 * 2**20
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"  # set: glibc maps every block above it and returns it when freed (factor 1)
PRUNE_CALIBRATION_BATCH = 8  # slimline.prune.slicing.CALIBRATION_BATCH
SERVE_PROMPT_TOKENS = 64  # the serve stage's check prompts (slimline.serve.stage.measure_pair)
TRAINING_KINDS = ("lora", "distill", "quantize.qat", "prune.structured")
PART_ORDER = (
    "weights",
    "teacher",
    "draft",
    "fake_quant",
    "gradients",
    "optimizer_state",
    "activations",
    "calibration",
    "kv_cache",
    "allocator",
    "merge",
    "output_check",
)
SIDE_PARTS = ("allocator", "merge", "output_check")


@dataclass(frozen=True)
class ModelFigures:
    """What the estimates need of a model: its parameter count, widths and linear layers."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    kv: int  # kv_heads x head_dim
    vocab: int
    tied: bool
    stored_bytes: int  # bytes per weight in the checkpoint's dtype
    # (short name, in_features, out_features, inside a decoder layer) of every Linear / Conv1D
    linears: tuple[tuple[str, int, int, bool], ...]
    largest_unit: int  # parameters of the largest FSDP unit: a decoder layer or the embeddings

    def linear_parameters(self, decoder_only: bool = True) -> int:
        """Weights of the (decoder's) linear layers."""
        return sum(i * o for _, i, o, inside in self.linears if inside or not decoder_only)

    def linear_inputs(self, names: set[str] | None = None) -> int:
        """Input features summed over the decoder's linear layers (those named, else all), all layers."""
        return sum(i for name, i, _, inside in self.linears if inside and (names is None or name in names))


@dataclass(frozen=True)
class TrainPlan:
    """How one process of a training stage trains: its micro-batch, precision and world."""

    batch_size: int  # rows of this process's micro-batch
    sequence_length: int
    precision: str  # fp32 or bf16, as estimated
    accumulation: int = 1  # micro-batches per optimizer step
    world: int = 1
    strategy: str = "none"  # none, ddp or fsdp

    @property
    def tokens(self) -> int:
        """Tokens in one process's micro-batch."""
        return self.batch_size * self.sequence_length


@dataclass(frozen=True)
class MemoryEstimate:
    """A stage's estimated peak per process, by named part in bytes, and where it must fit."""

    stage_id: str
    kind: str
    device: str  # cpu or cuda
    parts: dict[str, int]
    processes: int = 1  # processes sharing the device's memory (a CPU machine's ranks)
    load_peak: int = 0  # FSDP: the whole model, held by each rank before it shards it
    notes: tuple[str, ...] = ()
    training: TrainPlan | None = None

    @property
    def overlap(self) -> int:
        """Bytes of gradients and activations that are never held together: backward frees one as it makes the other."""
        return min(self.parts.get("gradients", 0), self.parts.get("activations", 0))

    @property
    def per_process(self) -> int:
        """Bytes one process needs at its peak: the parts, the smaller of gradients and activations left out."""
        return max(sum(self.parts.values()) - self.overlap, self.load_peak)

    @property
    def total(self) -> int:
        """Bytes the device's memory must hold: every process on it."""
        return self.per_process * self.processes

    def breakdown(self) -> dict[str, int]:
        """The named parts and the total, in bytes (for records and reports)."""
        return {**self.parts, "total": self.total}

    def describe(self) -> str:
        """'about 31.2 GB (weights 0.5, gradients 0.0, ...)': the parts of one process, in GB."""
        minor = 0.01 * self.per_process  # a side part this small is noise in the message (still in ``parts``)
        order = [n for n in PART_ORDER if n in self.parts and (n not in SIDE_PARTS or self.parts[n] >= minor)]
        shown = ", ".join(f"{name.replace('_state', '')} {gb(self.parts[name])}" for name in order)
        each = f"{self.processes} processes x {gb(self.per_process)}: " if self.processes > 1 else ""
        larger = "; the larger of gradients and activations counted" if self.overlap > 0.01 * self.per_process else ""
        loading = (
            f"; {gb(self.load_peak)} while a rank loads the whole model before sharding it"
            if self.load_peak > sum(self.parts.values()) - self.overlap
            else ""
        )
        return f"about {gb(self.total)} GB ({each}{shown}{larger}{loading})"


def gb(size: float) -> str:
    """Bytes as GB: one decimal, two below 1 GB (a small model's parts are not all 0.0)."""
    return f"{size / GB:.1f}" if size >= GB else f"{size / GB:.2f}"


# --- the model's figures ------------------------------------------------------------------


def model_figures(shape: ModelShape) -> ModelFigures:
    """The figures of a model shape, counted on a meta-device build of its config (no weights)."""
    return _figures(json.dumps(shape.config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _figures(config_json: str) -> ModelFigures:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from slimline.models import decoder_layers_name

    shape = ModelShape(json.loads(config_json), frozenset())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config_object)
    container = decoder_layers_name(model)
    linears = []
    for name, module in model.named_modules():
        inside = container is not None and name.startswith(f"{container}.")
        if isinstance(module, torch.nn.Linear):
            linears.append((name.rsplit(".", 1)[-1], module.in_features, module.out_features, inside))
        elif isinstance(module, Conv1D):  # GPT-2 style: weight [in, out]
            linears.append((name.rsplit(".", 1)[-1], *module.weight.shape, inside))
    embeddings = model.get_input_embeddings().weight.numel()
    blocks = model.get_submodule(container) if container is not None else []
    layer = max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)
    heads = shape.setting("num_attention_heads", 1)
    hidden = shape.setting("hidden_size", 0)
    head_dim = shape.setting("head_dim") or hidden // max(1, heads)
    dtype = str(shape.config.get("dtype") or shape.config.get("torch_dtype") or "float32")
    return ModelFigures(
        parameters=sum(p.numel() for p in model.parameters()),
        layers=shape.setting("num_hidden_layers", 0),
        hidden=hidden,
        intermediate=shape.setting("intermediate_size") or shape.setting("n_inner") or 4 * hidden,
        kv=shape.setting("num_key_value_heads", heads) * head_dim,
        vocab=shape.setting("vocab_size", 0),
        tied=bool(shape.setting("tie_word_embeddings", False)),
        stored_bytes=STORED_BYTES.get(dtype.removeprefix("torch."), FP32),
        linears=tuple(linears),
        largest_unit=max(layer, embeddings),
    )


# --- activations --------------------------------------------------------------------------


def layer_activations(model: ModelFigures, tokens: int, precision: str) -> float:
    """Saved activations of the embeddings and decoder layers for one micro-batch (no logits)."""
    per_layer = 8 * model.hidden + 2 * model.kv + 4 * model.intermediate
    return tokens * ACTIVATION_BYTES[precision] * (model.layers * per_layer + 3 * model.hidden)


def training_activations(model: ModelFigures, train: TrainPlan) -> float:
    """Activations and logits of a causal-LM training step (cross-entropy on every token)."""
    logits = train.tokens * LOGIT_BYTES[train.precision] * model.vocab
    return layer_activations(model, train.tokens, train.precision) + logits


def distill_activations(student: ModelFigures, teacher: ModelFigures, train: TrainPlan) -> float:
    """The student's activations, the teacher's KV cache and the seven logit-sized tensors of the loss."""
    teacher_cache = train.tokens * FP32 * teacher.layers * (2 * teacher.kv + 2 * teacher.hidden)
    logits = train.tokens * DISTILL_LOGIT_BYTES * student.vocab
    return layer_activations(student, train.tokens, train.precision) + teacher_cache + logits


# --- per kind -------------------------------------------------------------------------------

Parts = dict[str, float]


def trained(parts: Parts, trainable: int, train: TrainPlan, model: ModelFigures, full: bool = True) -> Parts:
    """Add float32 gradients and AdamW state for ``trainable`` parameters (DDP's buckets double the gradients).

    ``full``: every parameter trains, so tied embeddings get two gradient halves (input embedding
    and LM head) that backward sums at its end: two more ``vocab x hidden`` float32 tensors. Under
    bf16 autocast every linear layer's bf16 weight copy is saved for backward: counted with the
    activations, as ``linear weights x 2`` bytes.
    """
    buckets = 2 if train.strategy == "ddp" else 1
    halves = 2 * model.vocab * model.hidden * FP32 if full and model.tied else 0
    autocast = model.linear_parameters(decoder_only=False) * BF16 if train.precision == "bf16" else 0
    return parts | {
        "gradients": trainable * FP32 * buckets + halves,
        "optimizer_state": trainable * ADAMW,
        "activations": parts.get("activations", 0) + autocast,
    }


def lora_parts(params: Any, parent: ModelFigures, output: ModelFigures, train: TrainPlan) -> Parts:
    """Frozen base (float32 or NF4) + adapters; gradients and AdamW for the adapters alone."""
    targets = set(params.target_modules)
    adapter = sum(params.rank * (i + o) for name, i, o, _ in parent.linears if name in targets)
    base = parent.parameters * FP32
    if params.quantize_base == "nf4":
        quantized = parent.linear_parameters()
        base = (parent.parameters - quantized) * FP32 + quantized * NF4_BYTES
    activations = training_activations(parent, train)
    if params.dropout > 0:  # BatchDropout draws the global batch's float32 mask in every rank
        extra = ACTIVATION_BYTES[train.precision] + LORA_DROPOUT_EXTRA + FP32 * (train.world - 1)
        activations += train.tokens * extra * parent.linear_inputs(targets)
    parts = trained({"weights": base + adapter * FP32, "activations": activations}, adapter, train, parent, full=False)
    if params.quantize_base == "nf4" and params.merge:  # the merge loads the float32 base beside the NF4 one
        held = parts["optimizer_state"] + max(parts["gradients"], parts["activations"])
        parts["merge"] = max(0.0, parent.parameters * FP32 - held)
    return parts


def distill_parts(params: Any, parent: ModelFigures, output: ModelFigures, train: TrainPlan) -> Parts:
    """Student (trained in full) beside the frozen teacher."""
    projection = output.hidden * parent.hidden if params.hidden_weight > 0 else 0
    student = output.parameters + projection
    parts = {"weights": student * FP32, "teacher": parent.parameters * FP32}
    return trained(parts | {"activations": distill_activations(output, parent, train)}, student, train, output)


def qat_parts(params: Any, parent: ModelFigures, output: ModelFigures, train: TrainPlan) -> Parts:
    """Every parameter trained, the linears fake-quantized (an untied LM head gets its own copy)."""
    untied = parent.vocab * parent.hidden if params.include_lm_head and parent.tied else 0
    head = parent.vocab * parent.hidden if params.include_lm_head else 0
    parameters = parent.parameters + untied
    activations = training_activations(parent, train)
    inputs = parent.linear_inputs() + (parent.hidden if params.include_lm_head else 0)
    activations += train.tokens * 2 * ACTIVATION_BYTES[train.precision] * inputs
    fake_quant = QAT_WEIGHT_COPIES * (parent.linear_parameters() + head) * FP32
    parts = {"weights": parameters * FP32, "fake_quant": fake_quant, "activations": activations}
    untied_figures = dataclasses.replace(parent, tied=parent.tied and not params.include_lm_head)
    return trained(parts, parameters, train, untied_figures)


def prune_structured_parts(params: Any, parent: ModelFigures, output: ModelFigures, train: TrainPlan | None) -> Parts:
    """The parent (and its copy as teacher), then the larger of calibration and the recovery fine-tune."""
    recovery = params.recovery
    distilled = recovery is not None and recovery.mode == "distill"
    parts: Parts = {"weights": parent.parameters * FP32, "teacher": parent.parameters * FP32 if distilled else 0}
    layer_io = 2 * parent.layers * params.calibration_samples if params.drop_layers else 0
    rows = min(params.calibration_samples, PRUNE_CALIBRATION_BATCH)
    calibration = params.calibration_length * (layer_io * parent.hidden + rows * parent.vocab) * FP32
    if train is None:
        return parts | {"calibration": calibration}
    activations = distill_activations(output, parent, train) if distilled else training_activations(output, train)
    recovering = trained({"activations": activations}, output.parameters, train, output)
    held = recovering["optimizer_state"] + max(recovering["gradients"], recovering["activations"])
    if calibration > held:
        return parts | {"calibration": calibration}
    return parts | recovering


def gptq_parts(params: Any, parent: ModelFigures, output: ModelFigures, train: TrainPlan | None) -> Parts:
    """The model at its stored dtype, the calibration windows' layer inputs/outputs and one layer's Hessians."""
    parts: Parts = {"weights": parent.parameters * parent.stored_bytes}
    if params.method == "rtn":
        return parts
    windows = 2 * params.calibration_samples * params.calibration_length * parent.hidden * parent.stored_bytes
    hessians = sum(i * i for _, i, _, inside in parent.linears if inside) / max(1, parent.layers) * FP32
    return parts | {"calibration": windows + hessians}


def loaded_parts(params: Any, parent: ModelFigures, output: ModelFigures, train: TrainPlan | None) -> Parts:
    """Stages that load the parent in float32 and transform it (prune.magnitude, ptq, bnb, gguf, exports)."""
    return {"weights": parent.parameters * FP32}


ESTIMATORS: dict[str, Callable[..., Parts]] = {
    "lora": lora_parts,
    "distill": distill_parts,
    "quantize.qat": qat_parts,
    "prune.structured": prune_structured_parts,
    "quantize.gptq": gptq_parts,
}


def serving_parts(target: ModelFigures, draft: ModelFigures, max_batch: int, context: int) -> Parts:
    """Target and draft in float32, each with a float32 KV cache of ``max_batch`` sequences of ``context`` tokens."""
    cache = sum(2 * model.layers * model.kv * context * max_batch * FP32 for model in (target, draft))
    return {"weights": target.parameters * FP32, "draft": draft.parameters * FP32, "kv_cache": cache}


@dataclass(frozen=True)
class ServingMemory:
    """What ``slimline serve`` holds: the weights of its models, and KV cache bytes per cached token."""

    weights: int  # target and draft, as their runtimes load them
    cache_per_token: int  # both models' keys and values of one token (0 where neither config nor GGUF tells)
    context: int  # tokens one request may hold: prompt + generated
    max_active: int

    def one_request(self) -> int:
        """Weights and one request at full context: the least the server needs."""
        return self.weights + self.cache_per_token * self.context

    def all_requests(self) -> int:
        """Weights and every slot at full context: the most it can come to."""
        return self.weights + self.cache_per_token * self.context * self.max_active


def serving_memory(folders: list[Path], max_active: int, context: int) -> ServingMemory:
    """The serving figures of a target and draft (artifact or checkpoint folders), from their files and configs.

    Safetensors weights count as float32 (the PyTorch runtime's dtype), ONNX and GGUF files as they
    are; KV caches are float32, f16 for llama.cpp.
    """
    from slimline.devices import float32_weight_bytes
    from slimline.models import checkpoint_shape
    from slimline.runtime import gguf_cache_bytes_per_token, model_folder

    weights = cache = 0
    for folder in folders:
        checkpoint = model_folder(folder)
        gguf = folder / "model.gguf"
        files = [*folder.glob("*.onnx"), *folder.glob("*.onnx.data"), *folder.glob("*.gguf")]
        weights += sum(f.stat().st_size for f in files) if files else (float32_weight_bytes(checkpoint) or 0)
        try:
            figures = model_figures(checkpoint_shape(checkpoint))
        except Exception:  # no config (a bare GGUF folder) or one the meta build cannot take
            figures = None
        if figures is not None:
            cache += 2 * figures.layers * figures.kv * (BF16 if gguf.exists() else FP32)
        elif gguf.exists():  # llama.cpp's f16 cache as the GGUF's own metadata shapes it (a slower read)
            cache += gguf_cache_bytes_per_token(gguf) or 0
    return ServingMemory(weights, cache, context, max_active)


def output_bytes(kind: str, params: Any, output: ModelFigures) -> float:
    """Bytes of the stage's output model once loaded for the output check (quantized linears stay small)."""
    linear = output.linear_parameters()
    per_weight = {"quantize.ptq": 1.0, "quantize.qat": 1.0, "quantize.gguf": 1.0}.get(kind)
    if kind == "quantize.bnb":
        per_weight = 1.0 if params.mode == "int8" else NF4_BYTES
    if kind == "quantize.gptq":
        per_weight = params.bits / 8 + 0.1  # group scales and zero points
    if per_weight is None:
        return output.parameters * FP32
    return (output.parameters - linear) * FP32 + linear * per_weight


# --- a stage's estimate ---------------------------------------------------------------------


def estimate_stage_memory(
    stage: Any,
    params: BaseModel,
    parent: ModelShape,
    output: ModelShape,
    extras: tuple[ModelShape, ...] = (),
    device: str = "cpu",
    max_batch: int = 1,
) -> MemoryEstimate:
    """The stage's peak per process, by part, from its params and the shapes of its input(s) and output.

    ``stage`` is the pipeline's stage entry (its ``launch:`` block, if any, sets the world size and
    strategy); ``extras`` are the shapes of the other stages it reads (serve's draft);
    ``max_batch`` the serve stage's concurrent sequences (1: the stage decodes its check prompts
    one at a time); ``device`` where the stage runs ('cpu', 'cuda:N'), resolved from its request.
    """
    launch = getattr(stage, "launch", None)
    device = "cpu" if device == "cpu" else "cuda"
    parent_figures, output_figures = model_figures(parent), model_figures(output)
    train = training_of(stage.kind, params, launch, device, parent_figures.parameters)
    if stage.kind == "serve":
        context = SERVE_PROMPT_TOKENS + params.check_new_tokens + params.k
        parts = serving_parts(
            parent_figures, model_figures(extras[0]) if extras else parent_figures, max_batch, context
        )
    else:
        parts = ESTIMATORS.get(stage.kind, loaded_parts)(params, parent_figures, output_figures, train)
    if train is not None and device == "cpu":
        trained_model = output_figures if stage.kind in ("distill", "prune.structured") else parent_figures
        parts["allocator"] = allocator_overhead(parts, trained_model, train)
    load_peak, processes = 0.0, 1
    if train is not None and train.world > 1:
        if train.strategy == "fsdp":
            load_peak = parts.get("weights", 0) + parts.get("teacher", 0)
            parts = fsdp_shard(parts, parent_figures, train.world)
        processes = launch.nproc_per_node if device == "cpu" else 1
    estimate = MemoryEstimate(
        stage.id,
        stage.kind,
        device,
        {name: int(size) for name, size in parts.items() if size},
        processes,
        int(load_peak),
        training=train,
    )
    check = check_peak(stage, params, parent_figures, output_figures) if device == "cpu" else 0.0
    if check <= estimate.total:
        return estimate
    return dataclasses.replace(
        estimate,
        parts=estimate.parts | {"output_check": int((check - estimate.total) / processes)},
        notes=("the output checked beside its parent after the stage is the larger peak",),
    )


def training_of(kind: str, params: Any, launch: Any, device: str, parameters: int = 0) -> TrainPlan | None:
    """The training settings of a training stage, per process (None when it does not train).

    ``parameters``: the trained model's, which decide ``precision: auto`` on a GPU as training will.
    """
    from slimline.hardware import decide_precision

    if kind not in TRAINING_KINDS:
        return None
    settings = params.recovery if kind == "prune.structured" else params
    if settings is None:
        return None
    world = launch.world_size if launch is not None else 1
    rows = max(1, settings.batch_size // world)
    # auto is estimated as fp32 on a CPU: there it picks bf16 only after a micro-benchmark at training time
    bf16 = settings.precision == "bf16"
    if device == "cuda":  # the rule training applies (hardware.decide_precision), on a GPU with bf16
        step_size = parameters * rows * settings.sequence_length
        choice = decide_precision(
            settings.precision, cuda_bf16=True, native_bf16=False, bf16_slowdown=None, parameter_tokens=step_size
        )
        bf16 = choice.chosen == "bf16"
    return TrainPlan(
        batch_size=rows,
        sequence_length=settings.sequence_length,
        precision="bf16" if bf16 else "fp32",
        accumulation=settings.gradient_accumulation,
        world=world,
        strategy=launch.strategy if launch is not None else "none",
    )


def allocator_overhead(parts: Parts, model: ModelFigures, train: TrainPlan) -> float:
    """RSS above the live tensors on a CPU: ``ALLOCATOR_FACTOR - 1`` times the transient bytes glibc keeps in its heaps.

    Those are the decoder layers' activations and the gradients, where their tensors are under
    glibc's mmap ceiling (a large model's tensors are mapped and returned when freed); nothing
    when ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    if MMAP_ENV in os.environ:
        return 0.0
    width = max(model.hidden, model.intermediate)
    small_activations = train.tokens * width * ACTIVATION_BYTES[train.precision] < MMAP_CEILING
    layers = layer_activations(model, train.tokens, train.precision) if small_activations else 0.0
    small_gradients = max((i * o for _, i, o, _ in model.linears), default=0) * FP32 < MMAP_CEILING
    gradients = parts.get("gradients", 0.0) if small_gradients else 0.0
    return (ALLOCATOR_FACTOR - 1) * max(layers, gradients)


def fsdp_shard(parts: Parts, model: ModelFigures, world: int) -> Parts:
    """FSDP: weights, teacher, gradients and optimizer state divided by the world, plus two gathered units."""
    sharded = {"weights", "teacher", "fake_quant", "gradients", "optimizer_state"}
    shared = {name: size / world if name in sharded else size for name, size in parts.items()}
    shared["weights"] = shared.get("weights", 0) + 2 * model.largest_unit * FP32
    return shared


def check_peak(stage: Any, params: Any, parent: ModelFigures, output: ModelFigures) -> float:
    """Bytes of the runner's output check: the parent and the output loaded together (0: no check)."""
    from slimline.evaluate.output_check import floor_for

    check = stage.check
    if not check.enabled or floor_for(stage.kind, check.min_top1_agreement, check.max_kl) is None:
        return 0.0
    return parent.parameters * FP32 + output_bytes(stage.kind, params, output)


# --- free memory and the verdict ------------------------------------------------------------


def free_memory(device: str) -> int | None:
    """Free bytes of a device: CPU MemAvailable, or the least free CUDA device; ``SLIMLINE_MEMORY_BYTES`` overrides.

    None where it cannot be read (no /proc/meminfo and no psutil; a CUDA stage with no CUDA).
    """
    override = os.environ.get(MEMORY_ENV)
    if override is not None:
        try:
            return int(float(override))
        except ValueError:
            raise PreflightError(f"{MEMORY_ENV}={override!r}: expected a number of bytes, e.g. 16e9") from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        return min(torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count()))
    return cpu_available()


def cpu_available() -> int | None:
    """MemAvailable: memory the kernel can give without swapping (psutil where installed)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --- a pipeline's estimates -----------------------------------------------------------------


def stage_shapes(pipeline: Pipeline, model_source: Path) -> dict[str, ModelShape]:
    """Each stage's output shape (and the input's), walked as validation walks them: each kind's ``check_shape``.

    A distill stage's output is its student, a structured prune's the pruned model; the others keep
    their input's shape.
    """
    from slimline.models import checkpoint_shape

    shapes = {INPUT_ID: checkpoint_shape(model_source)}
    stages = {stage.id: stage for stage in pipeline.config.stages}
    for stage_id in topological_order(pipeline):
        parent = shapes[pipeline.parents[stage_id]]
        _, shapes[stage_id] = check_stage_shape(stages[stage_id].kind, pipeline.params[stage_id], parent)
    return shapes


def pipeline_estimates(pipeline: Pipeline, model_source: Path, stage_ids: list[str]) -> dict[str, MemoryEstimate]:
    """The estimates of the stages named, from the input checkpoint's config (``model_source``)."""
    shapes = stage_shapes(pipeline, model_source)
    stages = {stage.id: stage for stage in pipeline.config.stages}
    estimates = {}
    for stage_id in stage_ids:
        extras = tuple(shapes[other] for other in pipeline.extra_inputs.get(stage_id, []))
        parent = shapes[pipeline.parents[stage_id]]
        params = pipeline.params[stage_id]
        device = resolve_device(stages[stage_id].device, stage_spec(stages[stage_id].kind).device)
        estimates[stage_id] = estimate_stage_memory(stages[stage_id], params, parent, shapes[stage_id], extras, device)
    return estimates
