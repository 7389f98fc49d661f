"""Where a pipeline's text comes from: the data source types of the pipeline file.

A leaf module: ``config.py`` validates these fields and ``data.py`` reads what they name, and both
import them from here, so neither imports the other's module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LocalData(BaseModel):
    """A local ``.txt`` or ``.jsonl`` file, or a folder of text files (one document per file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="File or folder path, relative to the pipeline file.")
    glob: str = Field("**/*.txt", description="Folder only: which files are documents, e.g. '**/*.py'.")
    field: str | None = Field(None, description="jsonl only: the record field holding the text (default 'text').")
    template: str | None = Field(
        None,
        description="jsonl only: instruction data as text, e.g. '### user:\\n{prompt}\\n### assistant:\\n{response}' "
        "(fields in braces); replaces 'field'.",
    )
    split: Literal["train", "eval", "calibration", "all"] = Field(
        "all", description="Keep only this hash-based split of the file's documents."
    )


DataSource = str | LocalData
DATA_PREFIXES = ("builtin:", "hf:")
