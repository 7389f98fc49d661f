"""Hostile clients against a real ``slimline serve`` stack (uvicorn + the guarded protocol + the app + the engine).

Every refusal is a 4xx in OpenAI's error shape (or a closed connection), arrives quickly, and the
server keeps answering everyone else. Limits are set small here so the timeouts take a second.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from slimline.models import load_tokenizer
from slimline.runtime.torch_model import TorchModel
from slimline.serve.app import create_app
from slimline.serve.engine import Engine
from slimline.serve.limits import ServerLimits
from tests.serve.server_helpers import RunningServer

pytestmark = pytest.mark.e2e

MODEL = "tiny"
LIMITS = ServerLimits(
    idle_timeout_s=1.0, body_timeout_s=1.0, write_timeout_s=1.0, max_connections_per_client=8, max_tokens=64
)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[RunningServer]:
    engine = Engine(TorchModel(tiny_model), load_tokenizer(tiny_model), None, max_active=4)
    running = RunningServer(create_app(engine, MODEL, shutdown_grace_seconds=2, limits=LIMITS), LIMITS)
    yield running
    running.stop()


def post(server: RunningServer, content, path: str = "/v1/completions", **options) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30, **options)


def still_serving(server: RunningServer, source: str = "127.0.0.2") -> str:
    """A greedy completion from another client address: the server kept serving."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=30) as client:
        response = client.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": "def f(x):", "max_tokens": 8, "temperature": 0},
        )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def chunks(total: int, size: int = 65_536) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        # the body: size, nesting, encoding
        (b'{"model": "tiny", "prompt": "' + b"x" * 3_000_000 + b'"}', 413, "larger than this server's limit"),
        (chunks(50 * 1024 * 1024), 413, "larger than this server's limit"),
        (b"[" * 10_000 + b"]" * 10_000, 400, "nests 10000 deep"),
        (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "not UTF-8 text"),
        (b'{"model": "tiny", "prompt": "\\ud800 lone"}', 400, "lone UTF-16 surrogate"),
        # what the request asks of the engine
        (json.dumps({"model": MODEL, "prompt": "x " * 400_000}).encode(), 400, "far beyond this server's limit"),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 65}).encode(), 400, "limit of 64"),
        (json.dumps({"model": MODEL, "prompt": "x", "stop": list("abcde")}).encode(), 400, "at most 4 stop"),
        (json.dumps({"model": MODEL, "prompt": "x", "stop": ["a" * 300]}).encode(), 400, "longer than 256"),
        (json.dumps({"model": MODEL, "prompt": "x", "seed": 2**70}).encode(), 400, "seed"),
    ],
)
def test_a_hostile_body_gets_a_4xx_quickly_and_others_are_served(
    server: RunningServer, content, status: int, needle: str
) -> None:
    started = time.perf_counter()
    response = post(server, content)
    assert time.perf_counter() - started < 10
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    still_serving(server)


def test_a_body_that_never_finishes_gets_408(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"mo')
        sock.settimeout(10)
        started = time.perf_counter()
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply
    assert time.perf_counter() - started < 5


def test_idle_and_trickling_connections_are_capped_and_closed(server: RunningServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    trickle = idle[0]
    trickle.sendall(b"GET /health HTTP/1.1\r\n")  # a request head that never completes
    text = still_serving(server)  # a different client address is not affected by the cap
    replies = []
    for sock in idle:
        sock.settimeout(10)
        try:
            replies.append(sock.recv(4096))
        except OSError as error:
            replies.append(repr(error).encode())
        sock.close()
    refused = [reply for reply in replies if reply.startswith(b"HTTP/1.1 429")]
    closed = [reply for reply in replies if reply == b""]
    assert len(refused) == 40 - LIMITS.max_connections_per_client
    assert b"too many open connections" in refused[0]
    assert len(closed) == LIMITS.max_connections_per_client  # the admitted ones, by the idle timeout
    assert text == still_serving(server, source="127.0.0.1")  # the cap frees up once they are gone


def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    finished: dict[str, float] = {}

    async def flood(scope, receive, send) -> None:  # an endless response, as a very long stream would be
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(4096):  # 256 MB at most
            await send({"type": "http.response.body", "body": b"x" * 65_536, "more_body": True})
        finished["at"] = time.monotonic()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    running = RunningServer(flood, LIMITS)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", running.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        deadline = started + 30
        while "at" not in finished:  # never reads: the server must give up on its own
            assert time.monotonic() < deadline, "the server kept waiting on a client that does not read"
            time.sleep(0.1)
        assert finished["at"] - started < 15
        sock.settimeout(5)
        received = 0
        while chunk := sock.recv(1 << 20):  # what was buffered, then the end: the connection is gone
            received += len(chunk)
        assert received < 64 * 1024 * 1024
        sock.close()
    finally:
        running.stop()
