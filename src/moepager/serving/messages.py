"""Anthropic's Messages API (POST /v1/messages), translated to the chat path of serving/chat.py.

Owns the Messages request (system, messages of text, tool_use and tool_result blocks, tools, tool_choice,
stop_sequences), its translation into a ChatBody (whose checks then apply, with errors naming the Messages
field), the message it answers with, its streamed events, and Anthropic's error shape. Generation is the
chat path's.
"""

from __future__ import annotations

import json
import uuid

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse

from .chat import Reply, start_chat
from .fields import MESSAGES_PATH, APIError, ChatBody, parse, validated

_HARMLESS = {"metadata", "service_tier", "container", "context_management"}
_NEUTRAL = {"thinking": ({"type": "disabled"},), "mcp_servers": ([],)}
_PARAMS = {
    "stop": "stop_sequences",
    "prompt": "messages",
}  # the chat field a check names -> the Messages field


class MessagesBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown fields are refused by name below
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict] = Field(min_length=1)
    system: str | list[dict] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = False
    tools: list[dict] | None = None
    tool_choice: dict | None = None


def _refuse_unknown(body: MessagesBody) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _HARMLESS or value is None or value in _NEUTRAL.get(name, ()):
            continue
        raise APIError(
            400, f"{name}: is not supported by this server; remove it from the request", param=name
        )


def _text(blocks, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    texts = [b.get("text") for b in blocks if isinstance(b, dict) and b.get("type") == "text"]
    if len(texts) != len(blocks) or not all(isinstance(t, str) for t in texts):
        raise APIError(400, f"{where}: only text blocks are supported here", param="messages")
    return "".join(texts)


def _chat_messages(body: MessagesBody) -> list[dict]:
    """Messages API messages -> chat messages: tool results become tool turns, tool uses an assistant's calls."""
    out = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for n, m in enumerate(body.messages):
        role, content, where = m.get("role"), m.get("content"), f"messages[{n}]"
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role: must be user or assistant, not {role!r}", param="messages")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content: a string or a list of blocks", param="messages")
        text, calls = [], []
        for k, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                text.append(block.get("text", ""))
            elif kind == "tool_use" and role == "assistant":
                fn = {"name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}
                calls.append({"id": block.get("id"), "type": "function", "function": fn})
            elif kind == "tool_result" and role == "user":
                result = block.get("content", "")
                result = _text(result, f"{where}.content[{k}].content") if result else ""
                if block.get("is_error"):
                    result = f"error: {result}"
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result})
            else:
                raise APIError(400, f"{where}.content[{k}]: {kind!r} blocks are not supported in a {role} message "
                               "(text; tool_use from the assistant; tool_result from the user)", param="messages")  # fmt: skip
        if calls:
            out.append({"role": "assistant", "content": "".join(text) or None, "tool_calls": calls})
        elif text or not any(b.get("type") == "tool_result" for b in content if isinstance(b, dict)):
            out.append({"role": role, "content": "".join(text)})
    return out


def _tools(tools: list[dict] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for n, t in enumerate(tools):
        if t.get("type") not in (None, "custom"):
            raise APIError(400, f"tools[{n}]: only client tools (name, input_schema) are supported, not "
                           f"{t.get('type')!r}", param="tools")  # fmt: skip
        fn = {"name": t.get("name"), "parameters": t.get("input_schema") or {"type": "object"}}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: dict | None) -> tuple[str | dict | None, bool | None]:
    """(the chat tool_choice, parallel_tool_calls)."""
    if choice is None:
        return None, None
    parallel = False if choice.get("disable_parallel_tool_use") else None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}, parallel
    if kind not in ("auto", "any", "none"):
        raise APIError(400, f"tool_choice.type: {kind!r} is not auto, any, tool or none", param="tool_choice")
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def _stop_reason(reply: Reply) -> tuple[str, str | None]:
    finish = reply.finish_reason
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if reply.gen.stop_string is not None:
        return "stop_sequence", reply.gen.stop_string
    return "end_turn", None


def _tool_use(call, whole: bool = True) -> dict:
    """A call as a tool_use block; its input empty when not whole (streaming sends it as partial JSON)."""
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name,
            "input": json.loads(call.arguments or "{}") if whole else {}}  # fmt: skip


def add_messages_routes(app, authorize) -> None:
    del authorize  # Anthropic's clients send the key as x-api-key: checked below, either header is accepted

    @app.post(MESSAGES_PATH)
    async def messages(request: Request):
        key = request.app.state.api_key
        sent = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix(
            "Bearer "
        )
        if key is not None and sent != key:
            raise APIError(401, "incorrect API key provided")
        body = await parse(request, MessagesBody, check=_refuse_unknown)
        choice, parallel = _tool_choice(body.tool_choice)
        chat = {"model": body.model, "messages": _chat_messages(body), "max_tokens": body.max_tokens,
                "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                "stop": body.stop_sequences, "tools": _tools(body.tools), "tool_choice": choice,
                "parallel_tool_calls": parallel}  # fmt: skip
        try:
            turn = await start_chat(request.app.state, validated({k: v for k, v in chat.items() if v is not None},
                                                                  ChatBody))  # fmt: skip
        except APIError as e:
            if e.param in _PARAMS:
                e.message, e.param = e.message.replace(e.param, _PARAMS[e.param], 1), _PARAMS[e.param]
            raise
        mid, model_id = f"msg_{uuid.uuid4().hex}", request.app.state.model_id
        if body.stream:
            return EventSourceResponse(_events(turn, mid, model_id), ping=15)
        reply = (await turn.run(request))[0]
        content = []
        if reply.is_calls:
            content = [_tool_use(c) for c in reply.calls if c.complete]
        elif reply.text:
            content = [{"type": "text", "text": reply.text}]
        reason, stop = _stop_reason(reply)
        usage = turn.usage()
        return {"id": mid, "type": "message", "role": "assistant", "model": model_id, "content": content,
                "stop_reason": reason, "stop_sequence": stop,
                "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}}  # fmt: skip


async def _events(turn, mid: str, model_id: str):
    """The Messages API's streaming events, as server-sent events named by their type."""

    def event(kind: str, **fields) -> dict:
        return {"event": kind, "data": json.dumps({"type": kind, **fields})}

    prompt_tokens = turn.gens[0].prompt_tokens
    yield event("message_start", message={"id": mid, "type": "message", "role": "assistant", "model": model_id,
                                          "content": [], "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}})  # fmt: skip
    reply, block, open_block = turn.replies[0], -1, False
    try:
        async for _, d, _ in turn.events():
            if d is None:
                break
            if d.kind == "text" and not open_block:
                block, open_block = block + 1, True
                yield event("content_block_start", index=block, content_block={"type": "text", "text": ""})
            if d.kind == "text":
                yield event("content_block_delta", index=block, delta={"type": "text_delta", "text": d.text})
            elif d.kind == "call":
                if open_block:
                    yield event("content_block_stop", index=block)
                block, open_block = block + 1, True
                yield event("content_block_start", index=block, content_block=_tool_use(d.call, whole=False))
            else:
                yield event("content_block_delta", index=block, delta={"type": "input_json_delta",
                                                                         "partial_json": d.text})  # fmt: skip
    except APIError as e:
        yield {"event": "error", "data": json.dumps(e.anthropic_body())}
        return
    if open_block:
        yield event("content_block_stop", index=block)
    reason, stop = _stop_reason(reply)
    yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": stop},
                usage={"output_tokens": turn.usage()["completion_tokens"]})  # fmt: skip
    yield event("message_stop")
