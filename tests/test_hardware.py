"""The training precision chosen from the hardware: bf16 only where it is native and measured not slower."""

from __future__ import annotations

import pytest

from slimline.hardware import PrecisionChoice, choose_precision, decide_precision, has_native_bf16, has_vnni

# Flags read off the two kinds of CPU this project's machines have been.
AVX2_ONLY_EPYC = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2".split())
SAPPHIRE_RAPIDS = frozenset("avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_int8 amx_tile".split())
ZEN4_EPYC = frozenset("avx2 avx512f avx512_bf16 avx512_vnni avx_vnni".split())


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flags", "bf16", "vnni"),
    [
        (AVX2_ONLY_EPYC, False, False),
        (SAPPHIRE_RAPIDS, True, True),
        (ZEN4_EPYC, True, True),
    ],
)
def test_capability_flags(flags: frozenset[str], bf16: bool, vnni: bool) -> None:
    assert has_native_bf16(flags) is bf16
    assert has_vnni(flags) is vnni


@pytest.mark.unit
@pytest.mark.parametrize(
    ("requested", "native", "slowdown", "chosen", "reason_part"),
    [
        # auto on a CPU without native bf16: fp32, and the measured slowdown is named
        ("auto", False, 37.4, "fp32", "no AVX512-BF16 or AMX; bf16 matmul measured 37.40x"),
        # auto on a CPU with native bf16 that the micro-benchmark confirms
        ("auto", True, 0.55, "bf16", "native bf16"),
        # native flags, but the benchmark says bf16 is slower here: fp32
        ("auto", True, 1.8, "fp32", "native bf16 flags, but"),
        # explicit choices are kept; an explicit bf16 without native support says so
        ("bf16", False, 37.4, "bf16", "this CPU has no native bf16"),
        ("bf16", True, 0.5, "bf16", "as requested"),
        ("fp32", True, None, "fp32", "as requested"),
    ],
)
def test_cpu_precision_decision(
    requested: str, native: bool, slowdown: float | None, chosen: str, reason_part: str
) -> None:
    choice = decide_precision(requested, cuda_bf16=None, native_bf16=native, bf16_slowdown=slowdown)
    assert choice.chosen == chosen
    assert reason_part in choice.reason


@pytest.mark.unit
@pytest.mark.parametrize(
    ("requested", "cuda_bf16", "parameter_tokens", "chosen", "reason_part"),
    [
        ("auto", True, None, "bf16", "CUDA device with bf16"),
        ("auto", False, 1e13, "fp32", "without bf16"),
        # measured on an H200: 1.78B parameters x 1024 tokens ran 2.04x faster in bf16, 36M x 1024 0.59x
        ("auto", True, 1.78e9 * 1024, "bf16", "CUDA device with bf16"),
        ("auto", True, 3.6e7 * 1024, "fp32", "bound by kernel launches"),
        ("bf16", True, 3.6e7 * 1024, "bf16", "as requested"),
        ("fp32", True, 1e13, "fp32", "as requested"),
    ],
)
def test_cuda_precision_decision(
    requested: str, cuda_bf16: bool, parameter_tokens: float | None, chosen: str, reason_part: str
) -> None:
    choice = decide_precision(
        requested, cuda_bf16=cuda_bf16, native_bf16=False, bf16_slowdown=None, parameter_tokens=parameter_tokens
    )
    assert choice.chosen == chosen and reason_part in choice.reason


@pytest.mark.unit
def test_choice_on_this_machine_is_cached_and_recorded(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SLIMLINE_CACHE", str(tmp_path))
    choice = choose_precision("auto")
    assert isinstance(choice, PrecisionChoice)
    assert (tmp_path / "hardware.json").exists()  # the micro-benchmark ran once and was cached
    assert choice.bf16_slowdown is not None and choice.bf16_slowdown > 0
    assert choice.as_record()["chosen"] in ("bf16", "fp32")
    # bf16 is chosen only where it was measured no slower than float32
    assert choice.chosen == "fp32" or choice.bf16_slowdown <= 1.0


@pytest.mark.unit
def test_cache_folder_is_slimline_cache_then_xdg_then_home(tmp_path, monkeypatch) -> None:
    from slimline import cache_dir
    from slimline.data import token_cache_folder
    from slimline.models.gguf_source import models_cache
    from slimline.quantize.gguf_converter import converter_home

    monkeypatch.delenv("SLIMLINE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "slimline"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "slimline"
    monkeypatch.setenv("SLIMLINE_CACHE", str(tmp_path / "own"))
    # every cache of slimline moves with it
    assert [token_cache_folder(), models_cache(), converter_home("1.2.3")] == [
        tmp_path / "own" / "tokens",
        tmp_path / "own" / "gguf-models",
        tmp_path / "own" / "llama.cpp-1.2.3",
    ]


@pytest.mark.stage
def test_lora_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_why(tiny_model, tmp_path, monkeypatch) -> None:
    from slimline.config import load_pipeline
    from slimline.runner import Runner
    from tests.conftest import write_pipeline

    monkeypatch.setenv("SLIMLINE_CPU_FLAGS", " ".join(sorted(AVX2_ONLY_EPYC)))
    monkeypatch.setenv("SLIMLINE_CACHE", str(tmp_path / "cache"))
    stages = "  - id: tuned\n    kind: lora\n    params: {rank: 2, steps: 2, batch_size: 2, sequence_length: 32}\n"
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    assert outcome.ok
    precision = next(r for r in outcome.results if r.stage_id == "tuned").report["stage_metrics"]["precision"]
    assert precision["requested"] == "auto" and precision["chosen"] == "fp32"
    assert "no AVX512-BF16 or AMX" in precision["reason"]
