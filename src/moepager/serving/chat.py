"""The chat path that /v1/chat/completions, /v1/responses and /v1/messages share: messages -> prompt -> replies.

Owns turning a ChatBody into its prompt (the chat template, with tools in the template's own format or, for a
template that has none, the generic one of generation/tools.py), starting its choices' Generations, and reading each
choice while it is generated as a text answer or tool calls (generation/tool_stream.py). Also owns the shapes of
/v1/chat/completions. The Responses and Messages APIs translate their requests into a ChatBody and shape the
same replies their own way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from ..generation.sampling import TokenLogprob
from ..generation.tool_stream import Delta, PartialCall, ToolCallStream
from ..generation.tools import generic_messages, template_messages, tool_format
from .choices import Generation, chat_logprobs, merged, sse, usage
from .fields import APIError, ChatBody, chat_grammar, content_text

LARGE_TEXT = 16 * 1024  # characters of prompt above which tokenizing runs off the event loop


@dataclass
class Reply:
    """One choice read as it comes: a text answer (with its tokens' logprobs) or tool calls."""

    gen: Generation
    reader: ToolCallStream | None  # None when no tool call can come
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    _held: list[TokenLogprob] = field(default_factory=list)  # logprobs of text not yet known to be text

    def read(self, text: str | None, lps: list[TokenLogprob]) -> list[tuple[Delta, list[TokenLogprob]]]:
        """What `text` adds (None: the reply ended), each piece with the logprobs of its tokens."""
        if self.reader is None:
            self.text += text or ""
            self.logprobs += lps
            return [(Delta("text", text), lps)] if text else []
        self._held += lps
        deltas = self.reader.feed(text) if text is not None else self.reader.finish()
        out = []
        for d in deltas:
            if d.kind == "text":
                self.text += d.text
                self.logprobs += self._held
                out.append((d, self._held))
                self._held = []
            else:
                out.append((d, []))
        if self.reader.is_calls:
            self._held = []  # a call's tokens are not text: their logprobs are not reported
        return out

    @property
    def calls(self) -> list[PartialCall]:
        return self.reader.calls if self.reader is not None and self.reader.is_calls else []

    @property
    def is_calls(self) -> bool:
        return self.reader is not None and bool(self.reader.is_calls)

    @property
    def finish_reason(self) -> str:
        """Whole calls that ended are "tool_calls"; else the generation's "stop" or "length"."""
        if self.gen.finish_reason == "stop" and self.reader is not None and self.reader.complete:
            return "tool_calls"
        return self.gen.finish_reason or "stop"


class ChatTurn:
    """A chat request's choices, submitted once read: `events()` streams them, `run()` reads them whole."""

    def __init__(self, gens: list[Generation], tools_on: bool, fmt, opener_hidden: bool):
        self.gens = gens
        self.replies = [Reply(g, ToolCallStream(fmt, opener_hidden) if tools_on else None) for g in gens]

    async def events(self) -> AsyncIterator[tuple[int, Delta | None, list[TokenLogprob]]]:
        """(choice, what it added, logprobs) as generated; Delta None once that choice has ended."""
        async for i, text, lps in merged(self.gens):
            for d, dl in self.replies[i].read(text, lps):
                yield i, d, dl
            if text is None:
                yield i, None, []

    async def run(self, request: Request | None = None) -> list[Reply]:
        """Every choice to its end (or until the client leaves)."""

        async def one(r: Reply):
            async for text, lps in r.gen.deltas(request):
                r.read(text, lps)
            r.read(None, [])

        await asyncio.gather(*(one(r) for r in self.replies))
        return self.replies

    def usage(self) -> dict:
        return usage(self.gens)


async def start_chat(state, body: ChatBody) -> ChatTurn:
    """The ChatTurn of a chat request: its prompt rendered and its choices made (not yet submitted).

    state: the app's state (engine, grammars, generations(), check_length(), template_roles)."""
    tok = state.engine.tokenizer
    if tok is None or not tok.chat_template:
        raise APIError(
            400, "this model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    messages = [
        {**m.model_dump(exclude_none=True), "content": content_text(m.content)} for m in body.messages
    ]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    grammar, fmt, opener_hidden = chat_grammar(body, tools, tok, state.grammars is not None)
    chars = sum(len(m["content"]) for m in messages) + len(str(tools or ""))
    state.check_length(chars)
    if tool_format(tok.chat_template) is not None:  # the template renders tools, calls and results itself
        messages, template_tools = template_messages(messages), tools
    else:
        choice = body.tool_choice
        shown = tools if choice != "none" else None  # "none": the model is not told of tools it cannot call
        required = choice == "required" or isinstance(choice, dict)
        messages, template_tools = generic_messages(messages, shown, required, *state.template_roles), None
    try:
        prompt = await state.off_loop(chars > LARGE_TEXT, tok.encode_chat, messages, tools=template_tools)
    except Exception as e:  # a template may reject a conversation (e.g. roles that do not alternate)
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    top = (body.top_logprobs or 0) if body.logprobs else None
    gens = await state.generations(body, prompt, None, top, grammar)
    return ChatTurn(gens, fmt is not None, fmt, opener_hidden)


# ------------------------------------------------------------------------------- /v1/chat/completions


def tool_calls_json(calls: list[PartialCall]) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json()}}
            for c in calls if c.name is not None]  # fmt: skip


def _delta_json(d: Delta) -> dict:
    if d.kind == "text":
        return {"content": d.text}
    if d.kind == "call":  # OpenAI's shape: the call's id and name first, its arguments in later deltas
        fn = {"name": d.call.name, "arguments": ""}
        return {"tool_calls": [{"index": d.index, "id": d.call.id, "type": "function", "function": fn}]}
    return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}


async def chat_completion(request: Request, body: ChatBody, model_id: str):
    """/v1/chat/completions: the whole response, or its chunks as server-sent events."""
    turn = await start_chat(request.app.state, body)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def response(choices: list, usage: dict | None = None, kind: str = "chat.completion.chunk") -> dict:
        out = {"id": rid, "object": kind, "created": created, "model": model_id, "choices": choices}
        return out if usage is None else {**out, "usage": usage}

    def logprobs(lps):
        return chat_logprobs(request.app.state.engine.tokenizer, lps) if body.logprobs else None

    if body.stream:

        async def events():
            for i in range(len(turn.gens)):
                yield response([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}])  # fmt: skip
            async for i, d, lps in turn.events():
                if d is None:
                    finish = turn.replies[i].finish_reason
                    yield response([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
                else:
                    lp = logprobs(lps) if d.kind == "text" else None
                    yield response(
                        [{"index": i, "delta": _delta_json(d), "logprobs": lp, "finish_reason": None}]
                    )
            if body.stream_options and body.stream_options.include_usage:
                yield response([], turn.usage())

        return sse(events())
    choices = []
    for i, r in enumerate(await turn.run(request)):
        if r.is_calls:  # a call, even one cut short, is never returned as raw markup in content
            msg = {"role": "assistant", "content": None}
            if tool_calls_json(r.calls):
                msg["tool_calls"] = tool_calls_json(r.calls)
        else:
            msg = {"role": "assistant", "content": r.text}
        choices.append(
            {"index": i, "message": msg, "logprobs": logprobs(r.logprobs), "finish_reason": r.finish_reason}
        )
    return response(choices, turn.usage(), kind="chat.completion")
