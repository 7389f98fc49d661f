"""LlamaCppModel on a tiny GGUF made with llama.cpp's converter: batched rows against rows run alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slimline.errors import ArtifactError
from slimline.quantize import gguf_converter
from slimline.runtime.base import Feed
from slimline.runtime.llama_cpp_model import (
    MODEL_FILE,
    CacheFullError,
    LlamaCppModel,
    SequencesExhaustedError,
    chunks,
    llama_cpp_ubatches,
    open_gguf,
    steady_padding,
)
from tests.conftest import build_tiny_model

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'slimline[gguf]')")
if gguf_converter.missing_converter():
    pytest.skip(
        f"llama.cpp's converter is not fetched: run `{gguf_converter.fetch_command()}`", allow_module_level=True
    )

pytestmark = pytest.mark.stage

VOCAB = 512  # build_tiny_model's; its training context is 256
# A row batched with others, or placed after other sequences' cells, against the same row alone: its
# cells sit elsewhere in the shared cache, so attention sums in another order (and rounds the softmax
# to f16 for the f16 value cache differently). Measured max |diff| 1.4e-4 for logits up to 1.5 here;
# allowed: 1e-3 of the largest logit. Alone in an empty cache the logits are bit-identical.
RELATIVE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 64, 2 layers) as an f16 GGUF, converted by llama.cpp's own converter."""
    hf_model = build_tiny_model(tmp_path_factory.mktemp("hf") / "model")
    folder = tmp_path_factory.mktemp("gguf") / "tiny-f16"
    folder.mkdir()
    pre_tokenizer = gguf_converter.declared_pre_tokenizer(hf_model)
    gguf_converter.convert(gguf_converter.find_converter(), hf_model, folder / MODEL_FILE, "f16", pre_tokenizer)
    return folder


@pytest.fixture(scope="module")
def model(gguf_folder: Path):
    runtime = LlamaCppModel(gguf_folder, max_sequences=3)
    yield runtime
    runtime.close()


def tokens(count: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model: LlamaCppModel, ids: list[int]) -> torch.Tensor:
    """Logits of every position of ``ids`` fed to an empty sequence of its own."""
    return model.logits(torch.tensor(ids))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, logits within the tolerance, and the same top token wherever the top two are not within it."""
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    tolerance = RELATIVE_TOLERANCE * float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= tolerance
    top2 = expected.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * tolerance
    assert clear.float().mean() > 0.9  # the check below covers nearly every position
    assert torch.equal(actual.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_the_model_reports_what_it_holds(model: LlamaCppModel, gguf_folder: Path) -> None:
    assert (model.backend, model.name, model.max_batch) == ("llama.cpp", "tiny-f16", 3)
    assert model.forward([]) == []
    assert model.context_length == 256  # the training context
    assert model.cache_cells == 768  # a training context per sequence
    assert model.parameter_count() == VOCAB * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64


def test_ragged_rows_in_one_batch_match_each_row_alone(model: LlamaCppModel) -> None:
    # 630 tokens in all: past n_batch (512), so the batch is split and the last row spans two decodes
    prompts = [tokens(200, 1), tokens(250, 2), tokens(180, 3)]
    sequences = [model.new_sequence() for _ in prompts]
    try:
        rows = model.forward([Feed(s, p) for s, p in zip(sequences, prompts, strict=True)])
        assert [s.length for s in sequences] == [200, 250, 180]
    finally:
        for sequence in sequences:
            sequence.close()
    for row, prompt in zip(rows, prompts, strict=True):
        assert_close(row, alone(model, prompt))


def test_batched_decode_steps_match_single_sequence_decode(model: LlamaCppModel) -> None:
    prompts = [tokens(7, 4), tokens(30, 5), tokens(1, 6)]
    steps = [tokens(6, 7 + i) for i in range(3)]
    sequences = [model.new_sequence() for _ in prompts]
    try:
        last = model.forward([Feed(s, p, all_logits=False) for s, p in zip(sequences, prompts, strict=True)])
        decoded = [[row] for row in last]
        for position in range(6):
            rows = model.forward([Feed(s, [steps[i][position]], False) for i, s in enumerate(sequences)])
            for i, row in enumerate(rows):
                decoded[i].append(row)
    finally:
        for sequence in sequences:
            sequence.close()
    for i, prompt in enumerate(prompts):
        reference = model.new_sequence()
        try:
            expected = [reference.extend(prompt, all_logits=False)]
            expected += [reference.extend([token], all_logits=False) for token in steps[i]]
        finally:
            reference.close()
        assert_close(torch.cat(decoded[i]), torch.cat(expected))
        # and the cached steps are the full sequence's positions
        assert_close(torch.cat(decoded[i]), alone(model, prompt + steps[i])[len(prompt) - 1 :])


def test_truncate_then_extend_forgets_the_dropped_tokens(model: LlamaCppModel) -> None:
    kept, dropped, after = tokens(20, 8), tokens(15, 9), tokens(10, 10)
    sequence = model.new_sequence()
    try:
        sequence.extend(kept)
        sequence.extend(dropped)
        sequence.truncate(20)
        assert sequence.length == 20
        rows = sequence.extend(after)
    finally:
        sequence.close()
    assert_close(rows, alone(model, kept + after)[20:])
    fresh = model.new_sequence()
    try:
        with pytest.raises(ValueError, match="cannot truncate"):
            fresh.truncate(1)
    finally:
        fresh.close()


def test_sequences_are_independent(model: LlamaCppModel) -> None:
    prompt_a, prompt_b, next_b = tokens(40, 11), tokens(25, 12), tokens(1, 13)
    expected = alone(model, prompt_b + next_b)[-1:]
    a, b = model.new_sequence(), model.new_sequence()
    a.extend(prompt_a)
    b.extend(prompt_b)
    a.truncate(5)
    a.extend(tokens(9, 14))
    a.close()
    c = model.new_sequence()  # takes a's id again: none of a's cells may remain
    try:
        assert_close(c.extend(prompt_b), alone(model, prompt_b))
        assert_close(b.extend(next_b, all_logits=False), expected)
    finally:
        b.close()
        c.close()


def test_more_sequences_than_slots_are_refused_until_one_closes(model: LlamaCppModel) -> None:
    sequences = [model.new_sequence() for _ in range(3)]
    with pytest.raises(SequencesExhaustedError, match=r"all 3 sequences of tiny-f16 are open.*max_sequences"):
        model.new_sequence()
    sequences[1].close()
    sequences[1].close()  # twice is harmless
    sequences[1] = model.new_sequence()
    for sequence in sequences:
        sequence.close()
    with pytest.raises(ValueError, match="closed"):
        sequences[0].extend([1])


def old_llama_scoring(path: Path, ids: list[int]) -> torch.Tensor:
    """What the evaluator's Llama-based backend gave a window: one llama_decode with every position's logits."""
    import llama_cpp

    llama = open_gguf(path)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_decode(llama.ctx, batch) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llama.ctx), shape=(len(ids), llama.n_vocab()))
        return torch.from_numpy(logits.copy())
    finally:
        llama_cpp.llama_batch_free(batch)
        llama.close()


def test_window_logits_equal_the_old_llama_scoring(model: LlamaCppModel, gguf_folder: Path) -> None:
    window = tokens(256, 15)
    expected = old_llama_scoring(gguf_folder / MODEL_FILE, window)
    assert torch.equal(alone(model, window), expected)  # an empty cache, as the evaluator scores: bit-identical
    other = model.new_sequence()
    try:
        other.extend(tokens(100, 16))
        assert_close(alone(model, window), expected)  # after another sequence's cells
    finally:
        other.close()


def test_a_full_cache_is_a_clear_error_and_keeps_nothing(model: LlamaCppModel, gguf_folder: Path) -> None:
    small = LlamaCppModel(gguf_folder, max_sequences=2, cache_tokens=256)
    try:
        a, b = small.new_sequence(), small.new_sequence()
        a.extend(tokens(200, 17))
        with pytest.raises(CacheFullError, match=r"its 256 cells .* needed 130 more; .*larger cache_tokens"):
            small.forward([Feed(a, tokens(30, 18)), Feed(b, tokens(100, 19))])
        assert (a.length, b.length) == (200, 0)
        # the failed pass left no cells behind: 56 still fit, and both rows are what they would be alone
        rows = small.forward([Feed(a, tokens(6, 20)), Feed(b, tokens(50, 21))])
    finally:
        small.close()
    with pytest.raises(ValueError, match="closed"):
        small.new_sequence()
    assert_close(rows[0], alone(model, tokens(200, 17) + tokens(6, 20))[200:])
    assert_close(rows[1], alone(model, tokens(50, 21)))


def test_a_pass_failing_after_its_first_decode_keeps_nothing(model: LlamaCppModel, gguf_folder: Path) -> None:
    runtime = LlamaCppModel(gguf_folder, max_sequences=4, cache_tokens=768)
    try:
        a, b, c, d = (runtime.new_sequence() for _ in range(4))
        a.extend(tokens(250, 22))  # 518 cells left: the first 512-token decode fits, the second does not
        with pytest.raises(CacheFullError):
            runtime.forward([Feed(b, tokens(256, 23)), Feed(d, tokens(100, 24)), Feed(c, tokens(256, 25))])
        assert (b.length, c.length, d.length) == (0, 0, 0)
        rows = runtime.forward([Feed(c, tokens(200, 26)), Feed(b, tokens(60, 27))])
    finally:
        runtime.close()
    assert_close(rows[0], alone(model, tokens(200, 26)))
    assert_close(rows[1], alone(model, tokens(60, 27)))


def test_a_file_llama_cpp_cannot_read_is_an_artifact_error(tmp_path: Path) -> None:
    (tmp_path / MODEL_FILE).write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ArtifactError, match=r"llama\.cpp cannot load"):
        LlamaCppModel(tmp_path)
    with pytest.raises(ArtifactError, match=r"no model\.gguf"):
        LlamaCppModel(tmp_path / "missing")


def test_steady_shapes_give_a_row_the_same_logits_in_every_pass(gguf_folder: Path) -> None:
    """As the server opens it: one token per pass, several per pass, alone or among other rows: equal bits."""
    serving = LlamaCppModel(gguf_folder, max_sequences=4, flash_attention=True, unified_cache=False, steady_shapes=True)
    prompt, continuation = tokens(20, seed=7), tokens(6, seed=8)
    others = [tokens(n, seed=n) for n in (3, 11, 30)]

    def decode(per_pass: int, with_others: bool) -> torch.Tensor:
        sequence = serving.new_sequence()
        company = [serving.new_sequence() for _ in others] if with_others else []
        rows = serving.forward(
            [Feed(sequence, prompt, all_logits=False)]
            + [Feed(s, ids, all_logits=False) for s, ids in zip(company, others, strict=False)]  # none when alone
        )
        logits = [rows[0]]
        for start in range(0, len(continuation), per_pass):
            piece = continuation[start : start + per_pass]
            logits.append(serving.forward([Feed(sequence, piece)] + [Feed(s, piece) for s in company])[0])
        for s in [sequence, *company]:
            s.close()
        return torch.cat(logits)

    try:
        one_by_one = decode(1, with_others=False)
        assert torch.equal(decode(3, with_others=False), one_by_one)
        for batched in (decode(1, with_others=True), decode(6, with_others=True)):
            # Every decode step is bit-identical. The prompt's own logits, prefilled among other prompts,
            # may differ in the last bits (measured 3e-8 here): a prompt-sized pass's blocking follows its size.
            assert torch.equal(batched[1:], one_by_one[1:])
            assert torch.allclose(batched[:1], one_by_one[:1], rtol=0, atol=1e-6)
    finally:
        serving.close()


def test_no_decode_call_is_one_token_with_steady_shapes() -> None:
    assert chunks(1025, 512) == [(0, 512), (512, 512), (1024, 1)]
    assert chunks(1025, 512, steady=True) == [(0, 512), (512, 511), (1023, 2)]
    assert chunks(1, 512, steady=True) == [(0, 1)]
    assert chunks(600, 512, steady=True) == [(0, 512), (512, 88)]


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([(0, 1), (2, 1)], id="ids-with-a-gap"),
        pytest.param([(0, 4), (1, 3)], id="rows-of-4-and-3"),
        pytest.param([(0, 2), (1, 1)], id="rows-of-2-and-1"),
        pytest.param([(2, 3), (0, 1), (1, 5)], id="out-of-order-ragged"),
    ],
)
def test_steady_shapes_give_ragged_rows_their_alone_logits(gguf_folder: Path, layout: list[tuple[int, int]]) -> None:
    """Rows of unequal length or with gaps between sequence ids: each row's logits bit-equal to the row alone.

    llama.cpp cuts such a call into ubatches of consecutive ids and equal tokens per row; without
    padding some row's last piece is a one-token ubatch, which rounds differently.
    """
    serving = LlamaCppModel(gguf_folder, max_sequences=4, flash_attention=True, unified_cache=False, steady_shapes=True)
    try:
        sequences = [serving.new_sequence() for _ in range(3)]  # sequence ids 0, 1, 2
        prompts = [tokens(9 + 4 * index, seed=20 + index) for index in range(3)]
        for sequence, prompt in zip(sequences, prompts, strict=True):
            serving.forward([Feed(sequence, prompt, all_logits=False)])
        pieces = {seq_id: tokens(count, seed=30 + seq_id) for seq_id, count in layout}

        def pass_of(seq_ids: list[int]) -> list[torch.Tensor]:
            for seq_id in seq_ids:
                sequences[seq_id].truncate(len(prompts[seq_id]))
            return serving.forward([Feed(sequences[seq_id], pieces[seq_id]) for seq_id in seq_ids])

        batched = pass_of([seq_id for seq_id, _ in layout])
        for (seq_id, _), row in zip(layout, batched, strict=True):
            assert torch.equal(row, pass_of([seq_id])[0]), f"sequence {seq_id}"
    finally:
        serving.close()


def test_a_gap_in_sequence_ids_is_filled_and_the_fillers_leave_nothing(gguf_folder: Path) -> None:
    """Rows on sequences 0 and 3: throwaway rows on 1 (open, not in the pass) and 2 (free) make one ubatch.

    The rows get their alone logits, sequence 1 continues as if nothing had run on it, and the free
    id holds no cell afterwards.
    """
    serving = LlamaCppModel(gguf_folder, max_sequences=4, flash_attention=True, unified_cache=False, steady_shapes=True)
    try:
        sequences = [serving.new_sequence() for _ in range(4)]
        for index, sequence in enumerate(sequences):
            serving.forward([Feed(sequence, tokens(7 + index, seed=40 + index), all_logits=False)])
        sequences[2].close()
        step = tokens(1, seed=50)

        def next_logits(sequence) -> torch.Tensor:
            logits = serving.forward([Feed(sequence, step)])[0]
            sequence.truncate(sequence.length - 1)
            return logits

        before = next_logits(sequences[1])
        alone = [next_logits(sequences[0]), next_logits(sequences[3])]
        fillers = serving.gap_fillers([Feed(sequences[0], step), Feed(sequences[3], step)])
        assert [filler.sequence.seq_id for filler in fillers] == [1, 2]
        batched = serving.forward([Feed(sequences[3], step), Feed(sequences[0], step)])
        assert torch.equal(batched[0], alone[1]) and torch.equal(batched[1], alone[0])
        assert torch.equal(next_logits(sequences[1]), before)
        assert serving.api.llama_memory_seq_pos_max(serving.memory, 2) == -1  # the free id holds nothing
        assert serving.api.llama_memory_seq_pos_max(serving.memory, 1) == sequences[1].length - 1
    finally:
        serving.close()


@pytest.mark.unit
def test_the_ubatch_model_follows_llama_cpp_split_equal() -> None:
    # (row, first token, tokens): consecutive ids share a ubatch, each giving the fewest tokens any has left
    assert llama_cpp_ubatches([0, 1], [4, 3], 512) == [[(0, 0, 3), (1, 0, 3)], [(0, 3, 1)]]
    assert llama_cpp_ubatches([0, 2], [1, 1], 512) == [[(0, 0, 1)], [(1, 0, 1)]]
    # at most n_ubatch tokens a ubatch: 3 rows of 2 with n_ubatch 4 go one token per row at a time
    assert llama_cpp_ubatches([0, 1, 2], [2, 2, 2], 4) == [
        [(0, 0, 1), (1, 0, 1), (2, 0, 1)],
        [(0, 1, 1), (1, 1, 1), (2, 1, 1)],
    ]
    # a lone one-token piece gets a throwaway token; rows at their context's end get none
    assert steady_padding([0, 1], [4, 3], rooms=[8, 8], n_ubatch=512, spare=100) == [1, 0]
    assert steady_padding([0, 2], [1, 1], rooms=[8, 8], n_ubatch=512, spare=100) == [1, 1]
    assert steady_padding([0, 1], [2, 2], rooms=[8, 8], n_ubatch=512, spare=100) == [0, 0]
    assert steady_padding([0, 2], [1, 1], rooms=[0, 8], n_ubatch=512, spare=100) == [0, 1]


def test_the_cache_figure_from_gguf_metadata_is_what_llama_cpp_allocates(gguf_folder: Path) -> None:
    """The server's memory check reads a bare GGUF folder's cache size from the file's metadata."""
    import re

    from slimline.memory import serving_memory
    from slimline.runtime import gguf_cache_bytes_per_token, gguf_context
    from slimline.runtime.llama_cpp_model import collect_llama_cpp_log

    per_token = gguf_cache_bytes_per_token(gguf_folder / MODEL_FILE)
    assert per_token == 2 * 4 * (16 + 16) * 2  # layers x KV heads x (key + value length) x f16
    assert gguf_context(gguf_folder / MODEL_FILE) == 256
    cells = 16384
    with collect_llama_cpp_log() as lines:
        LlamaCppModel(gguf_folder, cache_tokens=cells).close()
    allocated = [float(m) for m in re.findall(r"KV buffer size =\s*([\d.]+) MiB", "".join(lines))]
    assert allocated and sum(allocated) * 2**20 == per_token * cells
    assert serving_memory([gguf_folder], max_active=2, context=256).cache_per_token == per_token
