"""quantize.gguf on tiny models: llama.cpp's converter and quantizer, scored back through llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimline.artifacts import read_artifact
from slimline.config import load_pipeline
from slimline.errors import ConfigError
from slimline.evaluate.backends import open_backend
from slimline.models import load_causal_lm
from slimline.preflight import missing_requirements
from slimline.quantize import gguf_converter
from slimline.runner import Runner
from tests.conftest import build_tiny_model, write_pipeline

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'slimline[gguf]')")
if gguf_converter.missing_converter():
    pytest.skip(
        f"llama.cpp's converter is not fetched: run `{gguf_converter.fetch_command()}`", allow_module_level=True
    )

pytestmark = pytest.mark.stage

STAGES = """\
  - id: f16
    kind: quantize.gguf
    params: {type: F16}
  - id: q8
    kind: quantize.gguf
    from: input
    params: {type: Q8_0}
  - id: q4km
    kind: quantize.gguf
    from: input
    params: {type: Q4_K_M}
  - id: q4km-imatrix
    kind: quantize.gguf
    from: input
    params: {type: Q4_K_M, imatrix: true, imatrix_samples: 4, imatrix_length: 64}
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose widths (256, 512) K-quants' 256-weight blocks divide."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden=256)


@pytest.fixture(scope="module")
def gguf_run(wide_model: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("gguf")
    outcome = Runner(load_pipeline(write_pipeline(folder, wide_model, STAGES)), folder / "run").run()
    return outcome, {result.stage_id: result for result in outcome.results}


def stage_metrics(results, stage: str) -> dict:
    return read_artifact(results[stage].artifact.path).manifest["stage_metrics"]


def test_every_type_converts_and_is_measured_through_llama_cpp(gguf_run) -> None:
    outcome, results = gguf_run
    assert outcome.ok, [(r.stage_id, r.reason) for r in outcome.results if r.status == "failed"]
    for stage in ("f16", "q8", "q4km", "q4km-imatrix"):
        artifact = read_artifact(results[stage].artifact.path)
        assert artifact.format == "gguf" and "model.gguf" in artifact.manifest["files"]
        assert not (artifact.path / "_build").exists()  # the 16-bit intermediate is gone
        report = results[stage].report
        assert report["backend"] == "llama.cpp"
        assert report["metrics"]["latency"]["decode_tokens_per_s"] > 0


def test_f16_gguf_logits_match_pytorch_and_the_cache(gguf_run, wide_model: Path) -> None:
    _, results = gguf_run
    model = load_causal_lm(wide_model)
    backend = open_backend(results["f16"].artifact)
    assert backend.parameter_count() == sum(p.numel() for p in model.parameters())
    prompt = torch.randint(1, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model(input_ids=prompt[None]).logits[0]
    full = backend.logits(prompt)
    assert full.shape == expected.shape and full.dtype == torch.float32
    assert (full - expected).abs().max() < 2e-2 * expected.abs().max()
    # prefill + cached decode steps give the same logits as the full sequence
    scale = 1e-2 * float(full.abs().max())
    assert torch.allclose(backend.prefill(prompt[:30]), full[29], atol=scale)
    for position in range(30, 40):
        assert torch.allclose(backend.decode(int(prompt[position])), full[position], atol=scale)
    backend.close()


def test_q8_0_stays_close_to_f16_and_k_quants_shrink(gguf_run) -> None:
    _, results = gguf_run
    accuracy = {stage: results[stage].report["metrics"]["accuracy"] for stage in ("f16", "q8", "q4km")}
    assert abs(accuracy["q8"]["perplexity"] / accuracy["f16"]["perplexity"] - 1) < 0.005
    assert accuracy["q8"]["kl_vs_input"] < 1e-3
    sizes = {stage: stage_metrics(results, stage) for stage in ("f16", "q8", "q4km")}
    assert sizes["q8"]["bits_per_weight"] == pytest.approx(8.5, abs=0.3)
    assert sizes["q4km"]["bits_per_weight"] < 6 < sizes["q8"]["bits_per_weight"]
    assert sizes["q4km"]["file_mb"] < sizes["q8"]["file_mb"] < sizes["f16"]["file_mb"]
    assert "Q4_K" in sizes["q4km"]["tensor_types"] and sizes["q8"]["gguf_type"] == "Q8_0"


def test_importance_matrix_reaches_the_quantizer(gguf_run) -> None:
    _, results = gguf_run
    metrics = stage_metrics(results, "q4km-imatrix")
    assert metrics["imatrix_tensors"] == 2 * 7  # every projection of both layers; the tied embedding has none
    assert "imatrix_tensors" not in stage_metrics(results, "q4km")
    agreement = results["q4km-imatrix"].report["metrics"]["accuracy"]["top1_agreement_with_input"]
    assert agreement > 0.8


def test_tokenizer_round_trip_is_identical_and_the_converter_named(gguf_run) -> None:
    _, results = gguf_run
    metrics = stage_metrics(results, "q8")
    assert metrics["tokenizer_roundtrip_identical"] == 1.0 and metrics["tokenizer_roundtrip_tokens"] > 1000
    assert metrics["pre_tokenizer"] == "gpt-2" and metrics["pre_tokenizer_declared"] is True
    assert len(metrics["converter"]["llama_cpp_commit"]) == 40


# --- widths K-quants' 256-weight blocks do not divide: llama.cpp's per-tensor fallback --------


@pytest.fixture(scope="module")
def narrow_run(tmp_path_factory: pytest.TempPathFactory):
    """Q4_K_M of a tiny Llama with hidden 384 (not a multiple of 256) and FFN 768 (3 x 256)."""
    folder = tmp_path_factory.mktemp("narrow")
    model = build_tiny_model(folder / "model", hidden=384)
    stages = "  - id: q4km\n    kind: quantize.gguf\n    params: {type: Q4_K_M}\n"
    outcome = Runner(load_pipeline(write_pipeline(folder, model, stages)), folder / "run").run()
    return outcome, {result.stage_id: result for result in outcome.results}


def test_q4_k_m_on_a_narrow_model_falls_back_per_tensor_and_loads(narrow_run) -> None:
    outcome, results = narrow_run
    assert outcome.ok, [(r.stage_id, r.reason) for r in outcome.results if r.status == "failed"]
    report = results["q4km"].report
    assert report["backend"] == "llama.cpp" and report["metrics"]["latency"]["decode_tokens_per_s"] > 0
    metrics = stage_metrics(results, "q4km")
    fallbacks = {f["name"]: f for f in metrics["fallback_tensors"]}
    # every matrix with rows of 384 falls back; ffn_down (rows of 768 = 3 x 256) keeps its K-quant
    assert set(fallbacks) == {
        f"blk.{layer}.{name}.weight"
        for layer in (0, 1)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")
    }
    for fallback in fallbacks.values():
        assert fallback["row_length"] == 384
        assert (fallback["wanted"], fallback["actual"]) in {("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")}
    assert sum(metrics["fallback_summary"].values()) == len(fallbacks)
    assert metrics["output_tensor_type"] == "Q8_0"  # llama.cpp's rule for an output tensor whose rows do not fit
    assert "Q4_K" in metrics["tensor_types"] or "Q6_K" in metrics["tensor_types"]  # the ffn_down tensors


def test_bits_per_weight_is_the_files_own(narrow_run) -> None:
    from gguf import GGUFReader

    _, results = narrow_run
    metrics = stage_metrics(results, "q4km")
    reader = GGUFReader(results["q4km"].artifact.path / "model.gguf")
    weights = sum(int(tensor.n_elements) for tensor in reader.tensors)
    assert metrics["bits_per_weight"] == pytest.approx(8 * sum(int(t.n_bytes) for t in reader.tensors) / weights)
    assert 4.5 < metrics["bits_per_weight"] < 8.5  # Q5_0/Q8_0 fallbacks, K-quants on ffn_down


def test_a_k_quant_without_fallbacks_reports_none(gguf_run) -> None:
    _, results = gguf_run
    metrics = stage_metrics(results, "q4km")  # the wide model: every row splits into 256-weight blocks
    assert metrics["fallback_tensors"] == [] and metrics["fallback_summary"] == {}


def test_failed_conversion_publishes_nothing(tmp_path: Path) -> None:
    # a byte-level BPE whose pre-tokenizer adds a prefix space is not GPT-2's: the converter does not
    # know its hash and slimline declares nothing, so the conversion fails
    model = build_tiny_model(tmp_path / "model", hidden=256)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["add_prefix_space"] = True
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    stages = "  - id: q8\n    kind: quantize.gguf\n    params: {type: Q8_0}\n"
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, model, stages)), tmp_path / "run").run()
    result = outcome.results[-1]
    assert result.status == "failed" and "pre-tokenizer was not recognized" in result.reason
    stages_dir = tmp_path / "run" / "stages"
    assert not any(path.name.startswith(".tmp-") for path in stages_dir.iterdir())
    # the failure report may be there; an artifact (manifest, model file) is not
    assert {path.name for path in (stages_dir / "q8").iterdir()} <= {"report.json", "report.md"}


# --- refused before any work -----------------------------------------------------------------


def refusal(tmp_path: Path, model: Path, params: str) -> str:
    stages = f"  - id: bad\n    kind: quantize.gguf\n    params: {params}\n"
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write_pipeline(tmp_path, model, stages))
    return str(caught.value)


def test_an_unknown_type_is_refused_with_the_known_ones(wide_model: Path, tmp_path: Path) -> None:
    message = refusal(tmp_path, wide_model, "{type: Q4_K_X}")
    assert "tiny.yaml:" in message and "params.type" in message and "'Q4_K_M'" in message


@pytest.mark.parametrize(
    ("hidden", "gguf_type"),
    [
        (64, "Q4_K_M"),  # rows of 64: K-quants fall back to 32-weight types
        (48, "Q4_0"),  # rows of 48: not even 32-weight blocks fit; llama.cpp writes those tensors in F16
    ],
)
def test_widths_the_blocks_do_not_divide_are_not_refused(hidden: int, gguf_type: str, tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "model", hidden=hidden)
    stages = f"  - id: q\n    kind: quantize.gguf\n    params: {{type: {gguf_type}}}\n"
    load_pipeline(write_pipeline(tmp_path, model, stages))  # llama.cpp falls back per tensor; nothing to refuse


def test_an_architecture_the_converter_lacks_is_refused(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "model", hidden=256)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    message = refusal(tmp_path, model, "{type: Q8_0}")
    assert "does not support the architecture ['MadeUpForCausalLM']" in message


def test_imatrix_with_a_float_type_is_refused(wide_model: Path, tmp_path: Path) -> None:
    assert "imatrix applies to quantized types" in refusal(tmp_path, wide_model, "{type: F16, imatrix: true}")


def test_preflight_names_the_fetch_command_without_the_converter(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SLIMLINE_CACHE", raising=False)  # it would win over XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reasons = missing_requirements("quantize.gguf")
    assert any(gguf_converter.fetch_command() in reason for reason in reasons)
