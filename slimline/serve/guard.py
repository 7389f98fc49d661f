"""Request bodies checked before the application sees them: size, arrival time, UTF-8, JSON nesting.

``BodyGuard`` is plain ASGI middleware. For a request with a body it refuses a declared
``Content-Length`` over ``max_body_bytes`` at once (413, without reading a byte of it), otherwise
reads the body as it streams in, counting bytes (413 as soon as the count passes the limit, so
a 50 MB chunked upload costs at most the limit in memory), within ``body_timeout_s`` (408). A
body that is not UTF-8 or nests JSON deeper than ``max_json_depth`` gets 400 before
``json.loads`` runs. The checked body is then replayed to the application. Every refusal has
OpenAI's error shape and ``Connection: close`` (the rest of an oversized body is never read).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from slimline.serve.limits import ServerLimits
from slimline.untrusted import json_depth

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
BODY_METHODS = ("POST", "PUT", "PATCH")


class Refusal(Exception):
    """A request refused before the application runs: status, message and error code."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class ClientGone(Exception):
    """The client disconnected while sending its body."""


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "server_error", 500: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON; ``type`` follows the status."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_refusal(send: Send, refusal: Refusal) -> None:
    """Answer with the refusal and ask the server to close the connection."""
    body = json.dumps(error_body(refusal.status, refusal.message, code=refusal.code)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None when it has none; a malformed one is refused."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            if not value.strip().isdigit():
                raise Refusal(400, "the Content-Length header is not a number", "invalid_content_length")
            return int(value)
    return None


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refusal(
                413, f"the request body is larger than this server's limit of {limit:,} bytes", "body_too_large"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_body(body: bytes, max_depth: int) -> None:
    """Refuse (400) a body that is not UTF-8 or nests JSON deeper than ``max_depth``."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        message = f"the request body is not UTF-8 text (byte 0x{body[error.start]:02x} at offset {error.start})"
        raise Refusal(400, message, "invalid_encoding") from error
    depth = json_depth(body)
    if depth > max_depth:
        raise Refusal(400, f"the JSON body nests {depth} deep; this server accepts at most {max_depth}", "too_deep")


class BodyGuard:
    """ASGI middleware enforcing ``ServerLimits``' body limits (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limits: ServerLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the body of a POST/PUT/PATCH, then hand the application a replay of it."""
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            body = await self.checked_body(scope, receive)
        except Refusal as refusal:
            await send_refusal(send, refusal)
            return
        except ClientGone:
            return
        await self.app(scope, replay(body, receive), send)

    async def checked_body(self, scope: Scope, receive: Receive) -> bytes:
        """The body, read within the limits and checked; raises Refusal or ClientGone."""
        limit = self.limits.max_body_bytes
        length = declared_length(scope)
        if length is not None and length > limit:
            raise Refusal(
                413,
                f"the request body ({length:,} bytes) is larger than this server's limit of {limit:,}",
                "body_too_large",
            )
        try:
            body = await asyncio.wait_for(read_body(receive, limit), timeout=self.limits.body_timeout_s)
        except TimeoutError as error:
            raise Refusal(
                408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s", "body_timeout"
            ) from error
        check_body(body, self.limits.max_json_depth)
        return body


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body once, then defers to the real one (for disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
