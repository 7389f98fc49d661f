"""What an artifact folder's ``config.json`` says about the checkpoint it holds or came from."""

from __future__ import annotations

import json
from pathlib import Path

from slimline.errors import ArtifactError


def checkpoint_context(folder: Path) -> int | None:
    """The context length an HF checkpoint's config.json declares (under any of its families' names), or None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def folder_context(folder: Path) -> int:
    """The context length of the checkpoint an exported graph came from (its config.json, copied beside it)."""
    context = checkpoint_context(folder)
    if context is None:
        raise ArtifactError(f"{folder / 'config.json'} declares no context length (max_position_embeddings)")
    return context
