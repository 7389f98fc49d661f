"""Fuzz targets: generated inputs for every entry point and the one property each must keep.

The property is the same everywhere: no uncaught exception, an exit code (CLI) or HTTP status
from the documented set, and a wall-time bound per case. The strategies make valid inputs
mutated field by field, random structure (YAML from its own tokens, JSON values) and random
bytes. ``tests/fuzz/test_fuzz.py`` runs each target with a short profile in ``make test`` and a
long one behind the ``slow`` marker; ``benchmarks/fuzz.py`` runs the long profile and counts.
"""

from __future__ import annotations

import copy
import json
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml
from hypothesis import strategies as st
from typer.testing import CliRunner

from slimline.cli import app
from tests.fuzz.samples import VALID_PIPELINE, valid_summary, write_run

CLI_CODES = {0, 1, 2}  # ok, a check failed (gate), refused input
HTTP_CODES = {200, 400, 401, 404, 408, 413, 429, 503}
CASE_SECONDS = 20.0  # per case, on a shared 2-core machine; a hang or a blow-up exceeds it by far
MODEL = "tiny"

# -- strategies -------------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
YAML_TOKENS = [
    *("name: x\n", "model: builtin:stdlib-coder\n", "stages:\n", "  - id: a\n", "    kind: lora\n"),
    *("    params: {rank: 4}\n", "release:\n", "  candidate: a\n", "seed: ", "data:\n", "  train: {path: x.txt}\n"),
    *("- ", ": ", "[", "]", "{", "}", ", ", "&a ", "*a", "&b ", "*b", "<<: *a\n", "? ", "'", '"', "\\"),
    *("!!int ", "!!str ", "!!binary ", "!!timestamp ", "!!float ", "!!set ", "!!python/object:os.system "),
    *("\n", "  ", "\t", "#", "---\n", "...\n", "%YAML 1.1\n", "|\n", ">\n", "1e400", "0x1F", ".inf", "~"),
    *("null", "yes", "2020-01-01", "\u2028", "\ufeff", "\x00", "9" * 50),
]
RANDOM_YAML = st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=4), max_size=60).map("".join)


def paths_of(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside nested dicts and lists (the root included)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths_of(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths_of(inner, (*prefix, index))
    return found


def mutate(document: Any, path: tuple, operation: str, value: Any) -> Any:
    """A copy of ``document`` with the node at ``path`` replaced, deleted, or given an unknown sibling key."""
    document = copy.deepcopy(document)
    if not path:
        return value if operation == "replace" else document
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if operation == "replace":
        parent[last] = value
    elif operation == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"unknown_{last}"] = value
    return document


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with one field replaced by any JSON-like value, deleted, or joined by an unknown field."""
    path = draw(st.sampled_from(paths_of(base)))
    operation = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    return mutate(base, path, operation, draw(VALUES))


VALID_DOCUMENT = yaml.safe_load(VALID_PIPELINE)
OVERRIDES = st.lists(
    st.builds(
        "{}={}".format,
        st.sampled_from([".".join(map(str, path)) for path in paths_of(VALID_DOCUMENT) if path]) | st.text(max_size=12),
        RANDOM_YAML | VALUES.map(lambda value: yaml.safe_dump(value, default_flow_style=True).strip()),
    ),
    max_size=3,
)

# -- the properties ---------------------------------------------------------------------------------

runner = CliRunner()


def invoke(args: list[str]) -> int:
    """Run the CLI in-process; the exit code, after asserting nothing escaped and it was quick."""
    started = time.perf_counter()
    result = runner.invoke(app, args)
    seconds = time.perf_counter() - started
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not escaped, f"{args}: uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}"
    assert result.exit_code in CLI_CODES, (args, result.exit_code, result.output)
    assert seconds < CASE_SECONDS, f"{args}: {seconds:.1f} s"
    return result.exit_code


class FuzzEnv:
    """Where cases write their files, and (started on first use) a guarded server over a tiny model."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="slimline-fuzz-"))
        self.cases = 0
        self.outcomes: Counter[str] = Counter()  # exit codes and HTTP statuses seen, for the benchmark's table
        self.server: Any = None

    def file(self, name: str, content: str | bytes) -> Path:
        """Write one case's file."""
        path = self.folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        return path

    def url(self) -> str:
        """The fuzzed server's base URL, started on first use."""
        if self.server is None:
            self.server = start_fuzz_server(self.folder)
        return f"http://127.0.0.1:{self.server.config.port}"

    def close(self) -> None:
        """Stop the server."""
        if self.server is not None:
            self.server.should_exit = True


def start_fuzz_server(folder: Path):
    """uvicorn with slimline's limits (max_tokens 8, short timeouts) over a tiny random model."""
    import uvicorn

    from slimline.models import load_tokenizer
    from slimline.runtime.torch_model import TorchModel
    from slimline.serve.app import create_app
    from slimline.serve.connections import uvicorn_config
    from slimline.serve.engine import Engine
    from slimline.serve.limits import ServerLimits
    from tests.conftest import build_tiny_model

    model = build_tiny_model(folder / "model")
    chat = '{% for m in messages %}{{ m["role"] }}: {{ m["content"] }}\n{% endfor %}assistant:'
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat}))
    limits = ServerLimits(max_tokens=8, idle_timeout_s=5, body_timeout_s=5, max_connections_per_client=64)
    engine = Engine(TorchModel(model), load_tokenizer(model), None, max_active=4)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(engine, MODEL, limits=limits)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits, log_level="critical"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the fuzzed server did not start"
        time.sleep(0.05)
    return server


def check_pipeline_text(env: FuzzEnv, text: str | bytes, overrides: list[str] | None = None) -> None:
    """``slimline validate`` on a generated file (and overrides): exit 0 or 2, quickly, nothing escapes."""
    env.cases += 1
    path = env.file("pipeline.yaml", text)
    code = invoke(["validate", str(path), *[part for override in overrides or [] for part in ("--set", override)]])
    env.outcomes[f"exit {code}"] += 1


def check_pipeline_document(env: FuzzEnv, document: Any) -> None:
    """A mutated pipeline document, written as YAML."""
    check_pipeline_text(env, yaml.safe_dump(document, allow_unicode=True))


def check_run_folder(env: FuzzEnv, summary: Any) -> None:
    """``gate``, ``compare`` and ``report`` on a run folder whose summary.json is mutated: exit 0, 1 or 2."""
    env.cases += 1
    run = write_run(env.folder / "run", summary=json.dumps(summary, allow_nan=True))
    good = write_run(env.folder / "good")
    env.outcomes[f"gate {invoke(['gate', str(run)])}"] += 1
    env.outcomes[f"compare {invoke(['compare', str(good), str(run)])}"] += 1
    env.outcomes[f"report {invoke(['report', str(run)])}"] += 1


def check_http_body(env: FuzzEnv, request: tuple[str, bytes]) -> None:
    """POST a generated body: a status from the documented set, OpenAI's error shape on 4xx, quickly."""
    env.cases += 1
    route, body = request
    started = time.perf_counter()
    response = httpx.post(env.url() + route, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    seconds = time.perf_counter() - started
    env.outcomes[f"HTTP {response.status_code}"] += 1
    assert response.status_code in HTTP_CODES, (route, body[:300], response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"], response.text
    assert seconds < CASE_SECONDS, f"{route}: {seconds:.1f} s"


def as_json(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


COMPLETION = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0, "stop": ["\n\n"]}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
ROUTES = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
HTTP_BODIES = (
    st.tuples(st.just("/v1/completions"), mutated(COMPLETION).map(as_json))
    | st.tuples(st.just("/v1/chat/completions"), mutated(CHAT).map(as_json))
    | st.tuples(ROUTES, VALUES.map(as_json))
    | st.tuples(ROUTES, st.binary(max_size=600))
)


@dataclass(frozen=True)
class Target:
    """One fuzzed entry point: what to generate and the property to check on it."""

    strategy: st.SearchStrategy
    check: Callable[[FuzzEnv, Any], None]
    short_examples: int  # in `make test`
    long_examples: int  # `pytest -m slow tests/fuzz`, benchmarks/fuzz.py


TARGETS: dict[str, Target] = {
    "pipeline: valid, mutated field by field": Target(mutated(VALID_DOCUMENT), check_pipeline_document, 120, 3000),
    "pipeline: random YAML": Target(RANDOM_YAML, check_pipeline_text, 200, 5000),
    "pipeline: random bytes": Target(st.binary(max_size=2000), check_pipeline_text, 100, 3000),
    "pipeline: --set overrides": Target(
        OVERRIDES, lambda env, sets: check_pipeline_text(env, VALID_PIPELINE, sets), 100, 3000
    ),
    "run folder: summary.json mutated": Target(mutated(valid_summary()), check_run_folder, 30, 500),
    "HTTP: request bodies": Target(HTTP_BODIES, check_http_body, 200, 4000),
}
