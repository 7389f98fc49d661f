"""``slimline serve``: load a target (and a draft), build the engine and the app, run uvicorn."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from slimline.errors import ArtifactError, SlimlineError

log = logging.getLogger(__name__)


def build_engine(target: Path, draft: Path | None, k: int, adaptive: bool, max_active: int):
    """Load the models and the target's tokenizer into an engine (the draft must share the vocabulary)."""
    from slimline.models import load_tokenizer
    from slimline.serve.engine import Engine
    from slimline.serve.models import load_language_model

    target_model = load_language_model(target)
    draft_model = load_language_model(draft) if draft is not None else None
    tokenizer = load_tokenizer(target)
    if draft is not None:
        check_same_vocabulary(tokenizer, load_tokenizer(draft), target, draft)
    return Engine(target_model, tokenizer, draft_model, k=k, adaptive=adaptive, max_active=max_active)


def check_same_vocabulary(target_tokenizer, draft_tokenizer, target: Path, draft: Path) -> None:
    """Speculative decoding compares token ids: both models must use the same tokenizer."""
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ArtifactError(f"the draft {draft} has a different vocabulary from the target {target}")


def resolve_pair(target: Path, draft: Path | None, k: int | None, adaptive: bool | None) -> tuple:
    """A ``serve`` artifact names its pair, k and adaptivity; explicit options win over it."""
    from slimline.serve.models import artifact_format
    from slimline.serve.stage import read_bundle

    if target.is_dir() and artifact_format(target) == "serve":
        bundle = read_bundle(target)
        target, draft = Path(bundle["target"]), draft or Path(bundle["draft"])
        k = k if k is not None else bundle["k"]
        adaptive = adaptive if adaptive is not None else bundle["adaptive"]
    return target, draft, k if k is not None else 4, True if adaptive is None else adaptive


def serve(
    target: Path,
    draft: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    k: int | None = None,
    adaptive: bool | None = None,
    max_active: int = 8,
    shutdown_grace_seconds: float = 10.0,
) -> None:
    """Serve until interrupted; SIGINT/SIGTERM finish in-flight requests for up to the grace period."""
    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise SlimlineError(f"serving needs {', '.join(missing)}: pip install 'slimline[serve]'")
    import uvicorn

    from slimline.serve.app import create_app

    name = model_name or target.name
    target, draft, k, adaptive = resolve_pair(target, draft, k, adaptive)
    engine = build_engine(target, draft, k, adaptive, max_active)
    app = create_app(engine, name, api_key, shutdown_grace_seconds)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use it", host)
    log.info(
        "serving %s (%s%s) on http://%s:%d",
        name,
        engine.target.backend,
        f", draft {draft.name} k={k}{' adaptive' if adaptive else ''}" if draft else ", no draft",
        host,
        port,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_grace_seconds)
