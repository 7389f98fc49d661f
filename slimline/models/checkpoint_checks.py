"""What can be wrong with a checkpoint folder before transformers touches it, in one sentence.

A model folder comes from outside (a pipeline's ``model:``, ``slimline serve TARGET``): its
``config.json`` may be garbage or describe a model too large to even build on the meta device,
its tokenizer may be missing, its weights may be pickled ``.bin`` files only (refused: unpickling
runs arbitrary code) or a truncated safetensors file. These checks read small files only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimline.untrusted import UntrustedInputError, read_json_file

# config.json is a few kB; some carry label maps or vocabularies of special tokens.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_CONFIG_DEPTH = 32
# Building a model on the meta device still creates every module: bound what drives their number.
MAX_MODEL_LAYERS = 1024
MAX_MODEL_EXPERTS = 1024
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
EXPERT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts")
# Files a saved tokenizer has at least one of (checkpoints on the hub all have tokenizer_config.json).
TOKENIZER_MARKERS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def read_model_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder as a dict; ``UntrustedInputError`` when it is missing or not an object."""
    config = read_json_file(folder / "config.json", MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, "model config.json")
    if not isinstance(config, dict):
        raise UntrustedInputError(f"{folder / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    return config


def config_size_problem(config: dict[str, Any]) -> str | None:
    """Why a config describes a model too large to build even without weights, or None."""
    for key, value in walk_items(config):
        if key in LAYER_KEYS and isinstance(value, int) and not 0 < value <= MAX_MODEL_LAYERS:
            return f"config.json: {key} = {value} is outside 1..{MAX_MODEL_LAYERS}"
        if key in EXPERT_KEYS and isinstance(value, int) and not 0 <= value <= MAX_MODEL_EXPERTS:
            return f"config.json: {key} = {value} is outside 0..{MAX_MODEL_EXPERTS}"
    return None


def walk_items(value: Any) -> list[tuple[str, Any]]:
    """Every (key, value) pair of nested dicts (a multimodal config nests its text model's config)."""
    pairs, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            pairs += [(str(key), inner) for key, inner in item.items()]
            stack += list(item.values())
        elif isinstance(item, list):
            stack += item
    return pairs


def weights_problem(folder: Path) -> str | None:
    """Why a folder has no loadable weights (none, or pickled ``.bin`` only), or None."""
    if any(folder.glob("*.safetensors")):
        return None
    if any(folder.glob("*.bin")):
        return (
            f"{folder} holds pickled .bin weights only; slimline loads .safetensors only (unpickling runs "
            "arbitrary code): convert it with transformers' save_pretrained(..., safe_serialization=True)"
        )
    return f"{folder} has no .safetensors weights"


def tokenizer_problem(folder: Path) -> str | None:
    """Why a folder has no tokenizer, or None."""
    if any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        return None
    return f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_MARKERS)}); save it beside the weights"


def checkpoint_problem(folder: Path, needs_weights: bool = True) -> str | None:
    """The first thing wrong with a checkpoint folder (config, size, weights, tokenizer), or None."""
    try:
        if not folder.is_dir():
            return f"{folder} is not a folder"
        config = read_model_config(folder)
    except UntrustedInputError as error:
        return str(error)
    except (OSError, ValueError) as error:  # a path the OS cannot even look up (too long, NUL byte)
        return f"{folder}: {error}"
    return (
        config_size_problem(config) or (weights_problem(folder) if needs_weights else None) or tokenizer_problem(folder)
    )
