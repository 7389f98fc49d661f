"""The serving engine: requests in, text out, continuous batching with speculative decoding.

One worker thread owns the models and schedules at every step (iteration-level scheduling, as
Orca and vLLM do): waiting requests are admitted into free slots (at most ``max_active``; a
finished or cancelled request frees its slot at once); then up to ``max_batch`` prefilled
requests run one speculative round together: batched draft passes, one batched target
verification, and each request accepts its own prefix (``serve/speculative.py``). Prompts of
admitted requests are taken at most ``max_step_tokens`` prompt tokens per step, so a long prompt
is taken in chunks while the others keep decoding; on a runtime without padding (llama.cpp) they
ride in that verification pass and cost no pass of its own (chunked prefill, as Sarathi-Serve);
a padded runtime (PyTorch, ONNX Runtime) gives them a pass before the round, since every row of
a padded pass is as long as its longest. When more requests are active than ``max_batch``, they
take turns by rotation; ``max_batch = 1`` is the old interleaved engine.
Every request has its own sequences, caches and random generator; nothing of one request is
visible to another.

Text is produced by decoding the generated ids as a whole and emitting only the new, complete
part: an incomplete UTF-8 character, or a tail that could still become a stop sequence, is held
back until it is resolved.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from slimline.runtime import RuntimeModel
from slimline.serve.sampling import SamplingParams
from slimline.serve.speculative import (
    DecodeStats,
    DraftLength,
    Lane,
    open_lane,
    prefill_rows,
    seeded_generator,
    speculative_round,
)

log = logging.getLogger(__name__)


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class EngineBusyError(RuntimeError):
    """The wait queue is full."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: prompt token ids, limits and how to pick tokens."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    speculative: bool = True


@dataclass
class Event:
    """A piece of a request's output; the last one has ``finish_reason`` and the request's figures."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # 'stop', 'length' or 'cancelled'
    usage: dict[str, Any] | None = None


@dataclass
class RequestHandle:
    """A submitted request: the consumer's callback for events and a way to cancel it."""

    id: int
    request: GenerationRequest
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); its slot frees at the next turn."""
        self.cancelled.set()


class TextStream:
    """Incremental detokenisation with stop sequences.

    Each step decodes only a few tokens, not the whole output (decoding a 2000-token SmolLM2
    reply took 2.3 ms on 2 cores: 16 of them at every step would cost as much as a batched pass):
    the new tokens are decoded together with the previous step's, and the new text is what the
    longer decode adds (as vLLM and TGI do), so a tokenizer that drops a leading space at the start
    of a decode, or a character split over tokens, gives the same text as decoding everything at
    once.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.decoded = ""  # the text of ids[: self.read_offset]
        self.prefix_offset = 0  # where the previous step's tokens begin: the context of the next decode
        self.read_offset = 0  # tokens already in ``decoded``
        self.sent = 0  # characters already emitted

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """Append tokens; return (text safe to emit now, whether a stop sequence was reached)."""
        self.ids += token_ids
        text = self._decode_new(final=False)
        for stop in self.stop:
            position = text.find(stop, max(0, self.sent - len(stop)))
            if position >= 0:
                return self._take(text, position), True
        return self._take(text, len(text) - self._stop_prefix_length(text)), False

    def flush(self) -> str:
        """Whatever is left at the end of the request (an incomplete character as U+FFFD)."""
        return self._take(self._decode_new(final=True), None)

    def _decode_new(self, final: bool) -> str:
        """The text so far: ``decoded`` extended by the tokens after ``read_offset``.

        A decode that ends in U+FFFD may end mid-character: it is shown up to that character but
        not kept, and the next step decodes the same tokens again with what follows.
        """
        if self.read_offset == len(self.ids):
            return self.decoded
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        new = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)[len(before) :]
        if new.endswith("\ufffd") and not final:  # only the last one can be a character still arriving
            return self.decoded + new[:-1]
        self.decoded += new
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self.decoded

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins a stop sequence."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self.sent)
        piece = text[self.sent : end]
        self.sent = end
        return piece


@dataclass
class Job:
    """An active request's decoding state, private to it."""

    handle: RequestHandle
    lane: Lane
    text: TextStream
    started: float
    first_token: float | None = None
    generated: int = 0

    @property
    def stats(self) -> DecodeStats:
        """The request's decoding figures."""
        return self.lane.stats


class Engine:
    """Continuous batching with speculative decoding for many clients on one target/draft pair."""

    def __init__(
        self,
        target: RuntimeModel,
        tokenizer,
        draft: RuntimeModel | None = None,
        k: int = 4,
        adaptive: bool = True,
        max_active: int = 16,
        max_batch: int | None = None,
        max_step_tokens: int = 512,
        max_queued: int = 256,
    ) -> None:
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        # What the engine learns about the pair (acceptance, batched pass costs) and the k it picks.
        self.draft_length = DraftLength(k, adaptive)
        self.max_active, self.max_queued = max_active, max_queued
        self.max_batch = min(max_batch or max_active, max_active)
        self.max_step_tokens = max_step_tokens
        self.eos_ids = eos_token_ids(tokenizer)
        self.waiting: deque[RequestHandle] = deque()
        self.active: list[Job] = []
        self.ids = count(1)
        self.lock = threading.Condition()
        self.accepting = True
        self.stopping = False
        self.totals = DecodeStats()
        self.batch_sizes: list[int] = []  # rows of recent decoding steps (the metrics' batch size)
        self.worker = threading.Thread(target=self._work, name="slimline-engine", daemon=True)
        self.worker.start()

    # -- the consumer side -------------------------------------------------------------------

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> RequestHandle:
        """Queue a request; ``emit`` is called from the worker thread with each event."""
        with self.lock:
            if not self.accepting:
                raise EngineClosedError("the server is shutting down")
            if len(self.waiting) >= self.max_queued:
                raise EngineBusyError(f"{len(self.waiting)} requests are already waiting; try again later")
            handle = RequestHandle(next(self.ids), request, emit)
            self.waiting.append(handle)
            self.lock.notify()
        return handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> tuple[str, Event]:
        """Blocking convenience: the whole text and the final event."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(request, events.put)
        pieces = []
        while True:
            event = events.get(timeout=timeout)
            pieces.append(event.text)
            if event.finish_reason is not None:
                return "".join(pieces), event

    def load(self) -> dict[str, int]:
        """Requests decoding now and waiting for a slot."""
        with self.lock:
            return {"active": len(self.active), "waiting": len(self.waiting)}

    def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Take no new requests, let in-flight ones finish for up to ``grace_seconds``, cancel the rest."""
        with self.lock:
            self.accepting = False
            deadline = time.monotonic() + grace_seconds
            while (self.active or self.waiting) and time.monotonic() < deadline:
                self.lock.wait(timeout=0.1)
            for job in self.active:
                job.handle.cancel()
            for handle in self.waiting:
                handle.cancel()
            self.stopping = True
            self.lock.notify_all()
        self.worker.join(timeout=30)

    # -- the worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.active and not self.waiting:
                    self.lock.wait()
                if self.stopping and not self.active and not self.waiting:
                    return
                while self.waiting and len(self.active) < self.max_active:
                    job = self._start_safely(self.waiting.popleft())
                    if job is not None:
                        self.active.append(job)
            self._step()

    def _step(self) -> None:
        """One scheduling step: drop cancelled requests, one round for a batch with a chunk of prompts riding in it."""
        for job in [job for job in self.active if job.handle.cancelled.is_set()]:
            self._finish(job, "", "cancelled")
        drafting = self.draft is not None and self.draft_length.k > 0  # k 0: the draft idles, uncached
        prefilling = [job for job in self.active if job.lane.behind(drafting)][: self.max_batch]
        ready = [job for job in self.active if job.lane.prefilled]
        batch = ready[: self.max_batch]
        prompt_rows, draft_rows, _ = prefill_rows([job.lane for job in prefilling], self.max_step_tokens, drafting)
        if draft_rows and self._run_safely(prefilling, lambda: self.draft.forward(draft_rows)) is None:
            return  # those requests ended; the next step schedules afresh
        if prompt_rows and (not batch or self.target.pads_rows):  # nothing to ride with, or padding would cost
            if self._run_safely(prefilling, lambda: self.target.forward(prompt_rows)) is None:
                return
            prompt_rows = []
            ready = [job for job in self.active if job.lane.prefilled]  # the prompts just filled join the round
            batch = ready[: self.max_batch]
        if not batch:
            return
        if len(ready) > self.max_batch:  # rotate: the next step starts with those left out of this one
            with self.lock:
                for job in batch:
                    self.active.remove(job)
                    self.active.append(job)
        self.batch_sizes = [*self.batch_sizes, len(batch)][-64:]
        lanes = [job.lane for job in batch]
        riding = [job for job in prefilling if job not in batch] if prompt_rows else []
        new_tokens = self._run_safely(
            batch + riding,
            lambda: speculative_round(
                self.target, self.draft, lanes, self.draft_length.k, self.draft_length, prompt_rows
            ),
        )
        for job, tokens in zip(batch, new_tokens or [], strict=True):
            self._advance_safely(job, tokens)

    def _run_safely(self, jobs: list[Job], work: Callable):
        """Run one batched pass; a backend failure ends the requests in it (never the engine) and gives None."""
        try:
            return work()
        except Exception as error:
            log.exception("a batched pass over %d requests failed", len(jobs))
            for job in jobs:
                self._finish(job, job.text.flush(), f"error: {type(error).__name__}: {error}")
            return None

    def _start_safely(self, handle: RequestHandle) -> Job | None:
        """``_start``, or None after telling the client why its request could not start (the engine goes on)."""
        try:
            return self._start(handle)
        except Exception as error:
            log.exception("request %d could not start", handle.id)
            self._emit_safely(handle, Event("", [], f"error: {type(error).__name__}: {error}"))
            return None

    def _advance_safely(self, job: Job, tokens: list[int]) -> None:
        """``_advance``; a failure outside the model (detokenising, the client's callback) ends only this request."""
        try:
            self._advance(job, tokens)
        except Exception as error:
            log.exception("request %d failed", job.handle.id)
            self._finish(job, "", f"error: {type(error).__name__}: {error}")

    @staticmethod
    def _emit_safely(handle: RequestHandle, event: Event) -> None:
        """Deliver a final event, ignoring a consumer that is already gone (its event loop closed)."""
        try:
            handle.emit(event)
        except Exception:
            log.warning("request %d: its client could not be told the request ended", handle.id)

    def _start(self, handle: RequestHandle) -> Job:
        request = handle.request
        draft = self.draft if request.speculative else None
        lane = open_lane(self.target, draft, request.prompt_ids, request.sampling, seeded_generator(request.seed))
        return Job(handle, lane, TextStream(self.tokenizer, request.stop), time.perf_counter())

    def _advance(self, job: Job, new_tokens: list[int]) -> None:
        """Take one round's tokens for a request: emit its new text, or finish it."""
        handle = job.handle
        if job.first_token is None:
            job.first_token = time.perf_counter()
        kept, finish = [], None
        for token in new_tokens:
            if token in self.eos_ids:
                finish = "stop"
                break
            kept.append(token)
            if job.generated + len(kept) >= handle.request.max_tokens:
                finish = "length"
                break
        job.generated += len(kept)
        piece, stopped = job.text.add(kept)
        if stopped:
            self._finish(job, piece, "stop", kept)
        elif finish is not None:
            self._finish(job, piece + job.text.flush(), finish, kept)
        elif job.lane.room <= 0:
            self._finish(job, piece + job.text.flush(), "length", kept)  # the context is full
        elif piece or kept:
            handle.emit(Event(piece, kept))

    def _finish(self, job: Job, piece: str, reason: str, token_ids: list[int] | None = None) -> None:
        """End a request: free its sequences and slot, send the last event with its figures."""
        elapsed = time.perf_counter() - job.started
        stats = job.stats
        usage = {
            "prompt_tokens": len(job.handle.request.prompt_ids),
            "completion_tokens": job.generated,
            "total_tokens": len(job.handle.request.prompt_ids) + job.generated,
            "acceptance_rate": stats.acceptance_rate,
            "draft_tokens_proposed": stats.proposed,
            "draft_tokens_accepted": stats.accepted,
            "target_forward_passes": stats.target_calls,
            "tokens_per_second": job.generated / elapsed if elapsed > 0 else None,
            "seconds": elapsed,
            "queue_seconds": job.started - job.handle.submitted,
            "time_to_first_token": (job.first_token - job.handle.submitted) if job.first_token else None,
        }
        with self.lock:
            if job in self.active:
                self.active.remove(job)
            self.totals.proposed += stats.proposed
            self.totals.accepted += stats.accepted
            self.lock.notify_all()
        try:
            job.lane.close()
        except Exception:
            log.exception("request %d: its sequences could not be released", job.handle.id)
        self._emit_safely(job.handle, Event(piece, token_ids or [], reason, usage))


def eos_token_ids(tokenizer) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS (and the generation config's, if it differs)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
