"""Batched speculative greedy decoding equals each prompt's greedy completion alone, on every CPU runtime.

The same check as tests/serve/test_speculative.py (PyTorch), on a tiny target/draft pair exported
to ONNX (ONNX Runtime) and converted to GGUF (llama.cpp): ragged prompts decoded together at batch
sizes 1, 3 and 8, target-only and speculative.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from slimline.models import copy_tokenizer_files, load_causal_lm
from slimline.runtime import Feed, RuntimeModel
from slimline.serve.sampling import SamplingParams
from slimline.serve.speculative import (
    DecodeStats,
    DraftLength,
    generate_tokens,
    open_lane,
    prefill,
    speculative_round,
)
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.stage

NEW_TOKENS = 16
PROMPT_LENGTHS = [1, 45, 7, 12, 30, 3, 20, 9]


def onnx_folder(hf_folder: Path, folder: Path) -> Path:
    """The decoder graph of a tiny checkpoint, with its config (what an export.onnx artifact holds)."""
    from slimline.export.decoder_graph import export_decoder

    folder.mkdir()
    export_decoder(load_causal_lm(hf_folder), folder / "model.onnx", opset=18, external_data=False)
    shutil.copy(hf_folder / "config.json", folder / "config.json")
    copy_tokenizer_files(hf_folder, folder)
    return folder


def gguf_folder(hf_folder: Path, folder: Path) -> Path:
    """The checkpoint as an f16 GGUF, converted by llama.cpp's own converter."""
    from slimline.quantize import gguf_converter

    folder.mkdir()
    pre_tokenizer = gguf_converter.declared_pre_tokenizer(hf_folder)
    gguf_converter.convert(gguf_converter.find_converter(), hf_folder, folder / "model.gguf", "f16", pre_tokenizer)
    return folder


def open_pair(runtime: str, root: Path) -> tuple[RuntimeModel, RuntimeModel]:
    target_hf = build_tiny_model(root / "target-hf", layers=2, seed=0)
    draft_hf = build_tiny_model(root / "draft-hf", layers=1, seed=1)
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'slimline[onnx]')")
        from slimline.runtime.onnx_model import OnnxModel

        return (  # as the server opens a pair: the draft's idle threads sleep, the target's spin
            OnnxModel(onnx_folder(target_hf, root / "target")),
            OnnxModel(onnx_folder(draft_hf, root / "draft"), spinning=False),
        )
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'slimline[gguf]')")
    from slimline.quantize import gguf_converter
    from slimline.runtime.llama_cpp_model import LlamaCppModel

    if gguf_converter.missing_converter():
        pytest.skip(f"llama.cpp's converter is not fetched: run `{gguf_converter.fetch_command()}`")
    # as the server opens a target: then a lone lane's passes carry prompt-lookup guesses (steady shapes)
    serving = {"max_sequences": 8, "flash_attention": True, "unified_cache": False, "steady_shapes": True}
    return (
        LlamaCppModel(gguf_folder(target_hf, root / "target"), **serving),
        LlamaCppModel(gguf_folder(draft_hf, root / "draft"), **serving),
    )


@pytest.fixture(scope="module", params=["onnxruntime", "llama.cpp"])
def pair(request, tmp_path_factory: pytest.TempPathFactory):
    target, draft = open_pair(request.param, tmp_path_factory.mktemp(request.param.replace(".", "-")))
    yield target, draft
    target.close()
    draft.close()


def greedy_alone(target: RuntimeModel, prompt: list[int]) -> list[int]:
    tokens: list[int] = []
    for new in generate_tokens(target, None, prompt, SamplingParams(), None, torch.Generator()):
        tokens += new
        if len(tokens) >= NEW_TOKENS:
            return tokens[:NEW_TOKENS]
    return tokens


def decode_together(target: RuntimeModel, draft: RuntimeModel | None, prompts: list[list[int]], k: int) -> list:
    lanes = [open_lane(target, draft, p, SamplingParams(), torch.Generator()) for p in prompts]
    length = DraftLength(k, adaptive=False)
    active = list(lanes)
    while active:
        prefill(active, 16)  # small chunks: long prompts take several steps while the others decode
        ready = [lane for lane in active if lane.prefilled]
        if ready:
            speculative_round(target, draft, ready, k, length)
        for lane, prompt in zip(lanes, prompts, strict=True):
            if lane in active and len(lane.tokens) - len(prompt) >= NEW_TOKENS:
                active.remove(lane)
                lane.close()
    return [lane.tokens[len(prompt) :][:NEW_TOKENS] for lane, prompt in zip(lanes, prompts, strict=True)]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batched_greedy_equals_each_prompt_alone(pair, batch: int) -> None:
    target, draft = pair
    generator = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(1, 500, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS[:batch]]
    expected = [greedy_alone(target, p) for p in prompts]
    assert decode_together(target, None, prompts, 0) == expected
    assert decode_together(target, draft, prompts, 3) == expected


def test_the_server_opens_an_onnx_target_spinning_and_its_draft_yielding(tmp_path: Path) -> None:
    """Only the draft's idle threads sleep between passes (see ``onnx_model.open_session``)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'slimline[onnx]')")
    from slimline.serve.bundle import ServeBundle
    from slimline.serve.server import build_engine

    target = onnx_folder(build_tiny_model(tmp_path / "target-hf", layers=2, seed=0), tmp_path / "target")
    draft = onnx_folder(build_tiny_model(tmp_path / "draft-hf", layers=1, seed=1), tmp_path / "draft")
    engine = build_engine(ServeBundle(target, draft, k=3, adaptive=True), max_active=2)
    try:
        assert (spins(engine.target), spins(engine.draft)) == (True, False)
    finally:
        engine.shutdown(grace_seconds=0)


def spins(model: RuntimeModel) -> bool:
    """Whether an ONNX Runtime session's idle worker threads busy-wait (its default)."""
    options = model.session.get_session_options()
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # the entry was never set
        return True


def test_onnx_keeps_the_batch_caches_between_passes_over_the_same_rows(pair) -> None:
    """Decoding steps over the same rows reuse the last pass's caches; rejected tokens become hidden holes."""
    target, _ = pair
    if target.backend != "onnxruntime":
        pytest.skip("the kept batch is ONNX Runtime's (llama.cpp keeps its own cache)")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    expected = [greedy_alone(target, p)[:6] for p in prompts]
    sequences = [target.new_sequence() for _ in prompts]
    logits = target.forward([Feed(s, p, all_logits=False) for s, p in zip(sequences, prompts, strict=True)])
    tokens = [[int(row[-1].argmax())] for row in logits]
    kept = target.kept
    for _ in range(5):
        # feed the next token and a wrong guess after it, then drop the guess (a rejected proposal)
        logits = target.forward([Feed(s, [t[-1], 1]) for s, t in zip(sequences, tokens, strict=True)])
        assert target.kept is not kept and target.kept.holds(sequences)  # the presents of this pass, same rows
        kept = target.kept
        for sequence, row, generated in zip(sequences, logits, tokens, strict=True):
            sequence.truncate(sequence.length - 1)
            generated.append(int(row[0].argmax()))
    assert tokens == expected
    assert all(s.kept is target.kept for s in sequences) and target.kept.spare_columns >= 5  # the holes
    target.dissolve_kept()
    assert [s.past[0].shape[2] for s in sequences] == [s.length for s in sequences]
    for sequence in sequences:
        sequence.close()


def test_a_lone_greedy_lane_fills_the_free_slot_with_a_guess(pair) -> None:
    """On llama.cpp with steady shapes a lone lane's pass has room for a second token: a prompt-lookup
    guess takes it, and the output is still the target's greedy decoding."""
    target, _ = pair
    if not target.free_second_token:
        pytest.skip("only llama.cpp with steady shapes has a free second token")
    prompt = [5, 6, 7, 8, 9] * 6  # repetitive: lookup always finds a continuation
    stats = DecodeStats()
    tokens: list[int] = []
    for new in generate_tokens(target, None, prompt, SamplingParams(), None, torch.Generator(), stats):
        tokens += new
        if len(tokens) >= NEW_TOKENS:
            break
    assert stats.guesses > 0 and stats.proposed == 0  # guesses are not the draft model's proposals
    expected = decode_together(target, None, [prompt, [3, 4]], 0)[0]  # two lanes: no free slot, no guess
    assert tokens[:NEW_TOKENS] == expected


def test_a_serve_bundle_scores_windows_while_its_latency_lane_is_open(pair, tmp_path: Path) -> None:
    """The evaluator's speculative backend over this pair: accuracy windows and a decoding lane at once."""
    from slimline.evaluate.backends.speculative_backend import SpeculativeBackend
    from slimline.serve.bundle import ServeBundle, write_bundle

    target, draft = pair
    write_bundle(tmp_path, ServeBundle(target.folder, draft.folder, k=2, adaptive=False))
    backend = SpeculativeBackend(tmp_path)
    try:
        prompt = torch.tensor([5, 6, 7, 8, 9, 10])
        token = int(backend.prefill(prompt).argmax())
        scored = backend.logits(prompt)  # a second sequence on each model while the lane is open
        tokens = [token]
        for _ in range(6):
            tokens.append(int(backend.decode(tokens[-1]).argmax()))
    finally:
        backend.close()
    assert scored.shape[0] == len(prompt)
    assert tokens == greedy_alone(target, prompt.tolist())[: len(tokens)]


def test_onnx_prompt_passes_project_only_the_positions_asked_for(tmp_path: Path) -> None:
    """A prefill pass returns logits for each row's last position only, equal to the full pass's."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'slimline[onnx]')")
    from slimline.runtime.onnx_model import OnnxModel

    model = OnnxModel(onnx_folder(build_tiny_model(tmp_path / "hf", layers=2, seed=0), tmp_path / "graph"))
    assert model.keeps_positions
    shapes = []
    run = model.session.run
    model.session.run = lambda names, feeds: shapes.append(feeds["logit_positions"].shape) or run(names, feeds)
    prompts = [[5, 9, 13, 2, 7], [8, 3, 11]]
    last = model.forward([Feed(model.new_sequence(), p, all_logits=False) for p in prompts])
    every = model.forward([Feed(model.new_sequence(), p) for p in prompts])
    assert shapes == [(2,), (5,)]  # positions 4 and 2, then all five
    for row, prompt in enumerate(prompts):
        assert last[row].shape == (1, every[row].shape[1])
        assert torch.allclose(last[row][0], every[row][len(prompt) - 1], atol=1e-5)
