"""Deployment bundles: a ``serve`` artifact's pair as vLLM, llama-server and container launch files.

``write_deployment`` writes ``deploy/`` into the serve artifact's folder:

- ``vllm.sh`` and ``vllm.yaml``: ``vllm serve`` of the target with the draft as a ``draft_model``
  speculator (GPUs; tensor parallelism across them). vLLM loads HF checkpoints, so each side is
  resolved to the HF checkpoint it was made from by walking the manifests' ``parents`` (an
  ``onnx``, ``gguf``, ``torch-int8`` or ``tensorrt`` artifact is another representation of its
  first parent); a side with no such ancestor makes the script say why and exit instead.
- ``llama-server.sh``: llama.cpp's server on a GGUF pair (one CPU box): the sides themselves when
  they are ``gguf`` artifacts, else a ``gguf`` artifact of the run made from the same checkpoint.
- ``Dockerfile`` and ``docker-build.sh``: ``slimline serve`` of the pair in a CPU container,
  listening on 0.0.0.0 behind ``SLIMLINE_API_KEY``.
- ``README.md``: what each file is, which engine suits which scale, what was not applicable.

Paths: model folders inside the run folder are written relative to it (``./stages/<id>``); the
scripts ``cd`` into ``MODEL_ROOT`` (default: the run folder this bundle sits in, three levels up)
first, so a copied run folder serves as is. A model outside the run folder (the input checkpoint)
is written as its absolute path.

Flag names: every vLLM and llama-server flag written here was checked against the engines' own
argument parsers at pinned releases (vLLM 0.33.0; the llama.cpp that llama-cpp-python 0.3.36
vendors). ``vllm_flags.json`` and ``llama_server_flags.json`` beside this module record what
those parsers accept; ``scripts/record_serving_flags.py`` produces them by reading the engines'
source distributions, and ``tests/serve/test_deploy.py`` checks every written flag against them.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from slimline.artifacts import MANIFEST, Artifact, read_artifact
from slimline.errors import ArtifactError
from slimline.runtime import checkpoint_context, gguf_context
from slimline.serve.bundle import ServeBundle

log = logging.getLogger(__name__)

DEPLOY_FOLDER = "deploy"
# The releases whose parsers vllm_flags.json and llama_server_flags.json record (a test keeps these equal).
VLLM_RELEASE = "v0.33.0"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"  # vendored by llama-cpp-python 0.3.36
VLLM_METHOD = "draft_model"  # SpeculativeMethod: an independent small model drafts
LLAMA_SPEC_TYPE = "draft-simple"  # without it llama-server loads -md's model and never drafts with it
# Formats that are another representation of their first parent's weights (export, quantization).
DERIVED_FORMATS = ("onnx", "gguf", "torch-int8", "tensorrt")
MAX_LINEAGE = 32
MAX_LLAMA_CONTEXT = 32768  # the default -c: parallel x the target's context, at most this many KV cells
IMAGE_EXTRAS = {"onnx": "onnx", "gguf": "gguf"}  # pip extras slimline serve needs per format
LOOPBACK = ("127.0.0.1", "localhost", "::1")
VllmDType = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


class DeployOptions(BaseModel):
    """How the deployment bundle's engines are configured (the serve stage's ``deploy:`` block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs the target is split across.")
    max_model_len: int | None = Field(
        None, ge=1, description="vLLM: longest sequence (prompt + output); default the target's context."
    )
    dtype: VllmDType = Field("auto", description="vLLM: weight and activation dtype; auto takes the checkpoint's.")
    parallel: int = Field(4, ge=1, description="llama-server: request slots decoded at once (-np).")
    context: int | None = Field(
        None,
        ge=1,
        description=f"llama-server: KV cells shared by all slots (-c); default parallel x the target's context, "
        f"at most {MAX_LLAMA_CONTEXT}.",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port every engine listens on.")
    served_model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Model id clients send (letters, digits, . _ -); default the target's stage id. The same for "
        "every engine, and the image's tag.",
    )


@dataclass(frozen=True)
class Side:
    """One model of the pair and what each engine can load for it (None with the reason when nothing)."""

    role: str  # target or draft
    artifact: Artifact
    lineage: tuple[str, ...]  # stage ids walked from the artifact towards its HF checkpoint
    checkpoint: Artifact | None  # the hf (or source) artifact vLLM loads
    no_checkpoint: str | None
    gguf: Path | None  # the GGUF file llama-server loads
    no_gguf: str | None

    @property
    def stage(self) -> str:
        """The artifact's stage id."""
        return self.artifact.manifest["stage"]

    @property
    def checkpoint_folder(self) -> Path:
        """Where the HF checkpoint's files are."""
        assert self.checkpoint is not None
        return self.checkpoint.model_path


@dataclass(frozen=True)
class Layout:
    """Where the bundle is written and what its paths are relative to."""

    run_root: Path  # MODEL_ROOT's default: the run folder
    deploy: Path

    def shown(self, path: Path) -> str:
        """``./relative`` inside the run folder, else the absolute path."""
        resolved = path.resolve()
        if resolved.is_relative_to(self.run_root.resolve()):
            return "./" + resolved.relative_to(self.run_root.resolve()).as_posix()
        return str(resolved)

    def root_from_scripts(self) -> str:
        """The run folder relative to the deploy folder (the scripts' default MODEL_ROOT)."""
        return os.path.relpath(self.run_root.resolve(), self.deploy.resolve())


# --- the entry point -------------------------------------------------------------------------


def write_deployment(
    folder: Path,
    target: Artifact,
    draft: Artifact | None,
    options: DeployOptions,
    k: int = ServeBundle.k,
    adaptive: bool = ServeBundle.adaptive,
) -> dict:
    """Write ``folder/deploy/``; return what was written and what was not applicable, and why.

    ``folder`` is the serve artifact's folder (the stage's work folder, ``runs/<name>/stages/.tmp-<id>-*``);
    ``k`` and ``adaptive`` are the serve stage's. Every launch file is written; one whose engine cannot
    serve this pair explains why and exits with status 2 (``vllm.yaml`` is then left out).
    """
    layout = bundle_layout(folder, target)
    layout.deploy.mkdir(exist_ok=True)
    stages = stages_folder(layout, target)
    sides = [describe_side("target", target, stages)]
    if draft is not None:
        sides.append(describe_side("draft", draft, stages))
    name = options.served_model_name or sides[0].stage
    summary: dict = {"deploy_files": [], "not_applicable": {}, "vllm_release": VLLM_RELEASE}
    summary["llama_cpp_commit"] = LLAMA_CPP_COMMIT
    for written, missing in (
        write_vllm(layout, sides, options, k, name),
        write_llama_server(layout, sides, options, k, name),
        write_container(layout, sides, options, k, adaptive, name),
    ):
        summary["deploy_files"] += written
        summary["not_applicable"].update(missing)
    write_text(layout.deploy / "README.md", readme(sides, summary, options, name))
    summary["deploy_files"].append("README.md")
    summary["sides"] = {side.role: side_summary(side, layout) for side in sides}
    log.info("deploy: wrote %s", ", ".join(summary["deploy_files"]))
    return summary


def bundle_layout(folder: Path, target: Artifact) -> Layout:
    """The run folder when ``folder`` is ``<run>/stages/<id>``, else the folder holding both it and the target."""
    if folder.parent.name == "stages":
        return Layout(folder.parent.parent, folder / DEPLOY_FOLDER)
    return Layout(Path(os.path.commonpath([folder.resolve(), target.path.resolve()])), folder / DEPLOY_FOLDER)


def stages_folder(layout: Layout, target: Artifact) -> Path:
    """The run's stages folder, where GGUF siblings are looked for."""
    candidate = layout.run_root / "stages"
    return candidate if candidate.is_dir() else target.path.parent


def write_text(path: Path, text: str, executable: bool = False) -> None:
    """Write a bundle file (scripts executable)."""
    path.write_text(text)
    if executable:
        path.chmod(0o755)


def side_summary(side: Side, layout: Layout) -> dict:
    """One side's resolution, for the stage's metrics."""
    return {
        "stage": side.stage,
        "format": side.artifact.format,
        "hf_checkpoint": layout.shown(side.checkpoint_folder) if side.checkpoint else None,
        "gguf": layout.shown(side.gguf) if side.gguf else None,
    }


# --- lineage ---------------------------------------------------------------------------------


def describe_side(role: str, artifact: Artifact, stages: Path) -> Side:
    """Resolve one side to its HF checkpoint and its GGUF file."""
    checkpoint, lineage, no_checkpoint = find_checkpoint(artifact)
    gguf, no_gguf = find_gguf(artifact, checkpoint, stages)
    return Side(role, artifact, lineage, checkpoint, no_checkpoint, gguf, no_gguf)


def find_checkpoint(artifact: Artifact) -> tuple[Artifact | None, tuple[str, ...], str | None]:
    """The hf/source artifact ``artifact`` was made from (itself if hf), the stages walked, or why there is none."""
    current, lineage = artifact, [artifact.manifest["stage"]]
    for _ in range(MAX_LINEAGE):
        if current.format in ("hf", "source"):
            return current, tuple(lineage), None
        if current.format not in DERIVED_FORMATS:
            hint = " (merge the adapter into its base first)" if current.format == "peft" else ""
            reason = f"{lineage[-1]!r} is a {current.format!r} artifact, not an HF checkpoint{hint}"
            return None, tuple(lineage), reason
        parent, problem = parent_artifact(current)
        if parent is None:
            return None, tuple(lineage), problem
        current = parent
        lineage.append(parent.manifest["stage"])
    return None, tuple(lineage), f"no HF checkpoint within {MAX_LINEAGE} ancestors of {lineage[0]!r}"


def parent_artifact(artifact: Artifact) -> tuple[Artifact | None, str | None]:
    """The artifact's first parent, where the manifest recorded it or at its place in the run; or why not."""
    stage = artifact.manifest["stage"]
    parents = artifact.manifest.get("parents") or []
    if not parents:
        return None, f"{stage!r} ({artifact.format}) records no parent to take an HF checkpoint from"
    record = parents[0]
    for folder in parent_locations(artifact, record):
        if not (folder / MANIFEST).is_file():
            continue
        try:
            parent = read_artifact(folder)
        except ArtifactError as error:
            return None, f"the parent of {stage!r} cannot be read: {error}"
        if parent.key != record["key"]:
            return None, f"the parent {record['stage']!r} of {stage!r} was rebuilt after it (its key differs)"
        return parent, None
    return None, f"the parent {record['stage']!r} of {stage!r} is no longer at {record['path']}"


def parent_locations(artifact: Artifact, record: dict) -> list[Path]:
    """The parent's place beside ``artifact`` in its run folder (which may have been moved), then the recorded path."""
    locations = [Path(record["path"])]
    if artifact.path.parent.name == "stages":
        run = artifact.path.parent.parent
        locations.insert(0, run / "input" if record["stage"] == "input" else run / "stages" / record["stage"])
    return locations


def find_gguf(artifact: Artifact, checkpoint: Artifact | None, stages: Path) -> tuple[Path | None, str | None]:
    """The side's GGUF file: its own when it is gguf, else a run's gguf artifact of the same checkpoint."""
    if artifact.format == "gguf":
        return gguf_file(artifact)
    stage = artifact.manifest["stage"]
    if checkpoint is None:
        return None, f"{stage!r} is {artifact.format!r} and has no HF checkpoint a GGUF export could come from"
    exports = gguf_exports(stages, checkpoint)
    if not exports:
        return None, (
            f"{stage!r} is {artifact.format!r} and the run has no quantize.gguf stage made from its checkpoint "
            f"{checkpoint.manifest['stage']!r}"
        )
    return gguf_file(exports[0])


def gguf_exports(stages: Path, checkpoint: Artifact) -> list[Artifact]:
    """The run's gguf artifacts whose first parent is ``checkpoint``, most bits per weight first."""
    found = []
    for folder in sorted(stages.iterdir()) if stages.is_dir() else []:
        if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
            continue
        try:
            candidate = read_artifact(folder)
        except ArtifactError:
            continue
        parents = candidate.manifest.get("parents") or []
        if candidate.format == "gguf" and parents and parents[0].get("key") == checkpoint.key:
            found.append(candidate)
    # least lossy first: the pair was checked at the checkpoint's precision
    return sorted(found, key=lambda a: -float(a.manifest.get("stage_metrics", {}).get("bits_per_weight") or 0))


def gguf_file(artifact: Artifact) -> tuple[Path | None, str | None]:
    """The one ``.gguf`` payload file a gguf artifact's manifest lists."""
    files = [name for name in artifact.manifest["files"] if name.endswith(".gguf")]
    if len(files) != 1:
        return None, f"{artifact.manifest['stage']!r} lists {len(files)} .gguf files, expected one"
    return artifact.path / files[0], None


def pair_problem(sides: list[Side], attribute: str) -> str | None:
    """Why the pair cannot be served through ``attribute`` (checkpoint or gguf): a side without one, or one for both."""
    for side in sides:
        if getattr(side, attribute) is None:
            return f"the {side.role}: {getattr(side, 'no_' + attribute)}"
    found = [getattr(side, attribute) for side in sides]
    if len(found) == 2 and same_model(*found):
        shown = found[0].manifest["stage"] if isinstance(found[0], Artifact) else str(found[0])
        return f"target and draft resolve to the same model ({shown!r}): drafting with the target itself only adds work"
    return None


def same_model(first: Artifact | Path, second: Artifact | Path) -> bool:
    """Two checkpoints (by key) or two GGUF files (by path) are the same."""
    if isinstance(first, Artifact) and isinstance(second, Artifact):
        return first.key == second.key
    return Path(first).resolve() == Path(second).resolve()


# --- contexts --------------------------------------------------------------------------------


def target_context(side: Side) -> int | None:
    """The target's context: its checkpoint's config, else its GGUF metadata."""
    if side.checkpoint is not None:
        found = checkpoint_context(side.checkpoint_folder)
        if found:
            return found
    return gguf_context(side.gguf) if side.gguf is not None else None


# --- shell scripts ---------------------------------------------------------------------------


def script_preamble(title: list[str], layout: Layout, key_variable: str, port: int) -> str:
    """The lines every launch script starts with: what it is, MODEL_ROOT, HOST/PORT and the key guard."""
    comments = "".join(f"# {line}\n".replace("# \n", "#\n") for line in title)
    return (
        f"#!/usr/bin/env bash\n{comments}#\n"
        "# Model paths are relative to MODEL_ROOT: the run folder this bundle sits in (runs/<name>, three\n"
        "# levels up from this script) unless set. Copy the run folder, or the folders named below, along.\n"
        f"# HOST defaults to 127.0.0.1; any other address needs {key_variable} (clients then send\n"
        f"# 'Authorization: Bearer <key>').\n"
        "set -euo pipefail\n"
        f'MODEL_ROOT="${{MODEL_ROOT:-$(cd "$(dirname "${{BASH_SOURCE[0]}}")/{layout.root_from_scripts()}" && pwd)}}"\n'
        'HOST="${HOST:-127.0.0.1}"\n'
        f'PORT="${{PORT:-{port}}}"\n'
        f'case "$HOST" in {"|".join(LOOPBACK)}) ;; *)\n'
        f'  if [ -z "${{{key_variable}:-}}" ]; then echo "listening on $HOST needs {key_variable}" >&2; exit 2; fi ;;\n'
        "esac\n"
        'cd "$MODEL_ROOT"\n'
    )


def command_lines(program: list[str], options: list[tuple[str, str | None]]) -> str:
    """``exec program`` with one ``flag value`` per continued line; values are shell words already."""
    lines = ["exec " + " ".join(program)] + [f"  {flag} {value}" if value else f"  {flag}" for flag, value in options]
    return " \\\n".join(lines) + "\n"


def refusal(title: list[str], reason: str) -> str:
    """A script that says why its engine cannot serve this pair and exits 2."""
    comments = "".join(f"# {line}\n" for line in title)
    message = f"not applicable: {reason}"
    return f"#!/usr/bin/env bash\n{comments}#\n# {message}\ncat >&2 <<'WHY'\n{message}\nWHY\nexit 2\n"


# --- vLLM ------------------------------------------------------------------------------------


def write_vllm(
    layout: Layout, sides: list[Side], options: DeployOptions, k: int, name: str
) -> tuple[list[str], dict[str, str]]:
    """vllm.sh and vllm.yaml, or a vllm.sh that explains why vLLM cannot serve this pair."""
    title = [f"vLLM {VLLM_RELEASE} (GPUs; a cluster with tensor parallelism): serve {describe_pair(sides)}."]
    problem = pair_problem(sides, "checkpoint")
    if problem:
        write_text(layout.deploy / "vllm.sh", refusal(title, problem), executable=True)
        return ["vllm.sh"], {"vllm.sh": problem, "vllm.yaml": problem}
    settings = vllm_settings(layout, sides, options, k, name)
    title += [line for side in sides for line in resolution_note(side, layout)]
    script = script_preamble(title, layout, "VLLM_API_KEY", options.port)
    script += command_lines(["vllm", "serve", shlex.quote(settings["model"])], vllm_flags(settings))
    write_text(layout.deploy / "vllm.sh", script, executable=True)
    header = "".join(f"# {line}\n" for line in title)
    header += "# Run from the run folder (model paths are relative to it):\n"
    header += "#   cd <run folder> && vllm serve --config stages/<serve stage id>/deploy/vllm.yaml\n"
    header += "# Set VLLM_API_KEY in the environment before changing host from 127.0.0.1.\n"
    write_text(layout.deploy / "vllm.yaml", header + yaml.safe_dump(settings, sort_keys=False))
    return ["vllm.sh", "vllm.yaml"], {}


def vllm_settings(layout: Layout, sides: list[Side], options: DeployOptions, k: int, name: str) -> dict:
    """``vllm serve``'s options as the config file's keys (flag names without the dashes)."""
    settings: dict = {"model": layout.shown(sides[0].checkpoint_folder), "served-model-name": name}
    settings |= {"host": "127.0.0.1", "port": options.port, "dtype": options.dtype}
    max_model_len = options.max_model_len or checkpoint_context(sides[0].checkpoint_folder)
    if max_model_len:
        settings["max-model-len"] = max_model_len
    settings["tensor-parallel-size"] = options.tensor_parallel_size
    if len(sides) == 2:
        settings["speculative-config"] = {
            "model": layout.shown(sides[1].checkpoint_folder),
            "num_speculative_tokens": k,
            "method": VLLM_METHOD,
        }
    return settings


def vllm_flags(settings: dict) -> list[tuple[str, str | None]]:
    """Every setting but the model as ``--flag value``; host and port from the script's HOST and PORT."""
    from_script = {"host": '"$HOST"', "port": '"$PORT"'}
    return [
        (f"--{key}", from_script.get(key) or shlex.quote(json.dumps(value) if isinstance(value, dict) else str(value)))
        for key, value in settings.items()
        if key != "model"
    ]


def resolution_note(side: Side, layout: Layout) -> list[str]:
    """A comment on which checkpoint stands for a side that is not itself an HF checkpoint."""
    if side.checkpoint is side.artifact or len(side.lineage) == 1:
        return []
    return [
        f"The {side.role} {side.stage!r} is an {side.artifact.format!r} artifact; vLLM loads the HF checkpoint it was made from:",
        f"  {layout.shown(side.checkpoint_folder)} ({' <- '.join(side.lineage)}), at that checkpoint's precision.",
    ]


def describe_pair(sides: list[Side]) -> str:
    """``'onnx' (onnx) drafted by 'draft-onnx' (onnx)``, or the target alone."""
    text = f"{sides[0].stage!r} ({sides[0].artifact.format})"
    return text + (f" drafted by {sides[1].stage!r} ({sides[1].artifact.format})" if len(sides) == 2 else "")


# --- llama-server ----------------------------------------------------------------------------


def write_llama_server(
    layout: Layout, sides: list[Side], options: DeployOptions, k: int, name: str
) -> tuple[list[str], dict[str, str]]:
    """llama-server.sh for a GGUF pair, or one that explains why there is none."""
    title = [f"llama-server (llama.cpp {LLAMA_CPP_COMMIT[:10]}; one CPU box): serve {describe_pair(sides)}."]
    problem = pair_problem(sides, "gguf")
    if problem:
        write_text(layout.deploy / "llama-server.sh", refusal(title, problem), executable=True)
        return ["llama-server.sh"], {"llama-server.sh": problem}
    title += [f"{side.role}: {layout.shown(side.gguf)}" for side in sides]
    title.append("LLAMA_SERVER: the binary (default llama-server on PATH). On a GPU add -ngl 99 -ngld 99.")
    flags = llama_server_flags(layout, sides, options, k, name)
    script = script_preamble(title, layout, "LLAMA_API_KEY", options.port)
    script += command_lines(['"${LLAMA_SERVER:-llama-server}"'], flags)
    write_text(layout.deploy / "llama-server.sh", script, executable=True)
    return ["llama-server.sh"], {}


def llama_server_flags(
    layout: Layout, sides: list[Side], options: DeployOptions, k: int, name: str
) -> list[tuple[str, str | None]]:
    """``llama-server``'s flags: the models, speculation, slots, context, address and alias."""
    flags: list[tuple[str, str | None]] = [("-m", shlex.quote(layout.shown(sides[0].gguf)))]
    if len(sides) == 2:
        flags += [("-md", shlex.quote(layout.shown(sides[1].gguf))), ("--spec-type", LLAMA_SPEC_TYPE)]
        flags.append(("--spec-draft-n-max", str(k)))  # --draft-max was removed at this llama.cpp
    flags.append(("-np", str(options.parallel)))
    context = options.context or default_llama_context(sides[0], options.parallel)
    if context:
        flags.append(("-c", str(context)))
    return [*flags, ("--host", '"$HOST"'), ("--port", '"$PORT"'), ("--alias", shlex.quote(name))]


def default_llama_context(target: Side, parallel: int) -> int | None:
    """-c: every slot gets the target's whole context, capped; None (the model's own) when unknown."""
    context = target_context(target)
    return min(parallel * context, MAX_LLAMA_CONTEXT) if context else None


# --- container -------------------------------------------------------------------------------

IMAGE_ROOT = "/srv/models"


def write_container(
    layout: Layout, sides: list[Side], options: DeployOptions, k: int, adaptive: bool, name: str
) -> tuple[list[str], dict[str, str]]:
    """Dockerfile and docker-build.sh: ``slimline serve`` of the pair on 0.0.0.0, behind an API key."""
    extras = ["serve", *sorted({IMAGE_EXTRAS[s.artifact.format] for s in sides if s.artifact.format in IMAGE_EXTRAS})]
    write_text(layout.deploy / "Dockerfile", dockerfile(sides, options, k, adaptive, name, extras))
    write_text(layout.deploy / "docker-build.sh", docker_build_script(layout, sides, name), executable=True)
    return ["Dockerfile", "docker-build.sh"], {}


def serving_folder(side: Side) -> Path:
    """What the image holds for a side: the artifact folder, or for the input model its checkpoint folder."""
    return side.artifact.model_path if side.artifact.format == "source" else side.artifact.path


def serve_command(sides: list[Side], options: DeployOptions, k: int, adaptive: bool, name: str) -> list[str]:
    """The ``slimline serve`` argv inside the image."""
    command = ["slimline", "serve", f"{IMAGE_ROOT}/target"]
    if len(sides) == 2:
        command += ["--draft", f"{IMAGE_ROOT}/draft", "--k", str(k), "--adaptive" if adaptive else "--no-adaptive"]
    return [*command, "--host", "0.0.0.0", "--port", str(options.port), "--model-name", name]


def dockerfile(sides: list[Side], options: DeployOptions, k: int, adaptive: bool, name: str, extras: list[str]) -> str:
    """A CPU image with slimline[serve] and the pair; the server refuses to start without SLIMLINE_API_KEY."""
    guard = (
        'if [ -z "${SLIMLINE_API_KEY:-}" ]; then echo "set SLIMLINE_API_KEY: the server listens on 0.0.0.0 '
        'and needs a key (docker run -e SLIMLINE_API_KEY=...)" >&2; exit 2; fi; exec '
    )
    command = guard + shlex.join(serve_command(sides, options, k, adaptive, name))
    copies = "".join(f"COPY --from={side.role} . {IMAGE_ROOT}/{side.role}\n" for side in sides)
    health = f"urllib.request.urlopen('http://127.0.0.1:{options.port}/health', timeout=5)"
    build_tools = (
        "# llama-cpp-python builds from source\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake "
        "&& rm -rf /var/lib/apt/lists/*\n"
        if "gguf" in extras
        else ""
    )
    return (
        "# syntax=docker/dockerfile:1\n"
        f"# slimline serve of {describe_pair(sides)} on CPU, listening on 0.0.0.0:{options.port}.\n"
        "# Build with docker-build.sh beside this file (Docker with BuildKit, 23.0 or newer): it builds a slimline\n"
        "# wheel and passes it and the model folders as the named build contexts 'slimline', 'target', 'draft'.\n"
        f"# Run: docker run -p {options.port}:{options.port} -e SLIMLINE_API_KEY=<key> <image>\n"
        "FROM python:3.11-slim\n"
        "ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false\n"
        f"{build_tools}"
        "# PyTorch's CPU build first: PyPI's Linux wheel is the multi-GB CUDA one.\n"
        'RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.6,<2.14"\n'
        "COPY --from=slimline . /tmp/wheels\n"
        f'RUN pip install "$(ls /tmp/wheels/slimline-*.whl)[{",".join(extras)}]" && rm -rf /tmp/wheels\n'
        f"{copies}"
        "RUN useradd --create-home slimline\n"
        "USER slimline\n"
        f"EXPOSE {options.port}\n"
        f'HEALTHCHECK CMD python -c "import urllib.request; {health}"\n'
        f"CMD {json.dumps(['sh', '-c', command])}\n"
    )


def docker_build_script(layout: Layout, sides: list[Side], name: str) -> str:
    """Build the image: a slimline wheel and the model folders as BuildKit named contexts."""
    project = Path(__file__).resolve().parents[2]
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the slimline serve image of {describe_pair(sides)}.",
        "# SLIMLINE_PROJECT: the slimline source to install (default: where it was when this was written);",
        "# MODEL_ROOT: the run folder (default: three levels up); IMAGE: the tag.",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f'MODEL_ROOT="${{MODEL_ROOT:-$(cd "$HERE/{layout.root_from_scripts()}" && pwd)}}"',
        f'SLIMLINE_PROJECT="${{SLIMLINE_PROJECT:-{project}}}"',
        f'IMAGE="${{IMAGE:-slimline-{name.lower()}}}"',
        'scratch="$(mktemp -d)"',
        "trap 'rm -rf \"$scratch\"' EXIT",
        'python3 -m pip wheel --no-deps --quiet --wheel-dir "$scratch/wheels" "$SLIMLINE_PROJECT"',
        'cd "$MODEL_ROOT"',
    ]
    contexts = []
    for side in sides:
        folder = shlex.quote(layout.shown(serving_folder(side)))
        if side.artifact.format == "source":  # a hub snapshot links into the cache's blobs: copy the files
            lines.append(f'cp -rL {folder} "$scratch/{side.role}"')
            folder = f'"$scratch/{side.role}"'
        contexts.append(f"--build-context {side.role}={folder}")
    build = ['docker build -f "$HERE/Dockerfile"', '--build-context slimline="$scratch/wheels"', *contexts]
    lines.append(" \\\n  ".join([*build, '-t "$IMAGE" "$HERE"']))
    return "\n".join(lines) + "\n"


# --- README ----------------------------------------------------------------------------------


def readme(sides: list[Side], summary: dict, options: DeployOptions, name: str) -> str:
    """deploy/README.md: the files, which engine suits which scale, what was not applicable."""
    rows = [
        ("llama-server.sh", "llama.cpp's server on the GGUF pair", "one CPU machine (or one GPU with -ngl)"),
        (
            "Dockerfile, docker-build.sh",
            "a container running `slimline serve` on the pair",
            "one CPU machine, as a service",
        ),
        (
            "vllm.sh, vllm.yaml",
            "vLLM with the draft as a `draft_model` speculator",
            "GPUs; a cluster with --tensor-parallel-size",
        ),
    ]
    table = "| file | what | scale |\n| --- | --- | --- |\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    missing = summary["not_applicable"]
    skipped = "".join(f"- `{file}`: {reason}\n" for file, reason in missing.items()) or "- none\n"
    return (
        f"# Deployment bundle: {describe_pair(sides)}\n\n"
        f"Served as `{name}` on port {options.port}; written by slimline's serve stage.\n\n"
        f"{table}\n"
        "Which engine: on one CPU machine, `slimline serve` (the container, or `slimline serve` on the serve\n"
        "artifact) or llama-server (llama.cpp decodes faster on CPU; measure the draft there, it may not pay);\n"
        "on GPUs or a cluster, vLLM, splitting the target across GPUs with tensor parallelism.\n\n"
        "Paths are relative to the run folder (`MODEL_ROOT`, by default three levels above this folder); the\n"
        "scripts `cd` there first. HOST defaults to 127.0.0.1: another address needs the engine's key\n"
        "(`VLLM_API_KEY`, `LLAMA_API_KEY`; the container always needs `SLIMLINE_API_KEY`).\n\n"
        f"Flags were checked against vLLM {VLLM_RELEASE}'s and llama.cpp {LLAMA_CPP_COMMIT[:10]}'s argument\n"
        "parsers (slimline/serve/vllm_flags.json, llama_server_flags.json; see docs/scale.md).\n\n"
        f"## Not applicable here\n\n{skipped}"
    )
