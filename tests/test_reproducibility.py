"""The run manifest: seed, versions, hardware and data hashes, written without running any stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from slimline.config import load_pipeline
from slimline.data import load_texts
from slimline.reproducibility import cpu_model, documents_sha256, gpu_info, read_manifest, write_manifest
from tests.conftest import write_pipeline

pytestmark = pytest.mark.stage


def local_pipeline(tmp_path: Path, tiny_model: Path) -> Path:
    (tmp_path / "eval.txt").write_text("def f():\n    return 1\n")
    path = write_pipeline(tmp_path, tiny_model, "  - id: sparse\n    kind: prune.magnitude\n", name="m")
    path.write_text(path.read_text() + "seed: 7\ndata: {eval: {path: eval.txt}}\n")
    return path


def test_manifest_records_seed_pipeline_versions_hardware_and_data(tiny_model: Path, tmp_path: Path) -> None:
    path = local_pipeline(tmp_path, tiny_model)
    pipeline = load_pipeline(path, ["seed=11"])
    manifest = write_manifest(tmp_path, pipeline, ["train"])
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest == read_manifest(tmp_path)
    assert manifest["seed"] == 11, "the override, not the file's seed"
    assert manifest["pipeline"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["pipeline"]["config"]["stages"][0]["id"] == "sparse"
    assert manifest["libraries"]["torch"] == torch.__version__ and "transformers" in manifest["libraries"]
    assert manifest["hardware"]["cpu"] == cpu_model() != ""
    assert manifest["hardware"]["gpus"] == gpu_info()
    eval_texts = load_texts(pipeline.config.data.eval, tmp_path)
    assert manifest["data"]["eval"]["sha256"] == documents_sha256(eval_texts)
    assert manifest["data"]["eval"]["documents"] == 1
    assert set(manifest["data"]) == {"eval", "train"}


def test_changed_data_changes_its_hash_and_a_known_hash_is_reused(tiny_model: Path, tmp_path: Path) -> None:
    path = local_pipeline(tmp_path, tiny_model)
    first = write_manifest(tmp_path, load_pipeline(path), [])["data"]["eval"]
    assert write_manifest(tmp_path, load_pipeline(path), [])["data"]["eval"] == first
    (tmp_path / "eval.txt").write_text("def g():\n    return 2\n")
    second = write_manifest(tmp_path, load_pipeline(path), [])["data"]["eval"]
    assert second["sha256"] != first["sha256"] and second["fingerprint"] != first["fingerprint"]
