"""The server's limits on what clients may send and hold: one typed settings object, documented in docs/serving.md.

Every limit bounds what one client can make the server spend (memory, CPU time, sockets, engine
slots) so that the others keep being served. ``slimline serve --limit name=value`` sets any of
them (e.g. ``--limit max_body_bytes=4194304``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimline.errors import SlimlineError


class ServerLimits(BaseModel):
    """What a client may send and hold; over a limit, a request gets a 4xx (or its connection is closed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the request body: checked while it streams in, before any JSON is parsed
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body; a larger one gets 413 before it is read in full."
    )
    max_json_depth: int = Field(
        32, ge=4, description="Deepest nesting of arrays/objects in a JSON body; deeper gets 400 before parsing."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Seconds the whole body may take to arrive once the headers are in; then 408."
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, description="Largest request line plus headers (h11's incomplete-event bound); then 400."
    )
    # what a request may ask of the engine
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Most prompt tokens; default the model's context (prompt + max_tokens must fit it too)."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens one request may generate; default the model's context."
    )
    max_stop_sequences: int = Field(4, ge=0, description="Most stop sequences per request (OpenAI allows 4).")
    max_stop_chars: int = Field(256, ge=1, description="Longest stop sequence, in characters.")
    # connections
    max_connections: int = Field(
        512, ge=1, description="Open connections in all; a new one beyond it is closed at once (503 for a request)."
    )
    max_connections_per_client: int = Field(
        32,
        ge=1,
        description="Open connections from one client address; a new one beyond it gets 429 and is closed at once.",
    )
    idle_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection with no request in progress is closed when a complete request head has not "
        "arrived this long after it opened or after its last response (slow or idle clients); also uvicorn's keep-alive.",
    )
    write_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A response whose writes stay blocked this long (a client that stops reading its stream) is "
        "dropped and its request cancelled.",
    )


def parse_limits(settings: list[str] | None) -> ServerLimits:
    """``['name=value', ...]`` (from ``--limit``) as ServerLimits; SlimlineError naming the bad setting."""
    values: dict[str, str] = {}
    for setting in settings or []:
        name, sep, value = setting.partition("=")
        if not sep or not name.strip():
            raise SlimlineError(f"--limit {setting!r}: expected name=value, e.g. max_body_bytes=4194304")
        values[name.strip()] = value.strip()
    try:
        return ServerLimits.model_validate(
            {name: (None if value == "none" else value) for name, value in values.items()}
        )
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        known = ", ".join(ServerLimits.model_fields)
        raise SlimlineError(f"--limit {name}: {first['msg']} (limits: {known})") from error
