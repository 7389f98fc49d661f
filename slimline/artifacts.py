"""Artifacts: folders with a manifest (``artifact.json``), written atomically, with lineage.

A stage writes into a temporary sibling folder; the runner then writes the manifest (last)
and renames the folder into place. A folder without a manifest, or whose files no longer
match their recorded sha256, is never taken for a finished artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimline.errors import ArtifactError, StageError
from slimline.untrusted import UntrustedInputError, read_json_file

log = logging.getLogger(__name__)

MANIFEST = "artifact.json"
# Files the runner writes beside an artifact's payload; they are not part of its content.
SIDE_FILES = {MANIFEST, "report.json", "report.md"}
FORMATS = ("hf", "peft", "torch-int8", "onnx", "gguf", "tensorrt", "source")
# artifact.json lists every payload file with its sha256: small, even for sharded checkpoints.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_DEPTH = 32


@dataclass
class Artifact:
    """A finished artifact: where it is and what its manifest says."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def format(self) -> str:
        """The artifact's format, one of FORMATS."""
        return self.manifest["format"]

    @property
    def key(self) -> str:
        """The cache key of the stage configuration that produced it."""
        return self.manifest["key"]

    @property
    def model_path(self) -> Path:
        """Where the model files are: the folder itself, or the source folder for the input model."""
        return Path(self.manifest.get("model_path") or self.path)

    @property
    def base_model_path(self) -> Path:
        """For a ``peft`` adapter: the folder of the model it applies to."""
        return Path(self.manifest["base_model_path"])

    def size_bytes(self) -> int:
        """Size on disk of the artifact's model files."""
        return sum(entry["bytes"] for entry in self.manifest["files"].values())


# Formats that hold a complete model a stage can load and transform.
FULL_MODEL_FORMATS = ("hf", "source")


def require_full_model(artifact: Artifact, kind: str) -> None:
    """Stages that transform weights need a full HF model, not an adapter or an exported graph."""
    if artifact.format not in FULL_MODEL_FORMATS:
        raise StageError(f"{kind} needs a full model as input; {artifact.manifest['stage']!r} is {artifact.format!r}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes}}`` for every payload file under ``folder``."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative in SIDE_FILES:
            continue
        files[relative] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def hash_json(value: Any) -> str:
    """Stable sha256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temporary file, fsync, then rename into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def new_work_folder(final: Path) -> Path:
    """A fresh temporary folder beside ``final`` for a stage to write into."""
    work = final.with_name(f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}")
    work.mkdir(parents=True)
    return work


def publish(work: Path, final: Path, manifest: dict[str, Any]) -> Artifact:
    """Write the manifest last, then swap ``work`` into ``final`` by renames."""
    manifest = {"files": hash_files(work), **manifest}  # a source artifact brings its own file list
    write_json_atomic(work / MANIFEST, manifest)
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{time.time_ns()}")
        final.rename(stale)
        work.rename(final)
        shutil.rmtree(stale)
    else:
        work.rename(final)
    return Artifact(final, manifest)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete temporary and stale folders a killed run left behind; return what was removed."""
    removed = []
    if folder.exists():
        for path in folder.iterdir():
            if path.is_dir() and path.name.startswith((".tmp-", ".stale-")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


class ManifestFileEntry(BaseModel):
    """One payload file in ``artifact.json``."""

    model_config = ConfigDict(strict=True, extra="allow")

    sha256: str = Field(description="Hex sha256 of the file's bytes.")
    bytes: int = Field(ge=0, description="Size of the file.")


class ManifestShape(BaseModel):
    """The fields of ``artifact.json`` that slimline reads, checked before they are used (unknown fields kept)."""

    model_config = ConfigDict(strict=True, extra="allow")

    format: str = Field(description="One of FORMATS, or a stage's own (serve).")
    key: str = Field(description="The cache key of the stage configuration.")
    files: dict[str, ManifestFileEntry] = Field(description="Payload files by relative path.")
    model_path: str | None = Field(None, description="The input model's folder (format source).")


def read_artifact(folder: Path) -> Artifact:
    """Load a finished artifact's manifest; ArtifactError if there is none or it is malformed (one line)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not a finished artifact")
    try:
        manifest = read_json_file(manifest_path, MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH, "artifact manifest")
        ManifestShape.model_validate(manifest)
    except UntrustedInputError as error:
        raise ArtifactError(str(error)) from error
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ArtifactError(f"{manifest_path}: {where}: {first['msg']} (truncated or hand-edited?)") from error
    return Artifact(folder, manifest)


def verify_files(artifact: Artifact) -> list[str]:
    """Problems with an artifact's payload: missing, unsafe or altered files (empty if intact).

    Each recorded path must stay inside the artifact (no absolute path, no ``..``), name a regular
    file (never a device or a pipe, which could be read forever) and, except for the input model's
    ``source`` artifact (a hub cache snapshot links into the cache's blobs), not be a symlink that
    leads out of the folder. Sizes are compared before any byte is hashed.
    """
    problems = []
    root = artifact.model_path if artifact.format == "source" else artifact.path
    for relative, entry in artifact.manifest["files"].items():
        problem = file_problem(root, relative, contained=artifact.format != "source")
        if problem:
            problems.append(problem)
        elif (root / relative).stat().st_size != entry["bytes"] or sha256_file(root / relative) != entry["sha256"]:
            problems.append(f"{relative} does not match its recorded sha256")
    if artifact.format != "source":
        problems += escaping_links(artifact.path, exclude=set(artifact.manifest["files"]))
    return problems


def file_problem(root: Path, relative: str, contained: bool) -> str | None:
    """Why ``root / relative`` is not a safe, present payload file, or None."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts:
        return f"{relative!r} is not a path inside the artifact folder"
    path = root / relative
    try:
        if not path.exists():
            return f"{relative} is missing"
        if contained and not path.resolve().is_relative_to(root.resolve()):
            return f"{relative} is a symlink to {path.resolve()}, outside the artifact folder"
        if not path.is_file():
            return f"{relative} is not a regular file"
    except (OSError, ValueError) as error:  # a symlink loop, a name the OS refuses
        return f"{relative} cannot be read: {error}"
    return None


def escaping_links(folder: Path, exclude: set[str]) -> list[str]:
    """Symlinks under ``folder`` (besides ``exclude``) that lead outside it: a loader would follow them."""
    problems = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink() and relative not in exclude and not path.resolve().is_relative_to(folder.resolve()):
            problems.append(f"{relative} is a symlink to {path.resolve()}, outside the artifact folder")
    return problems


def verify_artifact(folder: Path) -> Artifact:
    """An artifact folder checked before it is loaded: its manifest readable and every file intact.

    Raises ArtifactError naming every problem (altered or missing files, symlinks out of the folder).
    """
    artifact = read_artifact(folder)
    problems = verify_files(artifact)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ArtifactError(f"{folder} does not match its {MANIFEST}: {shown}")
    return artifact


def find_reusable(folder: Path, key: str) -> Artifact | None:
    """The finished artifact at ``folder`` if it was made with ``key`` and is intact, else None."""
    if not (folder / MANIFEST).exists():
        return None
    try:
        artifact = read_artifact(folder)
    except ArtifactError as error:
        log.warning("not reusing %s: %s", folder, error)
        return None
    if artifact.key != key or verify_files(artifact):
        return None
    return artifact
