"""The folders ``slimline serve`` is given, checked before anything loads: one line on what is wrong.

An artifact folder (with ``artifact.json``) must match its manifest: every file present with its
recorded size and sha256, no path or symlink leading out of the folder (``verify_artifact``). A
folder the server would load as a PyTorch checkpoint (a plain folder, an ``hf`` artifact, the
input model of a run) must hold a readable ``config.json`` of a buildable size, ``.safetensors``
weights and a tokenizer (``checkpoint_problem``). Loader failures that remain (a file truncated
in a folder without a manifest) are turned into ``ArtifactError`` by ``load_errors``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimline.artifacts import MANIFEST, verify_artifact
from slimline.errors import ArtifactError
from slimline.models.checkpoint_checks import checkpoint_problem, tokenizer_problem

# Formats the server opens through PyTorch: their folder must be a complete checkpoint.
TORCH_FORMATS = ("hf", "source", "torch-int8")


def check_serving_folder(folder: Path, role: str) -> None:
    """Refuse (ArtifactError) a ``role`` folder (target, draft) that is missing, altered or not loadable."""
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise ArtifactError(f"{folder}: {what}; give the {role} as an artifact folder (runs/<name>/stages/<id>)")
    fmt = "hf"
    checkpoint = folder
    if (folder / MANIFEST).exists():
        artifact = verify_artifact(folder)
        fmt, checkpoint = artifact.format, artifact.model_path
    elif (folder / "model.onnx").exists():
        fmt = "onnx"
    elif (folder / "model.gguf").exists():
        fmt = "gguf"
    if fmt == "serve":
        problem = None
    elif fmt == "gguf":  # the GGUF file carries its own config; the tokenizer files sit beside it
        problem = tokenizer_problem(checkpoint)
    else:
        problem = checkpoint_problem(checkpoint, needs_weights=fmt in TORCH_FORMATS)
    if problem:
        raise ArtifactError(f"{role} {problem}")


@contextmanager
def load_errors(folder: Path, role: str) -> Iterator[None]:
    """Turn a loader's failure on ``folder`` (a truncated weights or ONNX file, a broken config) into ArtifactError."""
    try:
        yield
    except ArtifactError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{role} {folder}: cannot be loaded: {' '.join(str(error).split())[:300]}") from error
    except Exception as error:
        # safetensors and onnxruntime raise their own Exception subclasses (SafetensorError, InvalidProtobuf)
        if type(error).__module__.startswith(("safetensors", "onnxruntime")):
            raise ArtifactError(f"{role} {folder}: cannot be loaded: {' '.join(str(error).split())[:300]}") from error
        raise
