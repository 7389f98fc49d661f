"""The built-in example model is a real trained model with a working tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimline.data import stdlib_documents
from slimline.models import BUILTIN_MODELS, load_causal_lm, load_tokenizer

pytestmark = pytest.mark.stage

FOLDER = BUILTIN_MODELS["stdlib-coder"]


def test_tokenizer_round_trips_held_out_source() -> None:
    tokenizer = load_tokenizer(FOLDER)
    for _, text in stdlib_documents("eval")[:5]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text) / 2, "BPE should compress code to well under 2 characters per token"


def test_held_out_perplexity_shows_a_trained_model() -> None:
    tokenizer, model = load_tokenizer(FOLDER), load_causal_lm(FOLDER)
    text = "\n".join(text for _, text in stdlib_documents("eval")[:3])
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:513])
    with torch.inference_mode():
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids[None, :-1]).logits[0], ids[1:])
    assert math.exp(loss.item()) < 80, "an untrained model would sit near the vocabulary size, 8192"
    record = json.loads((FOLDER / "training.json").read_text())
    assert record["held_out_perplexity_fp32"] < 60


def test_weights_are_safetensors_in_fp16_with_sizes_that_suit_every_backend() -> None:
    config = json.loads((FOLDER / "config.json").read_text())
    assert (FOLDER / "model.safetensors").exists() and not list(FOLDER.glob("*.bin"))
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0
    assert config["dtype"] == "float16"
