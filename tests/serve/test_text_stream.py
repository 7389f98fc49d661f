"""Incremental detokenisation: the streamed pieces add up to decoding every token at once."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slimline.data import stdlib_documents
from slimline.models import load_tokenizer
from slimline.serve.engine import TextStream

pytestmark = pytest.mark.unit

TEXTS = [
    "def add(a, b):\n    return a + b  # the sum\n\n\nclass Point:\n    x: int = 0\n",
    "naïve café, Straße — 日本語のテキスト 😀👍🏽 and ∑ x² ≤ ∞…",
    "  leading spaces, trailing spaces   \n\ttabs\tand  double  spaces ",
]


@pytest.fixture(scope="module")
def byte_level(tiny_model):
    """A byte-level BPE (GPT-2, SmolLM2 style): a rare character is split over several tokens."""
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style tokenizer (Llama 2 style): its decoder drops the space a decode starts with."""
    texts = [text for _, text in stdlib_documents("train")[:20]] + TEXTS
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


class CountingTokenizer:
    """A tokenizer that records how many ids each decode was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **options):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **options)


def stream_in_steps(tokenizer, ids: list[int], seed: int, stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """The pieces a TextStream emits for ``ids`` fed 1-5 tokens at a time, and whether it stopped."""
    chooser, stream, pieces, start = random.Random(seed), TextStream(tokenizer, stop), [], 0
    while start < len(ids):
        step = chooser.randint(1, 5)
        piece, stopped = stream.add(ids[start : start + step])
        pieces.append(piece)
        start += step
        if stopped:
            return pieces, True
    return [*pieces, stream.flush()], False


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_streamed_pieces_equal_the_whole_decode(kind, request) -> None:
    tokenizer = request.getfixturevalue(kind)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        for seed in range(5):
            pieces, stopped = stream_in_steps(tokenizer, ids, seed)
            assert "".join(pieces) == whole and not stopped
            assert not any("\ufffd" in piece for piece in pieces)  # no half character is ever sent


def test_each_step_decodes_a_few_tokens_not_the_whole_output(byte_level) -> None:
    ids = byte_level.encode(TEXTS[0] * 40, add_special_tokens=False)
    counting = CountingTokenizer(byte_level)
    pieces, _ = stream_in_steps(counting, ids, seed=0)
    assert len(ids) > 500 and "".join(pieces) == byte_level.decode(ids)
    assert max(counting.lengths) <= 10  # this step's tokens and the previous step's


def test_a_stop_sequence_split_over_steps_ends_the_text_before_it(byte_level) -> None:
    ids = byte_level.encode(TEXTS[0], add_special_tokens=False)
    whole = byte_level.decode(ids)
    for seed in range(5):
        pieces, stopped = stream_in_steps(byte_level, ids, seed, stop=("class Po",))
        assert stopped and "".join(pieces) == whole[: whole.index("class Po")]


def test_an_unfinished_character_at_the_end_is_flushed_as_a_replacement(byte_level) -> None:
    ids = byte_level.encode("ok 😀", add_special_tokens=False)
    stream = TextStream(byte_level, ())
    piece, _ = stream.add(ids[:-1])  # the emoji's last byte is missing
    assert piece == "ok " and stream.flush() == byte_level.decode(ids[:-1])[len("ok ") :]


def test_invalid_bytes_are_sent_as_replacements_but_the_last_waits(byte_level) -> None:
    lead_byte = byte_level.convert_tokens_to_ids("â")  # 0xE2 alone: starts a 3-byte character
    stream = TextStream(byte_level, ())
    pieces = [stream.add([lead_byte])[0] for _ in range(4)]
    # two lead bytes in a row: the first can never complete, so it is sent at once
    assert pieces == ["", "\ufffd", "\ufffd", "\ufffd"] and stream.flush() == "\ufffd"
