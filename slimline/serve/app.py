"""The OpenAI-compatible HTTP API over the engine (FastAPI).

``/v1/completions`` and ``/v1/chat/completions`` (chat prompts through the tokenizer's chat
template), each streaming (server-sent events, ``data: [DONE]`` last) or not; ``/v1/models``;
``/health``; ``/metrics`` (Prometheus text). Errors use OpenAI's shape, ``{"error": {"message",
"type", "param", "code"}}``, with a 4xx status that says what was wrong with the request; the
server itself keeps serving. With an API key set, every ``/v1`` route needs ``Authorization:
Bearer <key>``. A client that disconnects cancels its request in the engine.

What a client may send is bounded by ``ServerLimits`` (``limits.py``): the body is checked by
``BodyGuard`` (``guard.py``) before FastAPI parses it; prompt length, ``max_tokens`` and stop
sequences here, before the engine sees the request. Prompts are tokenized on a worker thread, so
a long one does not stall the other clients' streams.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimline.serve.engine import Engine, EngineBusyError, EngineClosedError, Event, GenerationRequest
from slimline.serve.guard import BodyGuard, error_body
from slimline.serve.limits import ServerLimits
from slimline.serve.metrics import ServerMetrics
from slimline.serve.sampling import SamplingParams
from slimline.untrusted import lone_surrogate

# Below this, sampling is argmax in all but float rounding, and dividing logits by it overflows.
MIN_TEMPERATURE = 1e-4


class ApiError(Exception):
    """An error the client caused (or must wait out), in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def reject_lone_surrogates(value: Any) -> Any:
    r"""Text with a lone UTF-16 surrogate (from a JSON escape such as ``"\ud800"``) cannot be tokenized: refuse it."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for text in texts:
        position = lone_surrogate(text) if isinstance(text, str) else None
        if position is not None:
            raise ValueError(f"contains a lone UTF-16 surrogate at character {position} (not valid Unicode text)")
    return value


class SamplingFields(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's API does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed accepts
    n: int = Field(1, ge=1, le=1)
    speculative: bool = True  # slimline extension: false decodes with the target alone

    @field_validator("stop")
    @classmethod
    def valid_stop_text(cls, value: str | list[str] | None) -> str | list[str] | None:
        """Stop sequences must be valid Unicode (their number and length are the server's limits)."""
        return reject_lone_surrogates(value)

    def stops(self) -> tuple[str, ...]:
        """The stop sequences as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters (a temperature below MIN_TEMPERATURE is greedy)."""
        temperature = self.temperature if self.temperature >= MIN_TEMPERATURE else 0.0
        return SamplingParams(temperature=temperature, top_k=self.top_k, top_p=self.top_p)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value: str | list[str]) -> str | list[str]:
        """One prompt per request (n and batched prompts are not supported), valid Unicode."""
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt per request")
        return reject_lone_surrogates(value)

    def text(self) -> str:
        """The prompt text."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    """One chat message; content as text."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str

    @field_validator("content")
    @classmethod
    def valid_text(cls, value: str) -> str:
        """Content must be valid Unicode."""
        return reject_lone_surrogates(value)


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    shutdown_grace_seconds: float = 10.0,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """The FastAPI application serving ``engine`` as ``model_name``, within ``limits`` (default ServerLimits())."""
    limits = limits or ServerLimits()
    metrics = ServerMetrics(engine)
    context = engine.target.context_length
    prompts = PromptTokenizer(engine.tokenizer, min(limits.max_prompt_tokens or context, context))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        prompts.close()
        await asyncio.to_thread(engine.shutdown, shutdown_grace_seconds)

    app = FastAPI(title="slimline", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    app.add_middleware(BodyGuard, limits=limits)
    app.add_middleware(AuthenticateAndCount, api_key=api_key, metrics=metrics)  # outside: refusals are counted

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(error), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if engine.accepting else "shutting down", "model": model_name, **engine.load()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(model_name)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model, model_name)
        check_stops(body.stops(), limits)
        generation = generation_request(body, await prompts.completion(body.text()), context, limits)
        return await respond(request, engine, metrics, generation, body.stream, ReplyShape(model_name, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model, model_name)
        check_stops(body.stops(), limits)
        generation = generation_request(body, await prompts.chat(body.messages), context, limits)
        return await respond(request, engine, metrics, generation, body.stream, ReplyShape(model_name, chat=True))

    return app


class PromptTokenizer:
    """Prompts to token ids on one worker thread (the event loop keeps serving), long ones refused first.

    A token covers at most as many characters as its longest vocabulary entry, so text longer than
    ``limit`` tokens x that length (x 2 for normalizers that shrink text) is certainly over the limit
    and is refused without spending CPU on it.
    """

    def __init__(self, tokenizer: Any, limit: int) -> None:
        self.tokenizer, self.limit = tokenizer, limit
        self.longest_token = max((len(token) for token in tokenizer.get_vocab()), default=1)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimline-tokenize")

    async def completion(self, text: str) -> list[int]:
        """Token ids of a completion prompt."""
        self.check_length(len(text), "prompt")
        return await self.run(lambda: self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def chat(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of a conversation through the chat template."""
        self.check_length(sum(len(message.content) for message in messages), "messages")
        return await self.run(lambda: chat_prompt_ids(self.tokenizer, messages))

    def check_length(self, characters: int, param: str) -> None:
        """Refuse text certainly longer than the token limit."""
        if characters > 2 * self.limit * self.longest_token:
            raise ApiError(
                400,
                f"the prompt ({characters:,} characters) is far beyond this server's limit of {self.limit} prompt tokens",
                param,
                "context_length_exceeded",
            )

    async def run(self, work: Callable[[], list[int]]) -> list[int]:
        """Run ``work`` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, work)

    def close(self) -> None:
        """Stop the worker thread."""
        self.worker.shutdown(wait=False, cancel_futures=True)


class AuthenticateAndCount:
    """ASGI middleware: the API key on ``/v1`` paths, and every response counted with the time to its start.

    Plain ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware passes each streamed
    chunk through one more memory stream, event-loop CPU taken from the models on a small machine.
    """

    def __init__(self, app: Callable[..., Any], api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Refuse a /v1 request without the key; otherwise pass it on, counting its response."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, path = time.perf_counter(), scope["path"]

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.observe_http(path, message["status"], time.perf_counter() - started)
            await send(message)

        if self.api_key and path.startswith("/v1") and not authorized(Headers(scope=scope), self.api_key):
            refusal = JSONResponse(
                error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"),
                status_code=401,
            )
            await refusal(scope, receive, counted)
            return
        await self.app(scope, receive, counted)


def authorized(headers: Headers, api_key: str) -> bool:
    """Whether the request carries the key (compared in constant time)."""
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


def validation_error_body(error: RequestValidationError) -> dict[str, Any]:
    """A 400 body naming the first invalid field and what was wrong with it."""
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    elif first.get("type") == "missing":
        message = f"'{param}' is required"
    else:
        message = f"'{param}': {first['msg']}" if param else first["msg"]
    return error_body(400, message, param=param, code=first.get("type"))


def check_model(requested: str, served: str) -> None:
    """A request must name the served model."""
    if requested != served:
        raise ApiError(
            404, f"model {requested!r} does not exist; this server serves {served!r}", "model", "model_not_found"
        )


def model_card(name: str) -> dict[str, Any]:
    """An entry of ``/v1/models``."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "slimline"}


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Token ids of the conversation through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    conversation = [message.model_dump() for message in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as error:  # templates raise on conversations they refuse (roles out of order)
        raise ApiError(400, f"the chat template refused the conversation: {error}", "messages") from error
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_stops(stops: tuple[str, ...], limits: ServerLimits) -> None:
    """At most ``max_stop_sequences`` stop sequences of at most ``max_stop_chars`` characters."""
    if len(stops) > limits.max_stop_sequences:
        raise ApiError(400, f"at most {limits.max_stop_sequences} stop sequences are accepted", "stop")
    if any(len(stop) > limits.max_stop_chars for stop in stops):
        raise ApiError(400, f"a stop sequence is longer than {limits.max_stop_chars} characters", "stop")


def generation_request(
    body: SamplingFields, prompt_ids: list[int], context: int, limits: ServerLimits | None = None
) -> GenerationRequest:
    """Check the request against the context and the server's limits and build the engine's request."""
    limits = limits or ServerLimits()
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    max_tokens = body.max_completion_tokens or body.max_tokens or 16
    if limits.max_prompt_tokens is not None and len(prompt_ids) > limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt ({len(prompt_ids)} tokens) exceeds this server's limit of {limits.max_prompt_tokens} prompt tokens",
            "prompt",
            "context_length_exceeded",
        )
    if limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(
            400, f"max_tokens ({max_tokens}) exceeds this server's limit of {limits.max_tokens}", "max_tokens"
        )
    if len(prompt_ids) + max_tokens > context:
        raise ApiError(
            400,
            f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
            f"of {context} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        sampling=body.sampling(),
        stop=body.stops(),
        seed=body.seed,
        speculative=body.speculative,
    )


async def respond(
    request: Request,
    engine: Engine,
    metrics: ServerMetrics,
    generation: GenerationRequest,
    stream: bool,
    reply: ReplyShape,
):
    """Submit to the engine; stream the events as SSE or gather them into one response."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the engine's thread
        if event.finish_reason is not None:  # counted here, so requests whose client left count too
            metrics.observe_request(event.usage, event.finish_reason)
        loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        handle = engine.submit(generation, emit)
    except EngineBusyError as error:
        raise ApiError(429, str(error), code="queue_full") from error
    except EngineClosedError as error:
        raise ApiError(503, str(error), code="shutting_down") from error
    if stream:
        return StreamingResponse(
            stream_events(request, handle, events, reply),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    pieces = []
    try:
        while True:
            event = await events.get()
            pieces.append(event.text)
            if event.finish_reason is not None:
                break
    except asyncio.CancelledError:
        handle.cancel()
        raise
    if event.finish_reason.startswith("error"):
        raise ApiError(500, f"generation failed: {event.finish_reason}", code="generation_failed")
    return reply.whole("".join(pieces), event)


async def stream_events(
    request: Request, handle, events: asyncio.Queue[Event], reply: ReplyShape
) -> AsyncIterator[str]:
    """Server-sent events, one chunk per engine event; a disconnect cancels the request.

    A disconnect shows when a chunk is written; events without text write nothing, so after a
    second without a write the connection is asked directly.
    """
    last_contact = time.monotonic()
    try:
        if reply.chat:
            yield sse(reply.chunk({"role": "assistant", "content": ""}, None))
        while True:
            try:
                async with asyncio.timeout(1.0):  # cheaper than wait_for, which makes a task per event
                    event = await events.get()
            except TimeoutError:
                event = None
            if (event is None or not event.text) and time.monotonic() - last_contact > 1.0:
                if await request.is_disconnected():
                    handle.cancel()
                    return
                last_contact = time.monotonic()
            if event is None:
                continue
            if event.text or event.finish_reason:
                last_contact = time.monotonic()
                finish = "stop" if event.finish_reason == "cancelled" else event.finish_reason
                yield sse(reply.chunk(event.text, finish if event.finish_reason else None, event.usage))
            if event.finish_reason is not None:
                yield "data: [DONE]\n\n"
                return
    finally:
        handle.cancel()  # a no-op once finished; stops the work if the client went away


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


class ReplyShape:
    """OpenAI's response objects for completions and chat completions."""

    def __init__(self, model_name: str, chat: bool) -> None:
        self.model_name, self.chat = model_name, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def base(self, streaming: bool) -> dict[str, Any]:
        """Fields every object has."""
        kind = "chat.completion" if self.chat else "text_completion"
        if self.chat and streaming:
            kind = "chat.completion.chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def chunk(self, content: str | dict, finish: str | None, usage: dict | None = None) -> dict[str, Any]:
        """One streamed chunk."""
        if self.chat:
            delta = content if isinstance(content, dict) else ({"content": content} if content else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
        payload = {**self.base(streaming=True), "choices": [choice]}
        if usage is not None:
            payload["usage"] = public_usage(usage)
        return payload

    def whole(self, text: str, final: Event) -> dict[str, Any]:
        """The non-streaming response."""
        finish = "stop" if final.finish_reason == "cancelled" else final.finish_reason
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self.base(streaming=False), "choices": [choice], "usage": public_usage(final.usage)}


def public_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's usage fields plus slimline's decoding figures."""
    usage = usage or {}
    return {
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
        "acceptance_rate": usage.get("acceptance_rate"),
        "tokens_per_second": usage.get("tokens_per_second"),
    }
