"""``slimline serve``: load a target (and a draft), build the engine and the app, run uvicorn."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

from slimline.errors import SlimlineError
from slimline.serve.bundle import ServeBundle, check_same_vocabulary, read_bundle
from slimline.serve.limits import ServerLimits

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # tokens, where a target's folder does not say (llama.cpp's default)


def build_engine(
    pair: ServeBundle,
    max_active: int,
    max_batch: int | None = None,
    batch_invariant: bool = True,
    device: str = "cpu",
    dtype: str = "auto",
):
    """Load the models and the target's tokenizer into an engine (the draft must share the vocabulary).

    ``batch_invariant``: the target runs so that a request's logits do not depend on the other rows
    of its passes (llama.cpp: no one-token pass, see ``runtime/llama_cpp_model.py``). The draft
    never needs it: its proposals are checked by the target. ``device`` ('cpu', 'cuda:N') and
    ``dtype`` (``devices.inference_dtype``: 'auto' is float32 unless the weights crowd the GPU)
    place PyTorch models.
    """
    from slimline.devices import float32_weight_bytes, inference_dtype
    from slimline.models import load_tokenizer
    from slimline.runtime import model_folder, open_model
    from slimline.serve.engine import Engine

    tokenizer = load_tokenizer(model_folder(pair.target))
    if pair.draft is not None:
        draft_tokenizer = load_tokenizer(model_folder(pair.draft))
        check_same_vocabulary(tokenizer, draft_tokenizer, pair.target, pair.draft)
    target_weights = float32_weight_bytes(model_folder(pair.target))
    place = {"device": device, "dtype": inference_dtype(dtype, device, target_weights)}
    target_model = open_model(
        pair.target,
        max_sequences=max_active,
        serving=True,
        batch_invariant=batch_invariant,
        **place,
    )
    draft_model = (
        open_model(
            pair.draft, max_sequences=max_active, shares_cores=True, serving=True, batch_invariant=False, **place
        )
        if pair.draft
        else None
    )
    return Engine(
        target_model,
        tokenizer,
        draft_model,
        k=pair.k,
        adaptive=pair.adaptive,
        max_active=max_active,
        max_batch=max_batch,
    )


def check_memory(pair: ServeBundle, max_active: int, limits: ServerLimits, device: str) -> None:
    """Refuse a pair that cannot serve one full-context request in the free memory, before it loads.

    Warn where every slot at full context could exceed it. PyTorch models on a GPU count against
    its memory, everything else against the machine's.
    """
    from slimline.memory import MEMORY_ENV, free_memory, gb, serving_memory
    from slimline.runtime import artifact_format, checkpoint_context, gguf_context, model_folder

    folders = [folder for folder in (pair.target, pair.draft) if folder is not None]
    gguf = pair.target / "model.gguf"
    context = (
        checkpoint_context(model_folder(pair.target))
        or (gguf_context(gguf) if gguf.exists() else None)
        or DEFAULT_CONTEXT  # neither says: llama.cpp's default
    )
    if limits.max_prompt_tokens is not None and limits.max_tokens is not None:
        context = min(context, limits.max_prompt_tokens + limits.max_tokens)
    on_gpu = device != "cpu" and artifact_format(pair.target) in ("hf", "source", "peft")
    free = free_memory("cuda" if on_gpu else "cpu")
    estimate = serving_memory(folders, max_active, context)
    where = "free on the GPU" if on_gpu else "available"
    if free is not None and estimate.one_request() > free:
        raise SlimlineError(
            f"serving needs about {gb(estimate.one_request())} GB (weights {gb(estimate.weights)} GB, one "
            f"{context}-token request's KV cache {gb(estimate.cache_per_token * context)} GB) and {gb(free)} GB is "
            f"{where}; "
            f"fix: a smaller or quantized artifact (quantize.gguf, quantize.ptq), or set {MEMORY_ENV} if the "
            "estimate is wrong"
        )
    if free is not None and estimate.all_requests() > free:
        log.warning(
            "at --max-active %d with full %d-token contexts the caches could reach %s GB (with the weights) and %s GB "
            "is %s; "
            "lower --max-active or cap requests with --limit max_prompt_tokens=... --limit max_tokens=...",
            max_active,
            context,
            gb(estimate.all_requests()),
            gb(free),
            where,
        )


def resolve_pair(target: Path, draft: Path | None, k: int | None, adaptive: bool | None) -> ServeBundle:
    """A ``serve`` artifact names its pair, k and adaptivity; explicit options (not None) win over it."""
    from slimline.runtime import artifact_format

    bundle = read_bundle(target) if target.is_dir() and artifact_format(target) == "serve" else ServeBundle(target)
    explicit = {
        name: value for name, value in (("draft", draft), ("k", k), ("adaptive", adaptive)) if value is not None
    }
    return replace(bundle, **explicit)


def serve(
    target: Path,
    draft: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    k: int | None = None,
    adaptive: bool | None = None,
    max_active: int = 16,
    max_batch: int | None = None,
    shutdown_grace_seconds: float = 10.0,
    limits: ServerLimits | None = None,
    batch_invariant: bool = True,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Serve until interrupted; SIGINT/SIGTERM finish in-flight requests for up to the grace period.

    ``limits`` bound what clients may send and hold (docs/serving.md, "Limits"); default ServerLimits().
    ``device`` and ``dtype`` place PyTorch models (``slimline.devices``).
    """
    from slimline.devices import describe_device, device_problem, resolve_device

    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise SlimlineError(f"serving needs {', '.join(missing)}: pip install 'slimline[serve]'")
    import uvicorn

    from slimline.serve.app import create_app
    from slimline.serve.connections import uvicorn_config
    from slimline.serve.folders import check_serving_folder, load_errors

    limits = limits or ServerLimits()
    device = resolve_device(device)
    problem = device_problem(device)
    if problem:
        raise SlimlineError(f"--device: {problem}")
    name = model_name or target.name
    check_serving_folder(target, "target")
    pair = resolve_pair(target, draft, k, adaptive)
    for role, folder in (("target", pair.target), ("draft", pair.draft)):
        if folder is not None:
            check_serving_folder(folder, role)
    check_memory(pair, max_active, limits, device)
    with load_errors(pair.target, "target or draft"):
        engine = build_engine(pair, max_active, max_batch, batch_invariant, device, dtype)
    app = create_app(engine, name, api_key, shutdown_grace_seconds, limits)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use it", host)
    log.info(
        "serving %s (%s on %s%s) on http://%s:%d",
        name,
        engine.target.backend,
        describe_device(engine.target.device),
        f", draft {pair.draft.name} k={pair.k}{' adaptive' if pair.adaptive else ''}" if pair.draft else ", no draft",
        host,
        port,
    )
    config = uvicorn_config(
        app, host, port, limits, log_level="warning", timeout_graceful_shutdown=shutdown_grace_seconds
    )
    uvicorn.Server(config).run()
