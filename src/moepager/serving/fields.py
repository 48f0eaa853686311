"""The request side of the OpenAI API: body schemas, which fields are served, and errors in OpenAI's shape.

Owns the request body limit (413), parsing a body (off the event loop when it is large), the rule that a
field this server does not honour is a 400 naming it (never silently ignored), turning sampling fields into
Adjustments and `response_format` / `tools` / `tool_choice` into the grammar the output must follow.
Response shapes and generation are serving/server.py's; tool formats are generation/tools.py's.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..generation.constrain import json_schema_grammar, lark_grammar
from ..generation.sampling import Adjustments
from ..generation.tools import ToolFormat, chat_tool_format, tool_grammar

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
NEUTRAL = {"suffix": ("",), "best_of": (1,), "store": (False,), "modalities": (["text"],),
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

    def anthropic_body(self) -> dict:
        """The same error in the shape of Anthropic's Messages API: {"type": "error", "error": {type, message}}."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


MESSAGES_PATH = "/v1/messages"  # Anthropic's API: its errors take Anthropic's shape
# Anthropic's error types by HTTP status
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error"}  # fmt: skip


class _Strict(BaseModel):
    # strict: "5" is not an int here, as in OpenAI's API
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # obfuscation pads against side channels: nothing to pad here


class RequestBody(BaseModel):
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


class CompletionBody(RequestBody):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)  # how many top alternatives per token (OpenAI: <= 5)
    echo: bool | None = None  # the prompt first in the text (and its tokens' logprobs, with logprobs)


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


class ChatBody(RequestBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None


async def parse(request: Request, schema: type[BaseModel], check=None) -> BaseModel:
    """The request's body validated by `schema`, then by check(body) (default: check_fields)."""
    raw = await request.body()
    if len(raw) > _LARGE_BODY:
        return await run_in_threadpool(_parse_raw, raw, schema, check)
    return _parse_raw(raw, schema, check)


def _parse_raw(raw: bytes, schema: type[BaseModel], check=None) -> BaseModel:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return validated(data, schema, check)


def validated(data: dict, schema: type[BaseModel], check=None) -> BaseModel:
    """data validated by `schema` (errors in OpenAI's shape, naming the top-level field), then by check."""
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None  # the top-level field, as OpenAI reports it
        where = ".".join(str(p) for p in first["loc"])
        kind = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"{where}: {first['msg']}", param=param, code=kind) from None
    (check or check_fields)(body)
    return body


def check_fields(body: RequestBody) -> None:
    """A field this server would not honour is refused by name: a silent 200 would mislead the client."""
    for name, value in (body.model_extra or {}).items():
        if name in HARMLESS or value is None or value in NEUTRAL.get(name, ()):
            continue
        known = "is not supported by this server" if name in NEUTRAL else "is not a field this server knows"
        raise APIError(400, f"{name}: {known}; remove it from the request", param=name,
                       code="unsupported_parameter")  # fmt: skip
    if isinstance(body, ChatBody) and body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def adjustments(body: RequestBody, vocab_size: int) -> Adjustments:
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


def chat_grammar(
    body: ChatBody, tools: list[dict] | None, tok, can_constrain: bool
) -> tuple[tuple[str, str] | None, ToolFormat | None, bool]:
    """(grammar, field) the request's output must follow, or None; the tool format when calls may come; and
    whether the format's opener is one special token (which the reply's text then lacks).

    tok: the model's tokenizer (its chat template names the tool-call format, else the generic one is used);
    can_constrain: it has the tokenizer.json that grammars are compiled against."""
    choice = body.tool_choice
    if choice is not None and not tools and choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    rf = body.response_format
    wants_json = rf is not None and rf.type != "text"
    if (wants_json or tools) and not can_constrain:
        raise APIError(400, "structured output and tools need the model's tokenizer.json",
                       param="tools" if tools else "response_format")  # fmt: skip
    if tools and choice != "none":
        if wants_json:
            raise APIError(400, "response_format cannot be combined with tools", param="response_format")
        fmt, _ = chat_tool_format(tok.chat_template)
        only = None
        if isinstance(choice, dict):
            only = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or only not in {t["function"]["name"] for t in tools}:
                raise APIError(400, "tool_choice must name one of the tools: "
                               '{"type": "function", "function": {"name": ...}}', param="tool_choice")  # fmt: skip
        ids = tok.encode(fmt.open, add_special_tokens=False)
        special = ids[0] if len(ids) == 1 and tok.decode(ids) == "" else None
        parallel = body.parallel_tool_calls is not False and only is None
        lark = tool_grammar(fmt, tools, "auto" if choice in (None, "auto") else "required", only, parallel,
                            special)  # fmt: skip
        return (lark_grammar(lark), "tools"), fmt, special is not None
    if wants_json:
        if rf.type == "json_object":
            return (json_schema_grammar({"type": "object"}), "response_format"), None, False
        if rf.json_schema is None:
            raise APIError(400, "response_format json_schema needs a json_schema", param="response_format")
        return (json_schema_grammar(rf.json_schema.schema_ or {}), "response_format"), None, False
    return None, None, False


class LimitBody:
    """ASGI middleware: a request body over `max_bytes` gets a 413 and is never held in memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            while (await receive()).get("more_body"):  # drained, not kept: the client can read the answer
                pass
            e = self._error()
            body = e.anthropic_body() if scope.get("path") == MESSAGES_PATH else e.body()
            return await JSONResponse(body, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body with no declared length
                raise self._error()
            return message

        await self.app(scope, counted, send)

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                        code="request_too_large")  # fmt: skip
