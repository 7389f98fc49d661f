"""Every stage kind on each common decoder family: it runs, or validation refuses it naming the architecture.

The expectation is docs/stages.md's "Architecture support" table: these tests parse it, build a
tiny random checkpoint of each family, validate a pipeline with one stage of every kind on it
(through ``load_pipeline`` and the real ``slimline validate``) and run the kinds the table says
run, so the table and the code cannot drift apart.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
)
from typer.testing import CliRunner

from slimline.cli import app
from slimline.config import load_pipeline
from slimline.data import stdlib_documents
from slimline.distill.student import build_student, student_config
from slimline.errors import SlimlineError
from slimline.models import TOKENIZER_FILES
from slimline.quantize import bnb
from slimline.quantize.common import check_group_size, ffn_width
from slimline.registry import STAGES, stage_module
from slimline.runner import Runner
from slimline.stage import ModelShape
from tests.conftest import TINY_EVALUATE

DOC = Path(__file__).parents[1] / "docs" / "stages.md"

# The table's columns: a tiny config of each family (2 layers, hidden 64) and the class validation names.
DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
FAMILIES: dict[str, tuple[str, Callable[[dict], PretrainedConfig]]] = {
    "Llama": ("LlamaForCausalLM", lambda ids: LlamaConfig(num_key_value_heads=2, **DECODER, **ids)),
    "Mistral": (
        "MistralForCausalLM",
        lambda ids: MistralConfig(num_key_value_heads=2, sliding_window=128, **DECODER, **ids),
    ),
    "Qwen2": ("Qwen2ForCausalLM", lambda ids: Qwen2Config(num_key_value_heads=2, **DECODER, **ids)),
    "Phi-3": ("Phi3ForCausalLM", lambda ids: Phi3Config(num_key_value_heads=2, **DECODER, **ids)),
    # Gemma's heads need not span hidden_size: 4 heads x 32 = 128 on a width of 64 (as Gemma-7B's 16 x 256 on 3072).
    "Gemma": ("GemmaForCausalLM", lambda ids: GemmaConfig(num_key_value_heads=1, head_dim=32, **DECODER, **ids)),
    "GPT-2": ("GPT2LMHeadModel", lambda ids: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)),
    "GPT-NeoX": ("GPTNeoXForCausalLM", lambda ids: GPTNeoXConfig(**DECODER, **ids)),
}

# Cheap params of each kind; a stage's id is its kind with '-' for '.'.
PARAMS = {
    "lora": "{steps: 2, batch_size: 2, sequence_length: 32}",
    "prune.magnitude": "{pattern: 'n:m'}",
    "prune.structured": "{ffn_fraction: 0.5, head_fraction: 0.5, drop_layers: 1, round_to: 16, calibration_samples: 4, calibration_length: 32}",
    "distill": "{student: {layers: 1}, steps: 2, batch_size: 2, sequence_length: 32}",
    "quantize.ptq": "{mode: static, calibration_samples: 2, calibration_length: 32}",
    "quantize.qat": "{steps: 2, batch_size: 2, sequence_length: 32}",
    "quantize.gptq": "{group_size: 32, calibration_samples: 4, calibration_length: 32, batch_size: 2}",
    "quantize.bnb": "{mode: nf4}",
    "quantize.gguf": "{type: Q8_0, tokenizer_check_tokens: 300}",
    "export.onnx": "{check_tokens: 32, check_prompts: 1, check_new_tokens: 4}",
    "export.tensorrt": "{}",
    "serve": "{draft: distill, check_prompts: 1, check_new_tokens: 8}",
}
# What the table's notes tell a user to set for a family: the layers LoRA adapts, no ONNX Runtime fusions on GPT-2.
LORA_TARGETS = {
    "Phi-3": "[qkv_proj, o_proj, gate_up_proj, down_proj]",
    "GPT-2": "[c_attn, c_proj, c_fc]",
    "GPT-NeoX": "[query_key_value, dense, dense_h_to_4h, dense_4h_to_h]",
}
FAMILY_PARAMS = {
    **{
        (family, "lora"): f"{{steps: 2, batch_size: 2, sequence_length: 32, target_modules: {targets}}}"
        for family, targets in LORA_TARGETS.items()
    },
    ("GPT-2", "export.onnx"): "{optimize: false, check_tokens: 32, check_prompts: 1, check_new_tokens: 4}",
}
PARENTS = {"export.tensorrt": "export-onnx"}
# Kinds whose runs take ~10 s each here: run by the slow test.
SLOW_KINDS = ("export.onnx", "quantize.gptq")

cli = CliRunner()


def support_table() -> dict[str, dict[str, str]]:
    """docs/stages.md's architecture table: kind -> family -> cell ('runs (1)', 'refused (3)', ...)."""
    section = DOC.read_text().split("## Architecture support", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    assert header[1:] == list(FAMILIES), f"the table's columns are {header[1:]}, expected {list(FAMILIES)}"
    return {
        row[0].strip().strip("`"): dict(zip(header[1:], (cell.strip() for cell in row[1:]), strict=True))
        for row in rows[1:]
        if not set(row[0].strip()) <= {"-"}
    }


SUPPORT = support_table()


def status(kind: str, family: str) -> str:
    """The table's word for a kind on a family: runs, validates or refused."""
    return SUPPORT[kind][family].split()[0]


def stage_id(kind: str) -> str:
    """The id of the kind's stage in the test pipelines."""
    return kind.replace(".", "-")


@pytest.fixture(scope="module")
def family_models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random checkpoint of every family, all with the tiny model's BPE tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("families")
    ids = {"vocab_size": AutoConfig.from_pretrained(tiny_model).vocab_size, "bos_token_id": 0, "eos_token_id": 0}
    folders = {}
    for family, (_, make_config) in FAMILIES.items():
        torch.manual_seed(0)
        folder = root / family
        AutoModelForCausalLM.from_config(make_config({**ids, "pad_token_id": 0})).save_pretrained(folder)
        for name in TOKENIZER_FILES:
            if (tiny_model / name).exists():
                shutil.copy2(tiny_model / name, folder / name)
        folders[family] = folder
    (root / "text.txt").write_text("\n".join(text for _, text in stdlib_documents("train")[:40]))
    return folders


def write_pipeline(models: dict[str, Path], family: str, kinds: list[str], folder: Path, name: str) -> Path:
    """A pipeline over the family's model with one stage per kind, reading the small text file."""
    stages = "".join(
        f"  - {{id: {stage_id(kind)}, kind: {kind}, from: {PARENTS.get(kind, 'input')}, "
        f"params: {FAMILY_PARAMS.get((family, kind), PARAMS[kind])}}}\n"
        for kind in kinds
    )
    text = models[family].parent / "text.txt"
    data = f"data:\n  train: {{path: {text}}}\n  eval: {{path: {text}}}\n"
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {models[family]}\n{data}{TINY_EVALUATE}stages:\n{stages}")
    return path


def validation_problems(path: Path) -> dict[int, list[str]]:
    """The problems ``load_pipeline`` reports, by stage index (every one must be about a stage)."""
    try:
        load_pipeline(path)
    except SlimlineError as error:
        lines = str(error).splitlines()[1:]
    else:
        return {}
    problems: dict[int, list[str]] = {}
    for line in lines:
        match = re.search(r": stages\[(\d+)\]", line)
        assert match, f"a problem outside the stages: {line}"
        problems.setdefault(int(match[1]), []).append(line)
    return problems


@pytest.mark.unit
def test_the_table_has_every_kind_and_only_known_words() -> None:
    assert set(SUPPORT) == set(STAGES)
    for kind, cells in SUPPORT.items():
        for family, cell in cells.items():
            assert status(kind, family) in {"runs", "validates", "refused"}, f"{kind} / {family}: {cell!r}"


@pytest.mark.stage
@pytest.mark.parametrize("family", FAMILIES)
def test_validation_matches_the_table_and_refusals_name_the_architecture(
    family: str, family_models: dict[str, Path], tmp_path: Path
) -> None:
    kinds = list(PARAMS)
    path = write_pipeline(family_models, family, kinds, tmp_path, "every-kind")
    problems = validation_problems(path)
    architecture = FAMILIES[family][0]
    for index, kind in enumerate(kinds):
        if status(kind, family) == "refused":
            assert problems.get(index), f"the table says {kind} is refused on {family}; validation accepts it"
            for line in problems[index]:
                assert architecture in line, f"a refusal that does not name {architecture}: {line}"
        else:
            assert index not in problems, f"the table says {kind} {status(kind, family)} on {family}: {problems[index]}"
    result = cli.invoke(app, ["validate", str(path)])  # the real command: a message and exit code 2, no traceback
    assert result.exit_code == (2 if problems else 0), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


@pytest.mark.stage
@pytest.mark.parametrize("family", LORA_TARGETS)
def test_llama_named_lora_targets_are_refused_with_the_layers_the_model_has(
    family: str, family_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "lora.yaml"
    path.write_text(f"name: x\nmodel: {family_models[family]}\nstages:\n  - {{id: a, kind: lora}}\n")
    with pytest.raises(SlimlineError) as refused:
        load_pipeline(path)
    message = str(refused.value)
    assert "stages[0].params.target_modules" in message and FAMILIES[family][0] in message
    wanted = LORA_TARGETS[family].strip("[]").split(", ")
    assert all(f"'{name}'" in message for name in wanted), message


@pytest.mark.stage
def test_gpt2_onnx_export_with_the_optimizer_is_refused(family_models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "onnx.yaml"
    path.write_text(f"name: x\nmodel: {family_models['GPT-2']}\nstages:\n  - {{id: a, kind: export.onnx}}\n")
    with pytest.raises(SlimlineError, match=r"stages\[0\]\.params\.optimize: GPT2LMHeadModel: .*set optimize: false"):
        load_pipeline(path)


def run_kinds(models: dict[str, Path], family: str, kinds: list[str], folder: Path) -> None:
    """Run the kinds on the family's model through the runner; every stage must run (output check included)."""
    outcome = Runner(load_pipeline(write_pipeline(models, family, kinds, folder, "run")), folder / "run").run()
    results = {result.stage_id: result for result in outcome.results}
    failed = {kind: f"{results[stage_id(kind)].status}: {results[stage_id(kind)].reason}" for kind in kinds}
    assert {kind: why for kind, why in failed.items() if not why.startswith("ran")} == {}, family


@pytest.mark.stage
@pytest.mark.parametrize("family", FAMILIES)
def test_the_kinds_the_table_says_run_do_run(family: str, family_models: dict[str, Path], tmp_path: Path) -> None:
    kinds = [kind for kind in PARAMS if status(kind, family) == "runs" and kind not in SLOW_KINDS]
    run_kinds(family_models, family, kinds, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_slow_kinds_the_table_says_run_do_run(family: str, family_models: dict[str, Path], tmp_path: Path) -> None:
    kinds = [kind for kind in SLOW_KINDS if status(kind, family) == "runs"]
    run_kinds(family_models, family, kinds, tmp_path)


def shape_of(config: PretrainedConfig) -> ModelShape:
    """A ModelShape of a config (no layer names: enough for the config readers)."""
    return ModelShape(config.to_dict(), frozenset())


@pytest.mark.unit
def test_shape_reads_and_changes_through_the_config_class_aliases() -> None:
    shape = shape_of(GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128))
    assert "num_hidden_layers" not in shape.config
    assert (shape.setting("num_hidden_layers"), shape.setting("hidden_size")) == (4, 64)
    assert shape.setting("max_position_embeddings") == 128 and ffn_width(shape) == 256  # n_inner unset: 4 x hidden
    changed = shape.changed(num_hidden_layers=2)
    assert changed.config["n_layer"] == 2 and "num_hidden_layers" not in changed.config
    assert changed.setting("num_hidden_layers") == 2
    assert check_group_size(32, shape) == []
    assert "'hidden_size': 64" in check_group_size(128, shape)[0][1]


@pytest.mark.unit
def test_a_new_layer_count_keeps_per_layer_fields_consistent() -> None:
    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, use_sliding_window=True, max_window_layers=2
    )
    shape = shape_of(config)
    assert shape.config["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    fewer = shape.changed(num_hidden_layers=3)
    assert fewer.config["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"]
    assert fewer.config_object is not None and fewer.setting("num_hidden_layers") == 3


@pytest.mark.unit
def test_student_config_keeps_the_spaced_layers_types_and_builds() -> None:
    teacher = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        max_window_layers=2,
    )
    student = student_config(teacher, 2, None, None, None)
    assert student.layer_types == ["full_attention", "sliding_attention"]  # teacher layers 0 and 3
    assert (student.num_key_value_heads, student.num_hidden_layers) == (2, 2)
    AutoModelForCausalLM.from_config(student)


@pytest.mark.unit
def test_student_keeps_a_head_size_that_does_not_span_the_width() -> None:
    teacher = GemmaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
    )
    student = student_config(teacher, 2, None, None, None)
    assert (student.num_attention_heads, student.head_dim) == (4, 32)


@pytest.mark.unit
def test_gpt2_student_copies_spaced_teacher_blocks() -> None:
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64))
    config = student_config(teacher.config, 2, None, None, None)
    assert (config.n_layer, config.n_embd, config.n_inner) == (2, 32, None)
    student = build_student(teacher, config, init_from_teacher=True)
    assert torch.equal(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[3].attn.c_attn.weight)
    assert torch.equal(student.transformer.wpe.weight, teacher.transformer.wpe.weight)


@pytest.mark.unit
def test_bnb_4bit_refuses_widths_its_cpu_kernel_cannot_pack() -> None:
    narrow = shape_of(
        LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    )
    params = bnb.Params(mode="nf4")
    problems, _ = bnb.check_shape(params, narrow)
    assert problems and problems[0][1].startswith("llama: ") and "{'key/value width': 16}" in problems[0][1]
    assert bnb.check_shape(bnb.Params(mode="int8"), narrow)[0] == []


# The least params each kind validates with.
MINIMAL_PARAMS = {
    "lora": {"target_modules": ["q_proj"]},
    "prune.structured": {"drop_layers": 1},
    "distill": {"student": {"layers": 1}},
    "quantize.gguf": {"type": "Q8_0"},
    "serve": {"draft": "x"},
}


@pytest.mark.unit
def test_every_kind_checks_a_config_transformers_does_not_know_without_raising() -> None:
    shape = ModelShape({"num_hidden_layers": 2, "hidden_size": 64}, frozenset({"q_proj"}))
    for kind in STAGES:
        module = stage_module(kind)
        problems, _ = module.check_shape(module.Params.model_validate(MINIMAL_PARAMS.get(kind, {})), shape)
        assert all(isinstance(message, str) for _, message in problems), kind


@pytest.mark.unit
@pytest.mark.parametrize(
    "config",
    [
        '{"model_type": "no-such-family"}',
        '{"model_type": "qwen2", "num_hidden_layers": 1, "layer_types": ["full_attention", "full_attention"]}',
    ],
)
def test_a_config_transformers_cannot_build_is_refused_with_the_reason(config: str, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(config)
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\nmodel: {tmp_path / 'model'}\nstages:\n  - {{id: a, kind: prune.magnitude}}\n")
    with pytest.raises(SlimlineError, match="transformers cannot build a causal LM from"):
        load_pipeline(path)
