"""The OpenAI-compatible HTTP API over the engine (FastAPI).

``/v1/completions`` and ``/v1/chat/completions`` (chat prompts through the tokenizer's chat
template), each streaming (server-sent events, ``data: [DONE]`` last) or not; ``/v1/models``;
``/health``; ``/metrics`` (Prometheus text). Errors use OpenAI's shape, ``{"error": {"message",
"type", "param", "code"}}``, with a 4xx status that says what was wrong with the request; the
server itself keeps serving. With an API key set, every ``/v1`` route needs ``Authorization:
Bearer <key>``. A client that disconnects cancels its request in the engine.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimline.serve.engine import Engine, EngineBusyError, EngineClosedError, Event, GenerationRequest
from slimline.serve.metrics import ServerMetrics
from slimline.serve.sampling import SamplingParams


class ApiError(Exception):
    """An error the client caused (or must wait out), in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "server_error", 500: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    speculative: bool = True  # slimline extension: false decodes with the target alone

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        """OpenAI accepts up to four stop sequences."""
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stops(self) -> tuple[str, ...]:
        """The stop sequences as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value: str | list[str]) -> str | list[str]:
        """One prompt per request (n and batched prompts are not supported)."""
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt per request")
        return value

    def text(self) -> str:
        """The prompt text."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    """One chat message; content as text."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


def create_app(
    engine: Engine, model_name: str, api_key: str | None = None, shutdown_grace_seconds: float = 10.0
) -> FastAPI:
    """The FastAPI application serving ``engine`` as ``model_name``."""
    metrics = ServerMetrics(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_grace_seconds)

    app = FastAPI(title="slimline", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(error), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code)

    @app.middleware("http")
    async def authenticate_and_count(request: Request, call_next):
        started = time.perf_counter()
        if api_key and request.url.path.startswith("/v1") and not authorized(request, api_key):
            response = JSONResponse(
                error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"),
                status_code=401,
            )
        else:
            response = await call_next(request)
        metrics.observe_http(request.url.path, response.status_code, time.perf_counter() - started)
        return response

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
        prompt_ids = engine.tokenizer(body.text(), add_special_tokens=False)["input_ids"]
        return await respond(request, engine, metrics, body, prompt_ids, model_name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model, model_name)
        prompt_ids = chat_prompt_ids(engine.tokenizer, body.messages)
        return await respond(request, engine, metrics, body, prompt_ids, model_name, chat=True)

    return app


def authorized(request: Request, api_key: str) -> bool:
    """Whether the request carries the key (compared in constant time)."""
    header = request.headers.get("authorization", "")
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
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generation_request(body: SamplingFields, prompt_ids: list[int], context: int) -> GenerationRequest:
    """Check limits against the context and build the engine's request."""
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    max_tokens = body.max_completion_tokens or body.max_tokens or 16
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
    body: SamplingFields,
    prompt_ids: list[int],
    model_name: str,
    chat: bool,
):
    """Submit to the engine; stream the events as SSE or gather them into one response."""
    generation = generation_request(body, prompt_ids, engine.target.context_length)
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
    reply = ReplyShape(model_name, chat)
    if body.stream:
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
    """Server-sent events, one chunk per engine event; a disconnect cancels the request."""
    try:
        if reply.chat:
            yield sse(reply.chunk({"role": "assistant", "content": ""}, None))
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                    return
                continue
            if event.text or event.finish_reason:
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
