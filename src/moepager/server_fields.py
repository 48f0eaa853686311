"""The request side of the OpenAI API: body schemas, which fields are served, and errors in OpenAI's shape.

Owns parsing a request body (off the event loop when it is large), the rule that a field this server does
not honour is a 400 naming it (never silently ignored), and turning sampling fields into Adjustments.
Response shapes and generation are server.py's; tool formats are tools.py's.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .sampling import Adjustments

# Fields that change nothing about the output and are accepted as sent (OpenAI bookkeeping and hints).
HARMLESS = {
    "user",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
}
# Fields OpenAI knows that this server does not implement, accepted only at the value that asks for nothing.
NEUTRAL = {"echo": (False,), "suffix": ("",), "best_of": (1,), "store": (False,), "modalities": (["text"],),
           "audio": (), "functions": (), "function_call": (), "prediction": (), "reasoning_effort": (),
           "verbosity": (), "web_search_options": (), "moderation": (), "prompt_cache_options": ()}  # fmt: skip
_LARGE_BODY = 64 * 1024  # parsed on a worker thread above this, so /health never waits on a big body


class APIError(Exception):
    """An error in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "5" is not an int here, as in OpenAI's API
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # obfuscation pads against side channels: nothing to pad here


class _Body(BaseModel):
    # unknown fields are collected (extra="allow") and refused by name in `check_fields`
    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension; 0 = no limit
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)  # vLLM's extension; 1 = none
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)  # how many top alternatives per token (OpenAI: <= 5)


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None


async def parse(request: Request, schema: type[_Body]) -> _Body:
    raw = await request.body()
    if len(raw) > _LARGE_BODY:
        return await run_in_threadpool(_parse_raw, raw, schema)
    return _parse_raw(raw, schema)


def _parse_raw(raw: bytes, schema: type[_Body]) -> _Body:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None  # the top-level field, as OpenAI reports it
        where = ".".join(str(p) for p in first["loc"])
        kind = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"{where}: {first['msg']}", param=param, code=kind) from None
    check_fields(body)
    return body


def check_fields(body: _Body) -> None:
    """A field this server would not honour is refused by name: a silent 200 would mislead the client."""
    for name, value in (body.model_extra or {}).items():
        if name in HARMLESS or value is None or value in NEUTRAL.get(name, ()):
            continue
        known = "is not supported by this server" if name in NEUTRAL else "is not a field this server knows"
        raise APIError(400, f"{name}: {known}; remove it from the request", param=name,
                       code="unsupported_parameter")  # fmt: skip
    if isinstance(body, ChatBody) and body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def adjustments(body: _Body, vocab_size: int) -> Adjustments:
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0..{vocab_size - 1})",
                           param="logit_bias")  # fmt: skip
        if not -100 <= value <= 100:
            raise APIError(
                400, f"logit_bias: {value} for token {key} is outside [-100, 100]", param="logit_bias"
            )
        bias[int(key)] = float(value)
    rep = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    return Adjustments(body.presence_penalty or 0.0, body.frequency_penalty or 0.0, rep, bias)


def content_text(content: str | list[dict] | None) -> str:
    if isinstance(content, list):  # content parts: only text is understood
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(parts)
    return content or ""
