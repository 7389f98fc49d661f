"""Hostile and malformed input at the command line's entry points: one line `file: what is wrong`, exit 2, fast.

The pipeline file and ``--set`` overrides (validate), run folders (report, compare, gate) and
model folders named by a pipeline. Each case asserts the exit code, the message and, where the
input was built to be expensive, the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimline.cli import app
from slimline.config import load_pipeline
from slimline.errors import ConfigError
from tests.fuzz.samples import VALID_PIPELINE, alias_bomb, valid_manifest, valid_summary, write_run

runner = CliRunner()


def one_line(output: str) -> str:
    """Rich wraps nothing with soft_wrap, but join lines anyway to compare text."""
    return " ".join(output.split())


def refused(args: list[str]) -> str:
    """Run the CLI; assert exit 2 and return the message."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return one_line(result.output)


# -- the three cases of the issue, through a real subprocess ------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("folder", None, "is a folder, expected a pipeline file"),
        ("random.yaml", bytes(range(256)) * 8, "not UTF-8 text"),
        ("bomb.yaml", alias_bomb().encode(), "refused: more than 50,000 values with aliases expanded"),
    ],
)
def test_the_issues_three_inputs_get_one_line_and_exit_2(tmp_path: Path, name: str, content, expected: str) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "slimline.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "400"},
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), lines
    assert expected in lines[0]
    assert seconds < 30  # the interpreter's start; the refusal itself is timed below


@pytest.mark.unit
def test_the_alias_bomb_is_refused_in_well_under_a_second(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels=9, width=9))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expanded"):
        load_pipeline(path)
    assert time.perf_counter() - started < 1.0


# -- the pipeline file ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # size and encoding
        (b"name: x\n" + b"#" * 1_100_000, "larger than the 1,048,576-byte limit"),
        (b"name: caf\xe9\n", ":1:10: not UTF-8 text (byte 0xe9"),
        (b"name: x\x00\n", "not valid YAML"),
        # YAML bounds: nesting, aliases, recursion
        (b"a: " + b"[" * 5000, "nested more than 32 levels deep"),
        (b"a: &a [*a]\nname: x\n", "refers to a node that contains it"),
        (b"a: [" + b"1," * 60_000 + b"]\n", "more than 50,000 values"),
        # YAML that PyYAML composes but cannot build
        (b"seed: !!int abc\n", "not valid YAML"),
        (b"t: !!timestamp nope\n", "not valid YAML"),
        (b"? [a]\n: b\n", "unhashable key"),
        (b"a: 1\n---\nb: 2\n", "expected a single document"),
        (b"seed: " + b"9" * 5000 + b"\n", "not valid YAML"),
        # shapes pydantic refuses, located
        (b"- a list\n", "expected a mapping of pipeline fields"),
        (b"name: x\nmodel: " + b"a" * 5000 + b"\n", "model: not a usable path"),
        (b"name: [1, 2]\nmodel: builtin:stdlib-coder\n", "name: Input should be a valid string"),
    ],
)
def test_a_hostile_pipeline_file_is_one_refusal(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    message = refused(["validate", str(path)])
    assert message.startswith(f"error: {path}")
    assert expected in message


@pytest.mark.unit
def test_an_unreadable_path_is_refused(tmp_path: Path) -> None:
    assert "no such pipeline file" in refused(["validate", str(tmp_path / "missing.yaml")])
    assert "larger than" in refused(["validate", "/dev/zero"])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed", "expected dotted.key=value"),
        ("stages.x=1", "address a stage by its id"),
        ("stages.tuned.params.rank=[unclosed", "value 1:"),
        ("stages.tuned.params.rank=" + "[" * 100, "nested more than 32 levels deep"),
        ("seed=" + "x" * 70_000, "longer than 65,536 characters"),
        (".".join(["a"] * 40) + "=1", "more than 32 dotted parts"),
        ("name.inner=1", "name is not a mapping"),
        ("stages.nope.params.rank=1", "no stage with id 'nope'"),
        ("seed=!!int abc", "value 1: not valid YAML"),
    ],
)
def test_a_hostile_override_is_one_refusal(tmp_path: Path, override: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(VALID_PIPELINE)
    assert expected in refused(["validate", str(path), "--set", override])


# -- model folders named by a pipeline -------------------------------------------------------------


def model_folder(tmp_path: Path, tiny_model: Path, change: str) -> Path:
    """A copy of the tiny model with one thing broken."""
    folder = tmp_path / "model"
    folder.mkdir()
    for file in tiny_model.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    if change == "garbage config":
        (folder / "config.json").write_bytes(os.urandom(300))
    elif change == "config not an object":
        (folder / "config.json").write_text("[1, 2]")
    elif change == "too many layers":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100_000}))
    elif change == "bin only":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif change == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    elif change == "no config":
        (folder / "config.json").unlink()
    return folder


@pytest.mark.stage
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("garbage config", "not UTF-8 text"),
        ("config not an object", "expected a JSON object, got list"),
        ("too many layers", "num_hidden_layers = 100000 is outside 1..1024"),
        ("bin only", "pickled .bin weights only"),
        ("no tokenizer", "has no tokenizer"),
        ("no config", "has no config.json"),
    ],
)
def test_a_broken_model_folder_is_refused_at_validation(
    tmp_path: Path, tiny_model: Path, change: str, expected: str
) -> None:
    folder = model_folder(tmp_path, tiny_model, change)
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\nmodel: {folder}\n")
    started = time.perf_counter()
    assert expected in refused(["validate", str(path)])
    assert time.perf_counter() - started < 30


# -- run folders: report, compare, gate ------------------------------------------------------------


def broken_summary(change: str):
    """summary.json text or value with one thing wrong."""
    good = valid_summary()
    text = json.dumps(good)
    if change == "truncated":
        return text[: len(text) // 2]
    if change == "not an object":
        return "[1, 2, 3]"
    if change == "deep":
        return "[" * 100_000 + "]" * 100_000
    if change == "binary":
        return b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    if change == "perplexity is text":
        good["stages"][1]["metrics"]["accuracy"]["perplexity"] = "high"
    elif change == "stage without id":
        del good["stages"][1]["stage"]
    elif change == "stages is a dict":
        good["stages"] = {"a": 1}
    elif change == "duplicate stage":
        good["stages"].append(good["stages"][1])
    elif change == "bad release":
        good["release"] = {"candidate": "sparse", "max_kl": -1}
    elif change == "draft is a list":
        good["stages"][1] |= {"kind": "serve", "params": {"draft": ["x"]}}
    return good


SUMMARY_PROBLEMS = [
    ("truncated", "not valid JSON"),
    ("not an object", "expected a JSON object, got list"),
    ("deep", "JSON nested 100000 deep"),
    ("binary", "summary.json"),
    ("perplexity is text", "stages[1].metrics.accuracy.perplexity: Input should be a valid number"),
    ("stage without id", "stages[1].stage: Field required"),
    ("stages is a dict", "stages: Input should be a valid list"),
    ("duplicate stage", "duplicate stage ids ['sparse']"),
    ("bad release", "release.max_kl"),
    ("draft is a list", "params.draft is not a stage id"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("change", "expected"), SUMMARY_PROBLEMS)
@pytest.mark.parametrize("command", ["report", "gate", "compare"])
def test_a_broken_summary_is_one_refusal(tmp_path: Path, command: str, change: str, expected: str) -> None:
    run = write_run(tmp_path / "run", summary=broken_summary(change))
    args = [command, str(run)] + ([str(write_run(tmp_path / "good"))] if command == "compare" else [])
    message = refused(args)
    assert f"{run / 'summary.json'}" in message and expected in message


@pytest.mark.unit
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m.pop("seed"), "seed: Field required"),
        (lambda m: m["hardware"].pop("cpu"), "hardware.cpu: Field required"),
        (lambda m: m.update(libraries=[1]), "libraries: Input should be a valid dictionary"),
        (lambda m: m["pipeline"].update(config={}), "pipeline.config.evaluate: Field required"),
    ],
)
@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_broken_manifest_is_one_refusal(tmp_path: Path, command: str, change, expected: str) -> None:
    manifest = valid_manifest()
    change(manifest)
    run = write_run(tmp_path / "run", manifest=manifest)
    args = [command, str(run)] + ([str(write_run(tmp_path / "good"))] if command == "compare" else [])
    assert expected in refused(args)


@pytest.mark.unit
def test_missing_run_files_and_unwritable_outputs(tmp_path: Path) -> None:
    assert "no such run folder" in refused(["gate", str(tmp_path / "nope")])
    (tmp_path / "file").write_text("x")
    assert "not a folder" in refused(["report", str(tmp_path / "file")])
    assert "summary.json not found" in refused(["compare", str(tmp_path), str(tmp_path)])
    run = write_run(tmp_path / "run")
    assert "cannot write" in refused(["compare", str(run), str(run), "--md", str(tmp_path)])
    assert "cannot write" in refused(["gate", str(run), "--junit", str(tmp_path / "file" / "x.xml")])


@pytest.mark.unit
def test_a_valid_synthetic_run_folder_still_works(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    assert runner.invoke(app, ["gate", str(run)]).exit_code == 0
    assert runner.invoke(app, ["compare", str(run), str(run)]).exit_code == 0
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").exists()


# -- slimline serve: its folders and its limits ----------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        (None, [], "no such folder"),
        ("garbage manifest", [], "artifact.json:1:2: not valid JSON"),
        ("empty folder", [], "no such model config.json"),
        (None, ["--limit", "bogus=1"], "--limit bogus: Extra inputs are not permitted"),
        (None, ["--limit", "max_body_bytes=lots"], "--limit max_body_bytes: Input should be a valid integer"),
        (None, ["--limit", "idle_timeout_s"], "expected name=value"),
    ],
)
def test_serve_refuses_a_bad_folder_or_limit_before_loading(tmp_path: Path, setup, args, expected: str) -> None:
    folder = tmp_path / "target"
    if setup is not None:
        folder.mkdir()
    if setup == "garbage manifest":
        (folder / "artifact.json").write_text("{garbage")
    message = refused(["serve", str(folder), "--port", "1", *args])
    assert expected in message
