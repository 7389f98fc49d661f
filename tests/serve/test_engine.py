"""The engine's continuous batching: requests decoded together, joining, leaving and cancelled mid-batch."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from slimline.models import load_tokenizer
from slimline.runtime.torch_model import TorchModel
from slimline.serve.engine import Engine, Event, GenerationRequest
from slimline.serve.sampling import SamplingParams
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchModel, TorchModel, object]:
    folder = tmp_path_factory.mktemp("engine-pair")
    target_folder = build_tiny_model(folder / "target", layers=2, seed=0)
    draft_folder = build_tiny_model(folder / "draft", layers=1, seed=1)
    return TorchModel(target_folder), TorchModel(draft_folder), load_tokenizer(target_folder)


def prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, 500, (n,), generator=generator).tolist() for n in [4, 40, 9, 17, 1, 26][:count]]


def collect(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[queue.Queue, object]:
    events: queue.Queue[Event] = queue.Queue()
    handle = engine.submit(GenerationRequest(prompt, max_tokens, SamplingParams()), events.put)
    return events, handle


def token_ids(events: queue.Queue) -> tuple[list[int], str]:
    ids = []
    while True:
        event = events.get(timeout=120)
        ids += event.token_ids
        if event.finish_reason is not None:
            return ids, event.finish_reason


def alone(pair, prompt: list[int], max_tokens: int) -> list[int]:
    target, _, tokenizer = pair
    engine = Engine(target, tokenizer, None, max_active=1)
    try:
        return token_ids(collect(engine, prompt, max_tokens)[0])[0]
    finally:
        engine.shutdown()


def test_requests_batched_together_give_their_outputs_alone(pair) -> None:
    target, draft, tokenizer = pair
    expected = [alone(pair, p, 20) for p in prompts(6)]
    engine = Engine(target, tokenizer, draft, k=3, max_active=8)
    try:
        pending = [collect(engine, p, 20)[0] for p in prompts(6)]
        outputs = [token_ids(events)[0] for events in pending]
    finally:
        engine.shutdown()
    assert outputs == expected
    assert max(engine.batch_sizes) > 1  # the requests really shared passes


def test_a_cancelled_request_leaves_the_others_unchanged(pair) -> None:
    target, draft, tokenizer = pair
    expected = [alone(pair, p, 24) for p in prompts(4)]
    engine = Engine(target, tokenizer, draft, k=2, max_active=4)
    try:
        pending = [collect(engine, p, 24) for p in prompts(4)]
        victim_events, victim = pending[1]
        first = victim_events.get(timeout=120)  # it has started decoding in the batch
        victim.cancel()
        outputs = [token_ids(events) for events, _ in pending]
    finally:
        engine.shutdown()
    assert outputs[1][1] == "cancelled" or first.finish_reason is not None
    for index in (0, 2, 3):
        assert outputs[index][0] == expected[index]


def test_more_requests_than_slots_wait_and_rotate(pair) -> None:
    """With max_batch below the active count, requests take turns; every output is still its own."""
    target, draft, tokenizer = pair
    expected = [alone(pair, p, 12) for p in prompts(5)]
    engine = Engine(target, tokenizer, draft, k=2, max_active=3, max_batch=2)
    try:
        results: list = [None] * 5

        def run(index: int, prompt: list[int]) -> None:
            results[index] = token_ids(collect(engine, prompt, 12)[0])[0]

        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts(5))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        engine.shutdown()
    assert results == expected
    assert max(engine.batch_sizes) == 2


@pytest.mark.parametrize("pads_rows", [False, True])
def test_a_long_prompt_is_taken_in_chunks_while_others_decode(pair, pads_rows: bool) -> None:
    """A short request keeps decoding while a long prompt fills in chunks: riding in its passes, or
    (a padded runtime) in passes of their own between its rounds."""
    target, draft, tokenizer = pair
    target.pads_rows = pads_rows  # as llama.cpp (False) or the dense runtimes (True) schedule
    short, long = prompts(1)[0], torch.randint(1, 500, (120,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = [alone(pair, short, 40), alone(pair, long, 8)]
    passes: list[list[int]] = []  # tokens per row of every target pass
    forward = target.forward
    target.forward = lambda feeds: (passes.append([len(f.tokens) for f in feeds]), forward(feeds))[1]
    # k fixed at 2: the short request needs 14 rounds or more, the long prompt 15 chunks of 8
    engine = Engine(target, tokenizer, draft, k=2, adaptive=False, max_active=2, max_step_tokens=8)
    try:
        short_events, _ = collect(engine, short, 40)
        short_events.put(short_events.get(timeout=120))  # the short request is decoding before the long one comes
        long_events, _ = collect(engine, long, 8)
        outputs = [token_ids(short_events)[0], token_ids(long_events)[0]]
    finally:
        engine.shutdown()
        del target.forward, target.pads_rows  # the model's own again
    assert outputs == expected
    riding = [rows for rows in passes if len(rows) == 2 and 8 in rows and min(rows) <= 3]
    alone_chunks = [i for i, rows in enumerate(passes) if rows == [8]]
    if pads_rows:
        assert not riding and len(alone_chunks) >= 5
        assert any(passes[i + 1] == [3] for i in alone_chunks)  # the short request's round between chunks
    else:
        assert len(riding) >= 5  # chunks of 8 prompt tokens shared passes with the short request's verification
