"""Artifacts: atomic publishing, manifests, integrity checks, leftovers of killed runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimline.artifacts import (
    find_reusable,
    hash_json,
    new_work_folder,
    publish,
    read_artifact,
    remove_leftovers,
    verify_files,
    write_json_atomic,
)
from slimline.errors import ArtifactError

pytestmark = pytest.mark.unit


def make_artifact(root: Path, key: str = "k1", payload: bytes = b"weights") -> Path:
    final = root / "stage"
    work = new_work_folder(final)
    (work / "model.bin").write_bytes(payload)
    publish(work, final, {"format": "hf", "stage": "stage", "key": key})
    return final


def test_publish_writes_manifest_with_hashes_and_leaves_no_temporary(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    artifact = read_artifact(final)
    assert artifact.manifest["files"]["model.bin"]["bytes"] == 7
    assert artifact.size_bytes() == 7
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_publish_replaces_an_older_artifact(tmp_path: Path) -> None:
    make_artifact(tmp_path, key="old", payload=b"old")
    final = make_artifact(tmp_path, key="new", payload=b"newer")
    assert read_artifact(final).key == "new"
    assert (final / "model.bin").read_bytes() == b"newer"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_reuse_needs_same_key_and_intact_files(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    assert find_reusable(final, "k1") is not None
    assert find_reusable(final, "other") is None
    (final / "model.bin").write_bytes(b"tampered")
    assert verify_files(read_artifact(final)) == ["model.bin does not match its recorded sha256"]
    assert find_reusable(final, "k1") is None


def test_folder_without_manifest_is_not_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.bin").write_bytes(b"x")
    assert find_reusable(tmp_path / "half", "k1") is None
    with pytest.raises(ArtifactError, match="not a finished artifact"):
        read_artifact(tmp_path / "half")


def test_leftovers_of_killed_runs_are_removed(tmp_path: Path) -> None:
    work = new_work_folder(tmp_path / "stage")
    (work / "partial").write_text("x")
    make_artifact(tmp_path)
    removed = remove_leftovers(tmp_path)
    assert [p.name for p in removed] == [work.name]
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_json_hash_is_order_independent_and_atomic_write_roundtrips(tmp_path: Path) -> None:
    assert hash_json({"a": 1, "b": 2}) == hash_json({"b": 2, "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'
    assert list(tmp_path.iterdir()) == [tmp_path / "x.json"]
