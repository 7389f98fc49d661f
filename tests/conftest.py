"""Shared fixtures: a tiny Llama model with a real BPE tokenizer, and pipeline files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimline.data import stdlib_documents

EOS = "<|endoftext|>"


def build_tiny_model(folder: Path, vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama with a byte-level BPE tokenizer trained on a few stdlib files."""
    texts = [text for _, text in stdlib_documents("train")[:40]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny HF checkpoint shared by the whole session (read-only by convention)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


TINY_EVALUATE = """\
evaluate:
  accuracy: {max_tokens: 256, window: 64}
  latency: {prompt_tokens: 16, new_tokens: 4, repeats: 1, warmup: 0}
"""


def write_pipeline(folder: Path, model: Path, stages: str, name: str = "tiny") -> Path:
    """A pipeline file over ``model`` with cheap evaluation settings and the given stages YAML."""
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {model}\n{TINY_EVALUATE}stages:\n{stages}")
    return path
