"""The OpenAI-compatible server over real HTTP: the official client, streaming, errors, keys, concurrency."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest

from slimline.serve.app import create_app
from slimline.serve.bundle import ServeBundle
from slimline.serve.server import build_engine
from tests.conftest import build_tiny_model
from tests.serve.server_helpers import RunningServer

pytestmark = pytest.mark.e2e

API_KEY = "test-key-123"
MODEL = "tiny"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("serve")
    target = build_tiny_model(folder / "target", layers=2, seed=0)
    draft = build_tiny_model(folder / "draft", layers=1, seed=1)
    chat = '{% for message in messages %}### {{ message["role"] }}:\n{{ message["content"] }}\n{% endfor %}### assistant:\n'
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat}))
    return target, draft


@pytest.fixture(scope="module")
def server(models) -> Iterator[RunningServer]:
    target, draft = models
    engine = build_engine(ServeBundle(target, draft, k=3, adaptive=True), max_active=4)
    running = RunningServer(create_app(engine, MODEL, api_key=API_KEY, shutdown_grace_seconds=2))
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_openai_client_completion_and_chat_non_streaming(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="def main(", max_tokens=12, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens <= 12 and completion.usage.prompt_tokens > 0
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "write a loop"}], max_tokens=10, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    assert [m.id for m in client.models.list()] == [MODEL]


def test_streaming_equals_non_streaming_for_greedy(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=24, temperature=0)
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=MODEL, prompt="import os\n", max_tokens=24, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == whole.choices[0].text
    chat_pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0, stream=True
        )
    ]
    chat_whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0
    )
    assert "".join(chat_pieces) == chat_whole.choices[0].message.content


def test_speculative_and_target_only_give_the_same_greedy_text(client: openai.OpenAI) -> None:
    texts = {
        speculative: client.completions.create(
            model=MODEL, prompt="class A:\n", max_tokens=30, temperature=0, extra_body={"speculative": speculative}
        )
        .choices[0]
        .text
        for speculative in (True, False)
    }
    assert texts[True] == texts[False]


def test_stop_sequence_ends_the_text_before_it(client: openai.OpenAI) -> None:
    # A seeded request is reproducible when the target alone samples: speculative sampling draws its
    # random numbers in an order that depends on the adaptive draft length, exact only in distribution.
    sampled = {
        "model": MODEL,
        "prompt": "x = 1\n",
        "max_tokens": 30,
        "temperature": 1.0,
        "seed": 7,
        "extra_body": {"speculative": False},
    }
    free = client.completions.create(**sampled).choices[0].text
    start = next((i for i in range(2, len(free) - 2) if len(free[i : i + 2].strip()) == 2), None)
    if start is None:
        pytest.skip(f"the greedy text {free!r} has no usable stop string")
    stop = free[start : start + 2]
    stopped = client.completions.create(**sampled, stop=[stop])
    assert stopped.choices[0].text == free[: free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"model": "other", "prompt": "x"}', 404, "does not exist"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": 100000}', 400, "exceeds the model's context"),
        (b'{"model": "tiny", "prompt": "x", "temperature": -1}', 400, "temperature"),
        (b'{"model": "tiny"}', 400, "'prompt' is required"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    ],
)
def test_malformed_requests_get_4xx_with_a_reason(server: RunningServer, body: bytes, status: int, needle: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"  # still serving


def test_api_key_is_required_on_the_api(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_concurrent_streams_do_not_cross(client: openai.OpenAI) -> None:
    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(8)]
    expected = {
        p: client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0).choices[0].text
        for p in prompts
    }

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(prompts, pool.map(stream, prompts * 2), strict=False))
    assert results == expected


def test_client_disconnect_cancels_the_request(server: RunningServer, client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="x", max_tokens=250, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 15
    while httpx.get(f"{server.url}/health", timeout=10).json()["active"] > 0:
        assert time.monotonic() < deadline, "the abandoned request kept decoding"
        time.sleep(0.1)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'slimline_generations_total{finish_reason="cancelled"}' in metrics


def test_metrics_exposes_counters_and_acceptance(server: RunningServer, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="for i in", max_tokens=8, temperature=0)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in (
        "slimline_http_requests_total",
        "slimline_completion_tokens_total",
        "slimline_draft_acceptance_rate",
        "slimline_generation_seconds_bucket",
        "slimline_time_to_first_token_seconds_bucket",
    ):
        assert name in metrics


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(models) -> None:
    target, draft = models
    engine = build_engine(ServeBundle(target, draft, k=3, adaptive=True), max_active=2)
    running = RunningServer(create_app(engine, MODEL, shutdown_grace_seconds=20))
    result = {}

    def long_request() -> None:
        response = httpx.post(
            f"{running.url}/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 150, "temperature": 0},
            timeout=60,
        )
        result["response"] = response

    thread = threading.Thread(target=long_request)
    thread.start()
    while engine.load()["active"] == 0:
        time.sleep(0.01)
    running.stop()
    thread.join(timeout=60)
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] > 0
    assert not engine.accepting
