"""The SSE stream notices a client that left even while the engine's events carry no text.

A request whose tokens decode to nothing (special tokens, text held back for a stop sequence)
writes no chunk, so a disconnect does not show as a failed write: after a second without a write
the stream asks the connection itself. A real Starlette request whose ASGI ``receive`` reports
the disconnect at a chosen moment drives ``stream_events``.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.requests import Request

from slimline.serve.app import ReplyShape, stream_events
from slimline.serve.engine import Event, GenerationRequest, RequestHandle

pytestmark = pytest.mark.unit

CONNECTED_SECONDS = 1.5  # longer than the stream's one-second check, so a wrong cancel would show


def test_a_text_less_stream_is_cancelled_soon_after_its_client_leaves() -> None:
    async def scenario() -> tuple[list[str], float, float]:
        left = asyncio.Event()

        async def receive() -> dict:
            await left.wait()  # a real client's connection: nothing to read until it closes
            return {"type": "http.disconnect"}

        request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive)
        handle = RequestHandle(1, GenerationRequest([1, 2, 3], max_tokens=10_000), lambda event: None)
        events: asyncio.Queue[Event] = asyncio.Queue()

        async def engine() -> None:  # one text-less event every 50 ms, as a decoding request would send
            while not handle.cancelled.is_set():
                events.put_nowait(Event("", [7]))
                await asyncio.sleep(0.05)

        async def client() -> float:
            await asyncio.sleep(CONNECTED_SECONDS)
            assert not handle.cancelled.is_set(), "the request was cancelled while its client was connected"
            left.set()
            return time.monotonic()

        producer, leaving = asyncio.create_task(engine()), asyncio.create_task(client())
        chunks = [chunk async for chunk in stream_events(request, handle, events, ReplyShape("tiny", chat=False))]
        ended = time.monotonic()
        left_at = await leaving
        await producer
        assert handle.cancelled.is_set()
        return chunks, left_at, ended

    chunks, left_at, ended = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert chunks == []  # no text, no chunk: only the connection check could have ended it
    assert 0 <= ended - left_at < 3.0, f"noticed {ended - left_at:.2f} s after the client left"
