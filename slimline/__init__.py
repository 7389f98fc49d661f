"""slimline: compress, export, measure and serve causal language models from one YAML file."""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    """Slimline's per-user cache folder: ``$SLIMLINE_CACHE``, else ``$XDG_CACHE_HOME/slimline`` (``~/.cache``)."""
    if os.environ.get("SLIMLINE_CACHE"):
        return Path(os.environ["SLIMLINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimline"
