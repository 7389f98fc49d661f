"""Deployment bundles: vLLM / llama-server / container launch files for a serve artifact's pair.

Artifacts are published the way the runner publishes them (``publish`` with the runner's manifest
fields and lineage). The lineage tests give exported artifacts a placeholder payload (``model.onnx``,
``model.gguf``): the bundle reads manifests and ``config.json``, never a graph or weights. The last
test converts two tiny checkpoints to real GGUF files and starts llama-server on them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import ValidationError

from slimline.artifacts import Artifact, hash_files, hash_json, new_work_folder, publish
from slimline.cli import app
from slimline.serve import deploy
from slimline.serve.deploy import DeployOptions, write_deployment
from tests.conftest import build_tiny_model
from tests.serve.server_helpers import free_port

pytestmark = pytest.mark.unit

VLLM = json.loads((Path(deploy.__file__).with_name("vllm_flags.json")).read_text())
LLAMA = json.loads((Path(deploy.__file__).with_name("llama_server_flags.json")).read_text())
KINDS = {"hf": "lora", "onnx": "export.onnx", "gguf": "quantize.gguf", "peft": "lora", "source": "input"}


# --- a run folder, published as the runner publishes ---------------------------------------


def publish_artifact(
    run: Path, stage: str, fmt: str, payload: Path | dict[str, str], parents: list[Artifact], **fields
) -> Artifact:
    """An artifact in ``run`` with the runner's manifest fields; ``payload`` a folder to copy or files to write."""
    final = run / "input" if stage == "input" else run / "stages" / stage
    final.parent.mkdir(parents=True, exist_ok=True)
    work = new_work_folder(final)
    if isinstance(payload, Path):
        shutil.copytree(payload, work, dirs_exist_ok=True)
    else:
        for name, text in payload.items():
            (work / name).write_text(text)
    manifest = {
        "format": fmt,
        "stage": stage,
        "kind": KINDS[fmt],
        "key": hash_json([stage, fmt, [parent.key for parent in parents]]),
        "params": {},
        "parents": [{"stage": p.manifest["stage"], "key": p.key, "path": str(p.path)} for p in parents],
        "seed": 0,
        "created": "2026-01-01T00:00:00+00:00",
        **fields,
    }
    return publish(work, final, manifest)


def exported(model: Path, graph: str) -> dict[str, str]:
    """An export's payload: the checkpoint's config.json and a placeholder graph file."""
    return {"config.json": (model / "config.json").read_text(), graph: "placeholder: never read by the bundle"}


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    """input (source) -> tuned (hf) -> onnx, gguf-f16, gguf-q8, adapter; tuned -> draft (hf) -> draft-onnx, draft-gguf."""
    root = tmp_path_factory.mktemp("deploy") / "runs" / "tiny"
    draft_model = build_tiny_model(tmp_path_factory.mktemp("draft") / "model", layers=1, seed=1)
    made: dict[str, Artifact] = {}
    made["input"] = publish_artifact(
        root, "input", "source", {}, [], files=hash_files(tiny_model), model_path=str(tiny_model)
    )
    made["tuned"] = publish_artifact(root, "tuned", "hf", tiny_model, [made["input"]])
    made["draft"] = publish_artifact(root, "draft", "hf", draft_model, [made["tuned"]])
    made["onnx"] = publish_artifact(root, "onnx", "onnx", exported(tiny_model, "model.onnx"), [made["tuned"]])
    made["draft-onnx"] = publish_artifact(
        root, "draft-onnx", "onnx", exported(draft_model, "model.onnx"), [made["draft"]]
    )
    for stage, bits in (("gguf-q8", 8.5), ("gguf-f16", 16.0)):
        made[stage] = publish_artifact(
            root, stage, "gguf", {"model.gguf": "placeholder"}, [made["tuned"]], stage_metrics={"bits_per_weight": bits}
        )
    made["draft-gguf"] = publish_artifact(root, "draft-gguf", "gguf", {"model.gguf": "placeholder"}, [made["draft"]])
    made["adapter"] = publish_artifact(root, "adapter", "peft", {"adapter_config.json": "{}"}, [made["tuned"]])
    stale = publish_artifact(root, "stale-onnx", "onnx", exported(tiny_model, "model.onnx"), [made["tuned"]])
    stale.manifest["parents"][0]["key"] = "0" * 64  # as if tuned had been re-run with other params since
    made["stale-onnx"] = stale
    return made


def bundle(run: dict[str, Artifact], target: str, draft: str | None, **options) -> tuple[Path, dict]:
    """write_deployment into a fresh serve work folder of the run, as the serve stage calls it."""
    folder = new_work_folder(run["tuned"].path.parent / "server")
    summary = write_deployment(folder, run[target], run[draft] if draft else None, DeployOptions(**options), k=5)
    return folder / "deploy", summary


def command_tokens(script: Path) -> list[str]:
    """The argv of the script's ``exec`` line (continuations joined), as the shell splits it."""
    text = script.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("exec "))
    return shlex.split(line)[1:]


def option_values(tokens: list[str]) -> dict[str, str | None]:
    """``{flag: value}``; a flag followed by another flag (or nothing) has None."""
    values = {}
    for index, token in enumerate(tokens):
        if token.startswith("-"):
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            values[token] = None if following is None or following.startswith("-") else following
    return values


# --- vLLM ------------------------------------------------------------------------------------


def test_vllm_files_use_only_what_the_pinned_parser_accepts(run) -> None:
    deploy_dir, _ = bundle(run, "tuned", "draft", tensor_parallel_size=2, dtype="bfloat16")
    tokens = command_tokens(deploy_dir / "vllm.sh")
    assert tokens[:3] == ["vllm", "serve", "./stages/tuned"]
    values = option_values(tokens)
    assert set(values) <= set(VLLM["flags"]), set(values) - set(VLLM["flags"])
    assert values["--tensor-parallel-size"] == "2" and values["--dtype"] == "bfloat16"
    assert values["--max-model-len"] == "256"  # the target's context
    speculative = json.loads(values["--speculative-config"])
    assert speculative == {"model": "./stages/draft", "num_speculative_tokens": 5, "method": "draft_model"}
    assert set(speculative) <= set(VLLM["speculative_config_fields"])
    assert speculative["method"] in VLLM["speculative_methods"] and values["--dtype"] in VLLM["dtype_choices"]
    config = yaml.safe_load((deploy_dir / "vllm.yaml").read_text())
    assert {f"--{key}" for key in config} <= set(VLLM["flags"])
    assert config["model"] == "./stages/tuned" and config["speculative-config"] == speculative
    # the command and the config file say the same
    assert {f"--{key}" for key in config if key != "model"} == set(values)


def test_exported_sides_resolve_to_the_checkpoints_they_came_from(run) -> None:
    deploy_dir, summary = bundle(run, "onnx", "draft-onnx")
    tokens = command_tokens(deploy_dir / "vllm.sh")
    assert tokens[2] == "./stages/tuned"
    assert json.loads(option_values(tokens)["--speculative-config"])["model"] == "./stages/draft"
    assert "onnx <- tuned" in (deploy_dir / "vllm.sh").read_text()
    assert summary["sides"]["target"] == {
        "stage": "onnx",
        "format": "onnx",
        "hf_checkpoint": "./stages/tuned",
        "gguf": "./stages/gguf-f16/model.gguf",  # the least lossy GGUF export of the same checkpoint
    }
    assert summary["sides"]["draft"]["gguf"] == "./stages/draft-gguf/model.gguf"
    assert summary["not_applicable"] == {}
    assert sorted(summary["deploy_files"]) == sorted(
        ["vllm.sh", "vllm.yaml", "llama-server.sh", "Dockerfile", "docker-build.sh", "README.md"]
    )


def test_the_input_model_is_written_as_its_absolute_path(run, tiny_model: Path) -> None:
    deploy_dir, _ = bundle(run, "input", "draft")
    assert command_tokens(deploy_dir / "vllm.sh")[2] == str(tiny_model.resolve())


@pytest.mark.parametrize(
    ("target", "draft", "refused", "reason"),
    [
        # no HF checkpoint to give vLLM
        ("adapter", "draft", "vllm.sh", "'adapter' is a 'peft' artifact.*merge the adapter"),
        ("stale-onnx", "draft", "vllm.sh", "parent 'tuned' of 'stale-onnx' was rebuilt"),
        # both sides are the same checkpoint
        ("onnx", "tuned", "vllm.sh", r"resolve to the same model \('tuned'\)"),
        ("gguf-f16", "gguf-q8", "vllm.sh", "same model"),  # two GGUF exports of one checkpoint
        # no GGUF for a side
        ("adapter", "draft-gguf", "llama-server.sh", "the target: 'adapter' is 'peft' and has no HF checkpoint"),
    ],
)
def test_an_engine_that_cannot_serve_the_pair_says_why(run, target, draft, refused, reason) -> None:
    deploy_dir, summary = bundle(run, target, draft)
    assert re.search(reason, summary["not_applicable"][refused])
    done = subprocess.run(["bash", str(deploy_dir / refused)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and summary["not_applicable"][refused] in done.stderr
    assert summary["not_applicable"][refused] in (deploy_dir / "README.md").read_text()
    if refused == "vllm.sh":
        assert not (deploy_dir / "vllm.yaml").exists() and "vllm.yaml" in summary["not_applicable"]


def fake_engine(folder: Path, name: str) -> Path:
    """An executable that records its working directory and argv (stands in for the engine's binary)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    record = (
        "import json, os, sys; json.dump({'cwd': os.getcwd(), 'argv': sys.argv[1:]}, open(os.environ['RECORD'], 'w'))"
    )
    script.write_text(f"#!{sys.executable}\n{record}\n")
    script.chmod(0o755)
    return script


def test_vllm_script_serves_a_copied_run_folder_and_needs_a_key_off_localhost(run, tmp_path: Path) -> None:
    deploy_dir, _ = bundle(run, "onnx", "draft-onnx")
    moved = shutil.copytree(run["tuned"].path.parents[1], tmp_path / "elsewhere" / "tiny")
    script = moved / "stages" / deploy_dir.parent.name / "deploy" / "vllm.sh"
    fake_engine(tmp_path / "bin", "vllm")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RECORD": str(tmp_path / "call.json")}
    env.pop("VLLM_API_KEY", None)
    subprocess.run(["bash", str(script)], env=env, check=True)
    call = json.loads((tmp_path / "call.json").read_text())
    assert Path(call["cwd"]) == moved.resolve()
    assert (moved / call["argv"][1] / "config.json").is_file()  # ./stages/tuned, inside the copy
    values = option_values(call["argv"])
    assert (moved / json.loads(values["--speculative-config"])["model"] / "config.json").is_file()
    assert (values["--host"], values["--port"]) == ("127.0.0.1", "8000")
    refused = subprocess.run(["bash", str(script)], env={**env, "HOST": "0.0.0.0"}, capture_output=True, text=True)
    assert refused.returncode == 2 and "needs VLLM_API_KEY" in refused.stderr
    keyed = {**env, "HOST": "0.0.0.0", "PORT": "9001", "VLLM_API_KEY": "secret"}
    subprocess.run(["bash", str(script)], env=keyed, check=True)
    values = option_values(json.loads((tmp_path / "call.json").read_text())["argv"])
    assert (values["--host"], values["--port"]) == ("0.0.0.0", "9001")


# --- llama-server ----------------------------------------------------------------------------


def test_llama_server_flags_are_in_the_pinned_parser(run) -> None:
    deploy_dir, summary = bundle(run, "gguf-q8", "draft-gguf", parallel=3)
    tokens = command_tokens(deploy_dir / "llama-server.sh")
    values = option_values(tokens)
    assert set(values) <= set(LLAMA["flags"]), set(values) - set(LLAMA["flags"])
    assert not set(values) & set(LLAMA["removed_flags"])
    assert "--draft-max" in LLAMA["removed_flags"]  # why --spec-draft-n-max is written instead
    assert values["-m"] == "./stages/gguf-q8/model.gguf" and values["-md"] == "./stages/draft-gguf/model.gguf"
    assert values["--spec-type"] == "draft-simple" and "draft-simple" in LLAMA["spec_types"]
    assert values["--spec-draft-n-max"] == "5"
    assert (values["-np"], values["-c"]) == ("3", str(3 * 256))
    assert summary["not_applicable"] == {}


def test_the_pinned_releases_match_the_recorded_flag_files() -> None:
    assert deploy.VLLM_RELEASE == VLLM["release"] and deploy.LLAMA_CPP_COMMIT == LLAMA["llama_cpp_commit"]
    assert VLLM["commit"] and LLAMA["sdist_sha256"]
    try:
        installed = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        pytest.skip("llama-cpp-python is not installed")
    assert installed == LLAMA["llama_cpp_python"], "llama-cpp-python changed: rerun scripts/record_serving_flags.py"


# --- the container ---------------------------------------------------------------------------

DOCKERFILE_INSTRUCTIONS = {"FROM", "ENV", "RUN", "COPY", "USER", "EXPOSE", "HEALTHCHECK", "CMD", "ARG"}


def serve_options() -> set[str]:
    """Every option ``slimline serve`` accepts, from the CLI itself."""
    command = typer.main.get_command(app)
    return {opt for param in command.commands["serve"].params for opt in (*param.opts, *param.secondary_opts)}


def test_the_dockerfile_serves_the_pair_behind_a_key(run) -> None:
    deploy_dir, _ = bundle(run, "onnx", "draft-onnx", port=8100)
    lines = [line for line in (deploy_dir / "Dockerfile").read_text().splitlines() if line and line[0] != "#"]
    assert {line.split()[0] for line in lines} <= DOCKERFILE_INSTRUCTIONS
    contexts = {line.split()[1].removeprefix("--from=") for line in lines if line.startswith("COPY --from=")}
    build = (deploy_dir / "docker-build.sh").read_text()
    assert contexts == {"slimline", "target", "draft"}
    assert all(f"--build-context {name}=" in build for name in contexts)
    assert "--build-context target=./stages/onnx" in build and "EXPOSE 8100" in lines
    assert any("[serve,onnx]" in line for line in lines)
    shell, flag, command = json.loads(next(line for line in lines if line.startswith("CMD "))[4:])
    argv = shlex.split(command.split("exec ", 1)[1])
    assert argv[:3] == ["slimline", "serve", "/srv/models/target"]
    assert {token for token in argv if token.startswith("--")} <= serve_options()
    values = option_values(argv)
    assert (values["--host"], values["--port"], values["--k"]) == ("0.0.0.0", "8100", "5")
    env = {key: value for key, value in os.environ.items() if key != "SLIMLINE_API_KEY"}
    refused = subprocess.run([shell, flag, command], env=env, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "set SLIMLINE_API_KEY" in refused.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "fp8"}, "dtype"),  # not one of vLLM's --dtype choices
        ({"parallel": 0}, "parallel"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"port": 70000}, "port"),
        ({"served_model_name": "a b$(x)"}, "served_model_name"),  # it lands in shell lines and an image tag
        ({"slots": 4}, "slots"),  # unknown keys are refused
    ],
)
def test_deploy_options_are_validated(options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DeployOptions(**options)


def test_the_dtype_choices_are_vllms() -> None:
    assert list(deploy.VllmDType.__args__) == VLLM["dtype_choices"]


# --- llama-server for real -------------------------------------------------------------------


def llama_server_binary() -> Path | None:
    """$SLIMLINE_LLAMA_SERVER, llama-server on PATH, or the one scripts/build_llama_server.sh builds."""
    from slimline.quantize.gguf_converter import converter_home, llama_cpp_version

    version = llama_cpp_version()
    for candidate in (
        os.environ.get("SLIMLINE_LLAMA_SERVER"),
        shutil.which("llama-server"),
        converter_home(version) / "bin" / "llama-server" if version else None,
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def wait_for_health(url: str, server: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Until llama-server's /health answers 200; fail with its log if it exits or never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"llama-server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"llama-server did not come up in {seconds}s:\n{log.read_text()[-3000:]}")


@pytest.mark.e2e
def test_llama_server_answers_with_the_draft(run, tmp_path: Path, tiny_model: Path) -> None:
    """The written llama-server.sh, run as is on a real GGUF pair, serves a completion the draft took part in."""
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("no llama-server binary: run scripts/build_llama_server.sh or set SLIMLINE_LLAMA_SERVER")
    from slimline.quantize import gguf_converter

    if gguf_converter.missing_converter() or gguf_converter.llama_cpp_version() is None:
        pytest.skip(f"llama.cpp's converter is not fetched: run `{gguf_converter.fetch_command()}`")
    root = tmp_path / "runs" / "real"
    tuned = publish_artifact(root, "tuned", "hf", tiny_model, [])
    draft = publish_artifact(root, "draft", "hf", run["draft"].path, [tuned])
    pair = {}
    for stage, parent in (("target-gguf", tuned), ("draft-gguf", draft)):
        staging = tmp_path / stage
        staging.mkdir()
        converter, pre_tokenizer = gguf_converter.find_converter(), gguf_converter.declared_pre_tokenizer(parent.path)
        gguf_converter.convert(converter, parent.path, staging / "model.gguf", "f16", pre_tokenizer)
        pair[stage] = publish_artifact(root, stage, "gguf", staging, [parent])
    folder = new_work_folder(root / "stages" / "server")
    write_deployment(folder, pair["target-gguf"], pair["draft-gguf"], DeployOptions(parallel=2), k=4)
    usage = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    for flag in option_values(command_tokens(folder / "deploy" / "llama-server.sh")):  # the binary's own list too
        assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,]|$)", usage, re.M), flag
    port, log = free_port(), tmp_path / "llama-server.log"
    env = {**os.environ, "PORT": str(port), "LLAMA_SERVER": str(binary)}
    with log.open("w") as out:
        server = subprocess.Popen(["bash", str(folder / "deploy" / "llama-server.sh")], env=env, stdout=out, stderr=out)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, server, log)
        body = {"prompt": "import os\n", "n_predict": 16, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
        request = urllib.request.Request(
            f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answer["tokens_predicted"] == 16 and answer["content"]
    assert answer["timings"].get("draft_n", 0) > 0, answer["timings"]  # the draft drafted
