"""Hostile and malformed files behind the entry points: artifact folders, model folders, data files.

Each is refused with an error of slimline's hierarchy that names the file and what is wrong,
in bounded time and memory (a 1 GB line is never read whole; ``/dev/zero`` is never hashed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from slimline.artifacts import MANIFEST, find_reusable, hash_files, read_artifact, verify_artifact, write_json_atomic
from slimline.data import MAX_DATA_LINE_BYTES, load_texts, read_local_documents, source_fingerprint
from slimline.errors import ArtifactError, ConfigError
from slimline.models import load_causal_lm, load_tokenizer
from slimline.serve.folders import check_serving_folder
from slimline.sources import LocalData
from slimline.untrusted import json_depth

# -- artifact folders -----------------------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path: Path, tiny_model: Path) -> Path:
    """A finished 'hf' artifact: the tiny model's files and a manifest with their hashes."""
    folder = tmp_path / "stages" / "tuned"
    shutil.copytree(tiny_model, folder)
    write_json_atomic(folder / MANIFEST, {"files": hash_files(folder), "format": "hf", "key": "k", "stage": "tuned"})
    return folder


@pytest.mark.stage
def test_an_intact_artifact_verifies(artifact: Path) -> None:
    assert verify_artifact(artifact).format == "hf"
    check_serving_folder(artifact, "target")


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("truncate weights", "model.safetensors does not match its recorded sha256"),
        ("flip a byte", "model.safetensors does not match its recorded sha256"),
        ("delete weights", "model.safetensors is missing"),
        ("weights link outside", "model.safetensors is a symlink to"),
        ("extra link outside", "notes.txt is a symlink to"),
        ("manifest path escapes", "'../../secret' is not a path inside the artifact folder"),
        ("manifest names a device", "dev is not a regular file"),
    ],
)
@pytest.mark.stage
def test_an_altered_artifact_is_refused_with_every_problem(
    tmp_path: Path, artifact: Path, breakage: str, expected: str
):
    weights = artifact / "model.safetensors"
    manifest = json.loads((artifact / MANIFEST).read_text())
    if breakage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif breakage == "flip a byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif breakage == "delete weights":
        weights.unlink()
    elif breakage == "weights link outside":
        outside = tmp_path / "outside.safetensors"
        weights.rename(outside)
        weights.symlink_to(outside)
    elif breakage == "extra link outside":
        (artifact / "notes.txt").symlink_to("/etc/hostname")
    elif breakage == "manifest path escapes":
        manifest["files"]["../../secret"] = {"sha256": "0" * 64, "bytes": 0}
    elif breakage == "manifest names a device":
        (artifact / "dev").symlink_to("/dev/zero")
        manifest["files"]["dev"] = {"sha256": "0" * 64, "bytes": 0}
        manifest["format"] = "source"  # even where links may leave the folder, a device is never read
        manifest["model_path"] = str(artifact)
    write_json_atomic(artifact / MANIFEST, manifest)
    started = time.perf_counter()
    with pytest.raises(ArtifactError, match=r"does not match its artifact\.json") as caught:
        verify_artifact(artifact)
    assert expected in str(caught.value)
    assert time.perf_counter() - started < 10
    assert find_reusable(artifact, "k") is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "hf"}', "key: Field required"),
        ('{"format": "hf", "key": "k", "files": {"a": {"sha256": 1, "bytes": 2}}}', "files.a.sha256"),
        ('{"format": "hf", "key": "k", "files": []}', "files: Input should be a valid dictionary"),
        ("[" * 50_000, "JSON nested 50000 deep"),
    ],
)
def test_a_garbage_manifest_is_an_artifact_error(artifact: Path, manifest: str, expected: str) -> None:
    (artifact / MANIFEST).write_text(manifest)
    with pytest.raises(ArtifactError, match=r"artifact\.json") as caught:
        read_artifact(artifact)
    assert expected in str(caught.value)
    assert find_reusable(artifact, "k") is None  # the runner re-runs the stage instead of failing


@pytest.mark.stage
def test_truncated_weights_without_a_manifest_and_a_missing_tokenizer(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "plain"
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ArtifactError, match=r"cannot load the model: "):
        load_causal_lm(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ArtifactError, match="has no tokenizer"):
        load_tokenizer(folder)
    with pytest.raises(ArtifactError, match=r"target .* has no tokenizer"):
        check_serving_folder(folder, "target")
    (folder / "tokenizer.json").write_text("{garbage")
    with pytest.raises(ArtifactError, match="cannot load the tokenizer"):
        load_tokenizer(folder)


@pytest.mark.stage
def test_a_bin_only_checkpoint_and_a_missing_folder_are_refused_for_serving(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "bin"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match=r"pickled \.bin weights only"):
        check_serving_folder(folder, "target")
    with pytest.raises(ConfigError, match=r"pickled \.bin weights only"):
        load_causal_lm(folder)
    with pytest.raises(ArtifactError, match="no such folder"):
        check_serving_folder(tmp_path / "nope", "draft")


# -- data files -------------------------------------------------------------------------------------


def local(path: Path, **fields) -> LocalData:
    return LocalData(path=path, **fields)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "content", "fields", "expected"),
    [
        ("png.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, "not UTF-8 text (byte 0x89)"),
        ("nul.txt", b"text\x00more\n", {}, ":1:5: a NUL byte"),
        ("empty.txt", b"", {}, "the data file is empty"),
        ("blank.jsonl", b"\n  \n", {}, "the data file is empty"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', {}, "bad.jsonl:2:14: not UTF-8 text (byte 0xe9)"),
        ("cut.jsonl", b'{"text": "a"}\n{"text": "b\n', {}, "cut.jsonl:2:12: not valid JSON"),
        ("list.jsonl", b"[1, 2]\n", {}, "expected one JSON object per line, got list"),
        ("deep.jsonl", b"[" * 10_000 + b"\n", {}, "JSON nested 10000 deep"),
        ("field.jsonl", b'{"body": "a"}\n', {}, "record has no field 'text'"),
        ("tmpl.jsonl", b'{"a": "x"}\n', {"template": "{0}"}, "the template cannot be filled"),
        ("tmpl2.jsonl", b'{"a": "x"}\n', {"template": "{a.nope}"}, "the template cannot be filled"),
    ],
)
def test_a_malformed_data_file_names_file_line_and_column(
    tmp_path: Path, name: str, content: bytes, fields: dict, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_texts(local(path, **fields), tmp_path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.unit
def test_a_line_longer_than_the_bound_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "one-line.txt"
    path.write_bytes(b"a" * (MAX_DATA_LINE_BYTES + 10))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="a line longer than 16,777,216 bytes"):
        read_local_documents(path, None)
    assert time.perf_counter() - started < 5
    big = tmp_path / "big.jsonl"
    with big.open("wb") as handle:
        handle.truncate(1 << 30)  # one 1 GB line (of NUL bytes, sparse on disk)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="a line longer than"):
        read_local_documents(big, None)
    assert time.perf_counter() - started < 5
    assert len(source_fingerprint(local(path), tmp_path)) > 64  # hashed in blocks, never loaded whole


@pytest.mark.unit
def test_valid_data_still_reads_with_crlf_and_unicode_line_separators(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_bytes(b"first\r\nblock\r\n\r\nsecond\n")
    assert [text for _, text in read_local_documents(txt, None)] == ["first\nblock", "second\n"]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert [text for _, text in read_local_documents(jsonl, None)] == ["a\u2028b"]


@pytest.mark.unit
def test_json_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[[{{"}]}') == 3
    assert json_depth(b'"\\"[[[["') == 0
    assert json_depth(b"[" * 1000) == 1000
    assert json_depth(b'"unterminated [[[') == 0
    assert json_depth(b"") == 0


@pytest.mark.unit
def test_a_data_folder_file_over_the_bound_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    with (folder / "huge.txt").open("wb") as handle:
        handle.truncate(100 * 1024 * 1024)
    os.mkfifo(folder / "fifo.txt")  # not a regular file: skipped, never opened (it would block)
    with pytest.raises(ConfigError, match="larger than the 67,108,864-byte limit"):
        load_texts(local(folder, glob="*.txt"), tmp_path)
