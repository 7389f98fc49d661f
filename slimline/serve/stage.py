"""The ``serve`` stage: pair a target with a draft for speculative decoding, and measure the pair.

The stage reads the target (its ``from:``) and the draft (``params.draft``, a stage defined
earlier in the file; any two formats the runtime layer runs: ``hf``, ``torch-int8``, GPTQ,
``onnx``, ``gguf``, ``tensorrt``, sharing a tokenizer), decodes real calibration-split prompts
greedily with the target alone and speculatively, checks the outputs are identical (in float32
where the server would run bf16: see ``measure_pair``), and writes ``serve.json``: the pair, k
and whether it adapts. Format ``serve``; the evaluator measures it like any artifact, through a
speculative backend (accuracy is the target's; decode speed is what the pair delivers). ``slimline serve runs/<name>/stages/<id>``
serves it.

```yaml
- id: server
  kind: serve
  from: target-onnx
  params: {draft: draft-onnx, k: 4}
```
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import torch
from pydantic import Field

from slimline.artifacts import Artifact
from slimline.errors import ArtifactError, StageError
from slimline.runtime import RUNTIME_BY_FORMAT
from slimline.serve.bundle import ServeBundle, check_same_vocabulary, write_bundle
from slimline.serve.deploy import DeployOptions, write_deployment
from slimline.stage import StageContext, StageOutput, StageParams, StageSpec, same_shape

log = logging.getLogger(__name__)

# The stage needs no package beyond the core ones (the HTTP server's are checked by ``slimline serve``).
SPEC = StageSpec(kind="serve", requires=(), extra=None, device="any", data=("calibration",), extra_inputs=("draft",))
check_shape = same_shape

SERVABLE_FORMATS = tuple(RUNTIME_BY_FORMAT)


class Params(StageParams):
    """The draft to pair with the target and how many tokens it proposes."""

    draft: str = Field(description="Id of the stage whose artifact drafts (defined earlier in the file).")
    k: int = Field(ServeBundle.k, ge=1, le=16, description="Draft tokens per round (the start value when adaptive).")
    adaptive: bool = Field(
        ServeBundle.adaptive, description="Adapt k to the running acceptance rate and measured costs."
    )
    check_prompts: int = Field(4, ge=1, description="Calibration prompts decoded both ways to check and time.")
    check_new_tokens: int = Field(64, ge=8, description="Greedy tokens per check prompt.")
    deploy: DeployOptions = Field(
        default_factory=DeployOptions,
        description="Options of the deployment bundle written beside serve.json (vLLM, llama-server, Dockerfile).",
    )


def check_pair(target: Artifact, draft: Artifact) -> None:
    """Both models must be formats the runtime layer runs (they may run on different runtimes)."""
    for role, artifact in (("target", target), ("draft", draft)):
        if artifact.format not in SERVABLE_FORMATS:
            raise StageError(
                f"the {role} {artifact.manifest['stage']!r} is {artifact.format!r}; serve takes "
                f"{', '.join(SERVABLE_FORMATS)}"
            )


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Check and time the pair on real prompts, then write the bundle."""
    from slimline.models import load_tokenizer

    target, draft = inputs
    check_pair(target, draft)
    try:
        check_same_vocabulary(
            load_tokenizer(target.model_path), load_tokenizer(draft.model_path), target.path, draft.path
        )
    except ArtifactError as error:
        raise StageError(str(error)) from error
    metrics = measure_pair(target.path, draft.path, ctx.data.stream("calibration"), params, ctx.device)
    if metrics["identical_prompts"] != params.check_prompts:
        raise StageError(
            f"speculative greedy output differed from the target's on {params.check_prompts - metrics['identical_prompts']}"
            f" of {params.check_prompts} prompts"
        )
    write_bundle(ctx.work_dir, ServeBundle(target.path, draft.path, params.k, params.adaptive))
    metrics["deployment"] = write_deployment(
        ctx.work_dir, target, draft, params.deploy, k=params.k, adaptive=params.adaptive
    )
    for name in ("config.json", "generation_config.json"):
        if (target.model_path / name).exists():
            (ctx.work_dir / name).write_bytes((target.model_path / name).read_bytes())
    return StageOutput(format="serve", metrics=metrics)


def measure_pair(
    target_path: Path, draft_path: Path, stream: torch.Tensor, params: Params, device: str = "cpu"
) -> dict:
    """Target-only and speculative greedy decoding of the same prompts: rates, acceptance, exactness.

    Measured as ``slimline serve --device`` runs the pair by default (``inference_dtype``: float32,
    or bf16 on a GPU where float32 weights would crowd it). bf16 rounds a k+1-token verification
    pass differently from a one-token pass, so a near tie can flip a token; there the outputs are
    compared again in float32, where speculative decoding must give the target's tokens exactly,
    and the bf16 count is reported beside it.
    """
    from slimline.devices import float32_weight_bytes, inference_dtype
    from slimline.runtime import model_folder

    step = max(1, (stream.numel() - 64) // params.check_prompts)
    prompts = [stream[i * step : i * step + 64].tolist() for i in range(params.check_prompts)]
    dtype = inference_dtype("auto", device, float32_weight_bytes(model_folder(target_path)))
    figures = decode_both_ways(target_path, draft_path, prompts, params, device, dtype)
    plain, speculative = figures["target_only_tokens_per_s"], figures["speculative_tokens_per_s"]
    log.info("serve: target-only %.1f tok/s, speculative %.1f tok/s (%.2fx)", plain, speculative, speculative / plain)
    if dtype != torch.float32 and figures["backend"] == "pytorch":
        exact = decode_both_ways(target_path, draft_path, prompts, params, device, torch.float32)
        figures[f"identical_prompts_{figures['dtype']}"] = figures["identical_prompts"]
        figures["identical_prompts"] = exact["identical_prompts"]
    return figures


def decode_both_ways(
    target_path: Path, draft_path: Path, prompts: list[list[int]], params: Params, device: str, dtype: torch.dtype
) -> dict:
    """Each prompt decoded greedily by the target alone and speculatively: medians and identical outputs."""
    from slimline.runtime import open_model
    from slimline.serve.speculative import DraftLength, timed_greedy

    # as the server runs them: llama.cpp's exactness across pass shapes is the server's (batch invariance)
    target = open_model(target_path, serving=True, device=device, dtype=dtype)
    draft = open_model(draft_path, shares_cores=True, serving=True, batch_invariant=False, device=device, dtype=dtype)
    plain_rates, speculative_rates, acceptance, identical = [], [], [], 0
    tuning = DraftLength(params.k, params.adaptive)
    for prompt in prompts:
        plain_tokens, rate, _ = timed_greedy(target, None, prompt, params.check_new_tokens, None)
        plain_rates.append(rate)
        tuning = tuning.fork()  # each prompt starts from what the previous ones measured, as in the server
        speculative_tokens, rate, stats = timed_greedy(target, draft, prompt, params.check_new_tokens, tuning)
        speculative_rates.append(rate)
        acceptance.append(stats.acceptance_rate or 0.0)
        identical += plain_tokens == speculative_tokens
    target.close()
    draft.close()
    plain, speculative = statistics.median(plain_rates), statistics.median(speculative_rates)
    return {
        "target_only_tokens_per_s": plain,
        "speculative_tokens_per_s": speculative,
        "speculative_speedup": speculative / plain,
        "acceptance_rate": statistics.median(acceptance),
        "identical_prompts": identical,
        "check_prompts": params.check_prompts,
        "backend": target.backend,
        "draft_backend": draft.backend,
        "device": target.device,
        "dtype": str(dtype).removeprefix("torch.") if target.backend == "pytorch" else None,
    }
