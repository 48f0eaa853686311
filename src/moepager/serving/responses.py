"""OpenAI's Responses API (POST /v1/responses), translated to the chat path of serving/chat.py.

Owns the Responses request (input as text or items: messages, function_call and function_call_output;
instructions, function tools, tool_choice, text.format), its translation into a ChatBody (whose checks then
apply, with errors naming the Responses field), the response object, its streamed events, and the bounded
memory of earlier responses that `previous_response_id` continues. Generation is the chat path's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse

from .chat import Reply, start_chat, tool_calls_json
from .fields import HARMLESS, APIError, ChatBody, parse, validated

# earlier conversations kept for previous_response_id, oldest dropped first past either bound
KEPT_RESPONSES, KEPT_CHARS = 256, 64 * 2**20
# the chat field a check names -> the Responses field the client sent
_PARAMS = {
    "max_tokens": "max_output_tokens",
    "messages": "input",
    "prompt": "input",
    "response_format": "text",
}
# fields accepted only at the value that asks for nothing this server lacks
_NEUTRAL = {"truncation": ("disabled",), "include": ([],), "reasoning": ({},), "top_logprobs": (0,),
            "background": (False,), "stream_options": ()}  # fmt: skip


class ResponsesBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown fields are refused by name below
    model: str
    input: str | list[dict]
    instructions: str | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    store: bool | None = None
    previous_response_id: str | None = None


def _refuse_unknown(body: ResponsesBody) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in HARMLESS or value is None or (name in _NEUTRAL and value in _NEUTRAL[name]):
            continue
        if name == "stream_options" and isinstance(value, dict) and set(value) <= {"include_obfuscation"}:
            continue
        raise APIError(400, f"{name}: is not supported by this server; remove it from the request", param=name,
                       code="unsupported_parameter")  # fmt: skip


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = [
        p.get("text") for p in parts if isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
    ]
    if len(texts) != len(parts) or not all(isinstance(t, str) for t in texts):
        raise APIError(
            400, f"{where}: only text content is supported (input_text, output_text)", param="input"
        )
    return "".join(texts)


def _messages(items: str | list[dict]) -> list[dict]:
    """Responses input items -> chat messages; a function call joins the assistant turn it follows."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for n, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{n}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role: {role!r} is not a message role", param="input")
            out.append({"role": role, "content": _text_of(item.get("content", ""), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}  # fmt: skip
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            content = output if isinstance(output, str) else _text_of(output, where)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        else:
            raise APIError(400, f"{where}: items of type {kind!r} are not supported (message, function_call, "
                           "function_call_output)", param="input")  # fmt: skip
    return out


def _tools(tools: list[dict] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for n, t in enumerate(tools):
        if t.get("type") != "function":
            raise APIError(400, f"tools[{n}]: only function tools are supported, not {t.get('type')!r}",
                           param="tools")  # fmt: skip
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function" or "name" not in choice:
            raise APIError(400, 'tool_choice: only "auto", "none", "required" or {"type": "function", "name": ...}',
                           param="tool_choice")  # fmt: skip
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict | None) -> dict | None:
    if not text:
        return None
    if text.get("verbosity") not in (None, "medium"):
        raise APIError(400, "text.verbosity: is not supported by this server", param="text")
    fmt = text.get("format") or {"type": "text"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt.get("type")}


def _renamed(e: APIError) -> APIError:
    """A chat check's error, naming the Responses field instead."""
    if e.param in _PARAMS:
        e.message = e.message.replace(e.param, _PARAMS[e.param], 1)
        e.param = _PARAMS[e.param]
    return e


class _Kept:
    """Earlier conversations (chat messages, the answer included) by response id: at most KEPT_RESPONSES of
    them and KEPT_CHARS characters of their messages."""

    def __init__(self):
        self.items: OrderedDict[str, tuple[list[dict], int]] = OrderedDict()  # id -> (messages, characters)
        self.chars = 0

    def get(self, rid: str) -> list[dict]:
        if rid not in self.items:
            raise APIError(404, f"previous_response_id: no response {rid!r} is kept here (this server keeps the "
                           f"last {KEPT_RESPONSES}, in memory)", param="previous_response_id",
                           code="previous_response_not_found")  # fmt: skip
        return self.items[rid][0]

    def put(self, rid: str, messages: list[dict]) -> None:
        size = len(json.dumps(messages))
        self.items[rid], self.chars = (messages, size), self.chars + size
        while len(self.items) > KEPT_RESPONSES or self.chars > KEPT_CHARS:
            self.chars -= self.items.popitem(last=False)[1][1]


def add_responses_routes(app, authorize) -> None:
    kept = _Kept()

    @app.post("/v1/responses", dependencies=[Depends(authorize)])
    async def responses(request: Request):
        body = await parse(request, ResponsesBody, check=_refuse_unknown)
        history = kept.get(body.previous_response_id) if body.previous_response_id else []
        turn_messages = history + _messages(body.input)
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        chat = {"model": body.model, "messages": system + turn_messages, "max_tokens": body.max_output_tokens,
                "temperature": body.temperature, "top_p": body.top_p, "tools": _tools(body.tools),
                "tool_choice": _tool_choice(body.tool_choice), "parallel_tool_calls": body.parallel_tool_calls,
                "response_format": _response_format(body.text)}  # fmt: skip
        try:  # the chat checks apply as they are; their errors name the Responses field
            chat_body = validated({k: v for k, v in chat.items() if v is not None}, ChatBody)
            turn = await start_chat(request.app.state, chat_body)
        except APIError as e:
            raise _renamed(e) from None
        shape = _Shape(body, request.app.state.model_id)
        store = body.store is not False

        def remember(reply: Reply) -> None:
            if store:
                answer = {"role": "assistant", "content": None if reply.is_calls else reply.text}
                if reply.is_calls:
                    answer["tool_calls"] = tool_calls_json(reply.calls)
                kept.put(shape.rid, turn_messages + [answer])

        shape.store = store
        if body.stream:
            return EventSourceResponse(_events(turn, shape, remember), ping=15)
        reply = (await turn.run(request))[0]
        remember(reply)
        return shape.response(reply, turn.usage())


class _Shape:
    """The response object of one request, as it is built."""

    def __init__(self, body: ResponsesBody, model_id: str):
        self.body, self.model_id = body, model_id
        self.rid, self.created, self.store = f"resp_{uuid.uuid4().hex}", int(time.time()), False
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def response(self, reply: Reply | None, usage: dict | None) -> dict:
        b = self.body
        status, incomplete = "in_progress", None
        if reply is not None:
            cut = reply.finish_reason == "length"
            status = "incomplete" if cut else "completed"
            incomplete = {"reason": "max_output_tokens"} if cut else None
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "error": None, "incomplete_details": incomplete, "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens, "model": self.model_id,
            "output": self.output(reply) if reply is not None else [],
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": self.store, "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": b.text or {"format": {"type": "text"}}, "tool_choice": b.tool_choice or "auto",
            "tools": b.tools or [], "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": "disabled",
            "usage": _usage(usage) if usage else None, "user": None, "metadata": {},
        }  # fmt: skip

    def output(self, reply: Reply) -> list[dict]:
        status = "incomplete" if reply.finish_reason == "length" else "completed"
        if reply.is_calls:
            return [self.call_item(c, status) for c in reply.calls if c.name is not None]
        return [self.message_item(reply.text, status)]

    def message_item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [_text_part(text)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def call_item(self, call, status: str, arguments: str | None = None) -> dict:
        args = call.arguments_json() if arguments is None else arguments
        return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id,
                "name": call.name, "arguments": args, "status": status}  # fmt: skip


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(u: dict) -> dict:
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}  # fmt: skip


async def _events(turn, shape: _Shape, remember):
    """The Responses streaming events, as server-sent events named by their type."""
    seq = 0

    def event(kind: str, **fields) -> dict:
        nonlocal seq
        seq += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": seq - 1, **fields})}

    yield event("response.created", response=shape.response(None, None))
    yield event("response.in_progress", response=shape.response(None, None))
    reply, text_open, calls = turn.replies[0], False, {}  # call index -> output index
    try:
        async for _, d, _ in turn.events():
            if d is None:
                break
            if d.kind == "text":
                if not text_open:
                    text_open = True
                    yield event("response.output_item.added", output_index=0,
                                item=shape.message_item(None, "in_progress"))  # fmt: skip
                    yield event("response.content_part.added", item_id=shape.message_id, output_index=0,
                                content_index=0, part=_text_part(""))  # fmt: skip
                yield event("response.output_text.delta", item_id=shape.message_id, output_index=0,
                            content_index=0, delta=d.text, logprobs=[])  # fmt: skip
            elif d.kind == "call":
                calls[d.index] = len(calls)
                item = shape.call_item(d.call, "in_progress", arguments="")
                yield event("response.output_item.added", output_index=calls[d.index], item=item)
            else:
                item_id = shape.call_item(d.call, "in_progress")["id"]
                yield event("response.function_call_arguments.delta", item_id=item_id,
                            output_index=calls[d.index], delta=d.text)  # fmt: skip
    except APIError as e:
        yield event("error", code=e.code, message=e.message, param=e.param)
        return
    status = "incomplete" if reply.finish_reason == "length" else "completed"
    if not reply.is_calls and not text_open:  # an empty answer is still one message
        text_open = True
        yield event(
            "response.output_item.added", output_index=0, item=shape.message_item(None, "in_progress")
        )
        yield event("response.content_part.added", item_id=shape.message_id, output_index=0, content_index=0,
                    part=_text_part(""))  # fmt: skip
    if text_open:
        yield event("response.output_text.done", item_id=shape.message_id, output_index=0, content_index=0,
                    text=reply.text, logprobs=[])  # fmt: skip
        yield event("response.content_part.done", item_id=shape.message_id, output_index=0, content_index=0,
                    part=_text_part(reply.text))  # fmt: skip
        yield event("response.output_item.done", output_index=0, item=shape.message_item(reply.text, status))
    for k, out_index in calls.items():
        item = shape.call_item(reply.calls[k], status)
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=out_index,
                    name=item["name"], arguments=item["arguments"])  # fmt: skip
        yield event("response.output_item.done", output_index=out_index, item=item)
    remember(reply)
    final = shape.response(reply, turn.usage())
    yield event(f"response.{final['status']}", response=final)
