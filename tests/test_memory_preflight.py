"""Memory preflight: the estimates against real models and real training steps, and the refusal before any work."""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from slimline.cli import app
from slimline.config import LaunchConfig, StageConfig, load_pipeline
from slimline.distill import distill
from slimline.errors import PreflightError
from slimline.finetune import lora
from slimline.memory import (
    MEMORY_ENV,
    MMAP_ENV,
    TrainPlan,
    estimate_stage_memory,
    free_memory,
    lora_parts,
    model_figures,
    serving_parts,
    trained,
    training_activations,
)
from slimline.models import checkpoint_shape
from slimline.preflight import memory_problem, run_preflight
from slimline.stage import ModelShape
from slimline.training import causal_lm_loss
from tests.conftest import write_pipeline

# A Llama-2-7B-sized config: 6.7e9 parameters, 27 GB in float32.
SEVEN_B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)


@pytest.fixture(autouse=True)
def plain_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The formulas' tests compare live tensors: no glibc allocator part (tested on its own below)."""
    monkeypatch.setenv(MMAP_ENV, "131072")
    monkeypatch.delenv(MEMORY_ENV, raising=False)


def shape_of(config: LlamaConfig) -> ModelShape:
    return ModelShape(config.to_dict(), frozenset())


class LiveTensors(TorchDispatchMode):
    """The peak of live tensor bytes created under the mode (storages counted once, freed when collected)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.track(tensor.untyped_storage())
        return out

    def track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self.live or size == 0:
            return
        self.live[key] = size
        self.now += size
        self.peak = max(self.peak, self.now)

        def freed() -> None:
            if self.live.pop(key, None) is not None:
                self.now -= size

        weakref.finalize(storage, freed)


# --- the figures and formulas against the real thing ----------------------------------------


@pytest.mark.unit
def test_parameters_and_lora_adapters_match_the_real_model_and_peft(tiny_model: Path) -> None:
    from peft import get_peft_model

    figures = model_figures(checkpoint_shape(tiny_model))
    model = LlamaForCausalLM.from_pretrained(tiny_model)
    assert figures.parameters == sum(p.numel() for p in model.parameters())
    params = lora.Params(rank=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, lora.lora_config(params))
    adapters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    parts = lora_parts(params, figures, figures, TrainPlan(4, 64, "fp32"))
    assert parts["gradients"] == adapters * 4 and parts["optimizer_state"] == adapters * 8


@pytest.mark.unit
def test_kv_cache_formula_matches_a_real_cache(tiny_model: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_model)
    context = 96
    with torch.inference_mode():
        cache = model(input_ids=torch.zeros(2, context, dtype=torch.long), use_cache=True).past_key_values
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    figures = model_figures(checkpoint_shape(tiny_model))
    assert serving_parts(figures, figures, max_batch=2, context=context)["kv_cache"] == 2 * real  # target + draft


@pytest.mark.unit
@pytest.mark.parametrize(
    ("layers", "hidden", "kv_heads", "vocab", "batch"),
    [
        (2, 128, 2, 2048, 4),  # grouped-query attention
        (3, 128, 4, 4096, 6),  # vocabulary-heavy: the logits dominate
    ],
)
def test_activation_formula_bounds_the_live_tensors_of_a_training_step(
    layers: int, hidden: int, kv_heads: int, vocab: int, batch: int
) -> None:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    tokens = torch.randint(0, vocab, (batch, 129))
    with LiveTensors() as live:
        causal_lm_loss(model, tokens).backward()
    figures = model_figures(shape_of(config))
    train = TrainPlan(batch, 128, "fp32")
    parts = trained({"activations": training_activations(figures, train)}, figures.parameters, train, figures)
    estimate = max(parts["gradients"], parts["activations"])  # backward frees one as it makes the other
    assert 0.95 * live.peak <= estimate <= 1.3 * live.peak, (estimate, live.peak)


# --- estimates of whole stages ----------------------------------------------------------------


@pytest.mark.unit
def test_weights_alone_past_free_memory_are_refused_with_the_weights_named() -> None:
    stage = StageConfig(id="sparse", kind="prune.magnitude")
    params = stage_params("prune.magnitude", {})
    shape = shape_of(SEVEN_B)
    estimate = estimate_stage_memory(stage, params, shape, shape)
    assert estimate.parts["weights"] == model_figures(shape).parameters * 4
    problem = memory_problem(estimate, int(16e9), params)
    assert problem is not None
    assert "stage 'sparse' (prune.magnitude) needs about" in problem and "weights 27.0" in problem
    assert "16.0 GB are free" in problem and "more free memory" in problem


@pytest.mark.unit
def test_lora_over_a_base_too_large_is_pointed_at_qlora_and_the_output_check() -> None:
    shape = shape_of(SEVEN_B)
    params = lora.Params(batch_size=1, sequence_length=64)
    estimate = estimate_stage_memory(StageConfig(id="tuned", kind="lora"), params, shape, shape)
    problem = memory_problem(estimate, int(20e9), params)
    assert problem is not None and "quantize_base: nf4" in problem
    # nf4 validates only with bitsandbytes installed; the estimate only reads the field
    qlora = params.model_copy(update={"quantize_base": "nf4", "merge": False})
    unchecked = StageConfig(id="tuned", kind="lora", check={"enabled": False})
    small = estimate_stage_memory(unchecked, qlora, shape, shape)
    assert small.parts["weights"] < estimate.parts["weights"] / 5
    assert memory_problem(small, int(20e9), qlora) is None
    # checked, the adapter is loaded over a float32 base beside the float32 parent: 54 GB
    checked = estimate_stage_memory(StageConfig(id="tuned", kind="lora"), qlora, shape, shape)
    assert checked.total == pytest.approx(2 * model_figures(shape).parameters * 4, rel=0.01)
    assert "check: {enabled: false}" in memory_problem(checked, int(20e9), qlora)
    merged = estimate_stage_memory(unchecked, qlora.model_copy(update={"merge": True}), shape, shape)
    assert merged.total > estimate.parts["weights"]  # merging loads the float32 base beside the NF4 one


@pytest.mark.unit
def test_fsdp_divides_weights_gradients_and_optimizer_state_per_rank() -> None:
    teacher = shape_of(SEVEN_B)
    student = shape_of(LlamaConfig(**{**SEVEN_B.to_dict(), "num_hidden_layers": 8}))
    params = distill.Params(student={"layers": 8}, batch_size=8, sequence_length=128, precision="fp32")
    alone = estimate_stage_memory(StageConfig(id="draft", kind="distill"), params, teacher, student)
    launch = LaunchConfig(nproc_per_node=4, strategy="fsdp")
    stage = StageConfig(id="draft", kind="distill", launch=launch)
    on_gpus = estimate_stage_memory(stage, params, teacher, student, device="cuda:0")
    assert on_gpus.device == "cuda" and on_gpus.processes == 1
    assert on_gpus.parts["gradients"] == pytest.approx(alone.parts["gradients"] / 4, rel=1e-6)
    assert on_gpus.parts["optimizer_state"] == pytest.approx(alone.parts["optimizer_state"] / 4, rel=1e-6)
    assert on_gpus.parts["teacher"] == pytest.approx(alone.parts["teacher"] / 4, rel=1e-6)
    assert on_gpus.parts["activations"] == pytest.approx(alone.parts["activations"] / 4, rel=1e-6)  # 2 of 8 rows
    assert on_gpus.load_peak == alone.parts["weights"] + alone.parts["teacher"]  # the whole model, before sharding
    on_cpus = estimate_stage_memory(stage, params, teacher, student, device="cpu")
    assert on_cpus.device == "cpu" and on_cpus.total == 4 * on_cpus.per_process  # the ranks share the machine


@pytest.mark.unit
def test_the_allocator_part_follows_glibc_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = shape_of(LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, vocab_size=4096))
    params = lora.Params(batch_size=4, sequence_length=128)
    stage = StageConfig(id="tuned", kind="lora")
    assert "allocator" not in estimate_stage_memory(stage, params, shape, shape).parts
    monkeypatch.delenv(MMAP_ENV)
    parts = estimate_stage_memory(stage, params, shape, shape).parts
    assert parts["allocator"] > 0.5 * parts["activations"]


# --- free memory ------------------------------------------------------------------------------


@pytest.mark.unit
def test_free_memory_is_memavailable_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        available = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable"))
        assert abs(free_memory("cpu") - int(available.split()[1]) * 1024) < 2e9  # other work moves it meanwhile
    monkeypatch.setenv(MEMORY_ENV, "3.5e9")
    assert free_memory("cpu") == free_memory("cuda") == 3_500_000_000
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(PreflightError, match=MEMORY_ENV):
        free_memory("cpu")


# --- preflight, before any work ---------------------------------------------------------------

ABSURD_LORA = "  - id: tuned\n    kind: lora\n    params: {steps: 1, batch_size: 4096, sequence_length: 128}\n"


@pytest.mark.stage
def test_slimline_run_refuses_a_training_stage_that_cannot_fit_before_any_stage_runs(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MEMORY_ENV, "1e9")
    path = write_pipeline(tmp_path, tiny_model, "  - id: sparse\n    kind: prune.magnitude\n" + ABSURD_LORA)
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "stage 'tuned' (lora) needs about" in output
    assert "weights 0.00" in output and "gradients 0.00" in output and "activations" in output
    assert "1.0 GB are free" in output and "fix: batch_size 4096 ->" in output
    assert "stage 'sparse'" not in output  # the stage that fits is not named
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.stage
def test_allow_skip_skips_a_stage_that_cannot_fit(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MEMORY_ENV, "1e9")
    stages = ABSURD_LORA + "    allow_skip: true\n  - id: after\n    kind: prune.magnitude\n"
    skips = run_preflight(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run", tiny_model)
    assert list(skips) == ["tuned"] and "needs about" in skips["tuned"]


@pytest.mark.stage
def test_a_pipeline_that_fits_passes_and_logs_each_estimate(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stages = "  - id: tuned\n    kind: lora\n    params: {steps: 1}\n  - id: sparse\n    kind: prune.magnitude\n"
    with caplog.at_level(logging.INFO, logger="slimline.preflight"):
        skips = run_preflight(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run", tiny_model)
    assert skips == {}
    assert "memory: tuned (lora) needs about" in caplog.text and "memory: sparse (prune.magnitude)" in caplog.text


def stage_params(kind: str, raw: dict) -> object:
    from slimline.registry import stage_module

    return stage_module(kind).Params.model_validate(raw)
