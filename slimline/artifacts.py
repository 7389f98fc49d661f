"""Artifacts: folders with a manifest (``artifact.json``), written atomically, with lineage.

A stage writes into a temporary sibling folder; the runner then writes the manifest (last)
and renames the folder into place. A folder without a manifest, or whose files no longer
match their recorded sha256, is never taken for a finished artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimline.errors import ArtifactError, StageError

MANIFEST = "artifact.json"
# Files the runner writes beside an artifact's payload; they are not part of its content.
SIDE_FILES = {MANIFEST, "report.json", "report.md"}
FORMATS = ("hf", "peft", "torch-int8", "onnx", "gguf", "tensorrt", "source")


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


def read_artifact(folder: Path) -> Artifact:
    """Load a finished artifact's manifest; raise ArtifactError if there is none."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not a finished artifact")
    return Artifact(folder, json.loads(manifest_path.read_text()))


def verify_files(artifact: Artifact) -> list[str]:
    """Problems with an artifact's payload: missing files or sha256 mismatches (empty if intact)."""
    problems = []
    root = artifact.model_path if artifact.format == "source" else artifact.path
    for relative, entry in artifact.manifest["files"].items():
        path = root / relative
        if not path.exists():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{relative} does not match its recorded sha256")
    return problems


def find_reusable(folder: Path, key: str) -> Artifact | None:
    """The finished artifact at ``folder`` if it was made with ``key`` and is intact, else None."""
    if not (folder / MANIFEST).exists():
        return None
    artifact = read_artifact(folder)
    if artifact.key != key or verify_files(artifact):
        return None
    return artifact
