"""A GGUF file as the input model: converted once into an HF checkpoint whose tokenizer splits text as llama.cpp's.

The GGUFs are made here from a tiny HF model with llama.cpp's own converter (f16) and quantizer (Q8_0).
The tiny model's tokenizer isolates digits before GPT-2's split (SmolLM's pre-tokenizer), so its GGUF
says ``tokenizer.ggml.pre = smollm``: the case where transformers' rebuilt tokenizer differs from llama.cpp's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimline.artifacts import read_artifact
from slimline.config import load_pipeline
from slimline.models import check_model_source, gguf_source, load_causal_lm, load_tokenizer, resolve_model_source
from slimline.quantize import gguf_converter
from slimline.runner import Runner
from tests.conftest import build_tiny_model, write_pipeline

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'slimline[gguf]')")
if gguf_converter.missing_converter():
    pytest.skip(
        f"llama.cpp's converter is not fetched: run `{gguf_converter.fetch_command()}`", allow_module_level=True
    )

pytestmark = pytest.mark.stage

DIGIT_TRAP = "x = [\n        1,\n    22]  #        333\n"  # spaces before digits: split apart only by 'smollm'


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 64) whose tokenizer.json isolates digits first, as SmolLM's does."""
    folder = build_tiny_model(tmp_path_factory.mktemp("hf") / "model")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = gguf_source.DIGITS_THEN_GPT2
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.fixture(scope="module")
def gguf_files(hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model as an f16 GGUF (llama.cpp's converter) and a Q8_0 GGUF (llama.cpp's quantizer)."""
    from slimline.quantize.gguf import Params, quantize_file

    folder = tmp_path_factory.mktemp("gguf")
    f16, q8 = folder / "tiny-f16.gguf", folder / "tiny-q8_0.gguf"
    pre_tokenizer = gguf_converter.declared_pre_tokenizer(hf_model)
    assert pre_tokenizer == "smollm"
    gguf_converter.convert(gguf_converter.find_converter(), hf_model, f16, "f16", pre_tokenizer)
    quantize_file(f16, q8, Params(type="Q8_0"), None)
    return {"f16": f16, "q8_0": q8}


@pytest.fixture(autouse=True, scope="module")
def models_cache(tmp_path_factory: pytest.TempPathFactory):
    """Converted models go to a temporary cache, not the user's."""
    cache = tmp_path_factory.mktemp("cache") / "gguf-models"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_source, "models_cache", lambda: cache)
        yield cache


def test_a_gguf_file_validates_and_converts_once(gguf_files: dict[str, Path], models_cache: Path) -> None:
    stages = "  - id: q8\n    kind: quantize.gguf\n    params: {type: Q8_0}\n"
    load_pipeline(write_pipeline(gguf_files["q8_0"].parent, Path("tiny-q8_0.gguf"), stages))  # converts
    folder = resolve_model_source("tiny-q8_0.gguf", gguf_files["q8_0"].parent)
    assert folder.parent == models_cache and len(folder.name) == 64
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        path.name for path in folder.iterdir()
    }
    assert not [path.name for path in models_cache.iterdir() if path.name.startswith(".")]  # no temporary folder
    manifest = json.loads((folder / gguf_source.MANIFEST).read_text())
    assert manifest["pre_tokenizer"] == "smollm" and manifest["pre_tokenizer_carried"] is True
    assert manifest["dtype"] == "float32"  # a block type dequantizes exactly into float32
    assert manifest["tokenizer_roundtrip"]["tokenizer_roundtrip_identical"] == 1.0
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_source(str(gguf_files["q8_0"]), Path("/")) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again


def test_an_f16_gguf_keeps_float16_and_the_weights(gguf_files: dict[str, Path], hf_model: Path) -> None:
    folder = gguf_source.convert_gguf_source(gguf_files["f16"])
    converted, original = load_causal_lm(folder), load_causal_lm(hf_model)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    assert converted.config.tie_word_embeddings and converted.config.hidden_size == 64
    ids = torch.arange(1, 40)[None]
    with torch.inference_mode():
        expected, actual = original(input_ids=ids).logits, converted(input_ids=ids).logits
    assert (actual - expected).abs().max() < 1e-2 * expected.abs().max()  # f16 rounding of the weights only


def test_the_saved_tokenizer_splits_text_as_llama_cpp(gguf_files: dict[str, Path]) -> None:
    folder = gguf_source.convert_gguf_source(gguf_files["q8_0"])
    saved = json.loads((folder / "tokenizer.json").read_text())
    assert saved["pre_tokenizer"] == gguf_source.DIGITS_THEN_GPT2
    texts = [*gguf_source.roundtrip_texts(), DIGIT_TRAP]
    result = gguf_source.compare_with_llama_cpp(load_tokenizer(folder), gguf_files["q8_0"], texts)
    assert result["tokenizer_roundtrip_mismatches"] == 0, result["tokenizer_first_mismatch"]
    assert result["tokenizer_roundtrip_tokens"] > 10_000


def test_a_pipeline_from_a_gguf_makes_a_gguf_again(gguf_files: dict[str, Path], tmp_path: Path) -> None:
    stages = "  - id: q8\n    kind: quantize.gguf\n    params: {type: Q8_0, tokenizer_check_tokens: 4000}\n"
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, gguf_files["q8_0"], stages)), tmp_path / "run").run()
    assert outcome.ok, [(r.stage_id, r.reason) for r in outcome.results if r.status == "failed"]
    metrics = read_artifact(tmp_path / "run" / "stages" / "q8").manifest["stage_metrics"]
    assert metrics["pre_tokenizer"] == "smollm" and metrics["tokenizer_roundtrip_identical"] == 1.0


@pytest.mark.unit
def test_a_missing_gguf_file_is_named(tmp_path: Path) -> None:
    assert check_model_source("absent.gguf", tmp_path) == f"GGUF file {tmp_path / 'absent.gguf'} does not exist"
