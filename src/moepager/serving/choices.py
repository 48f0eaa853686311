"""One choice of a request as text: its Sequence's tokens detokenized, cut at stop strings, counted.

Owns turning a submitted Sequence's events (generation/batching.py) into text deltas with the logprobs of their tokens,
stop strings (held back until they cannot match), usage counts and the finish reason, and merging several
choices' deltas; tokens and logprobs as text in OpenAI's shapes, and OpenAI's server-sent events. The
other API shapes are the server modules'.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse

from ..generation.batching import Sequence
from ..generation.generate import SamplingParams
from ..generation.sampling import LogitsProcessor, TokenLogprob
from ..generation.tokenizer import StreamingDetokenizer
from .fields import APIError


class Generation:
    """One choice's sequence, seen as text: detokenizes, applies stop strings, counts usage, keeps logprobs."""

    def __init__(self, app_state, prompt: list[int], max_tokens: int, params: SamplingParams, stops: list[str],
                 processor: LogitsProcessor | None = None, counts_prompt: bool = True):  # fmt: skip
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def on_event(event):  # called on the worker thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop has closed: the server is shutting down
                pass

        self.state, self.stops, self.stop_ids = app_state, [s for s in stops if s], set(params.stop_ids)
        self.seq = Sequence(prompt, max_tokens, params, on_event, processor)
        tok = app_state.engine.tokenizer
        self.detok = StreamingDetokenizer(tok) if tok else None
        self.prompt_tokens, self.completion_tokens = len(prompt), 0
        self.counts_prompt = counts_prompt
        self.finish_reason: str | None = None
        self.stop_string: str | None = None  # the stop string that ended the text, if one did
        # the logprobs of the prompt's tokens, when the sequence asked for them
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.t0 = time.perf_counter()

    async def deltas(self, request: Request | None = None) -> AsyncIterator[tuple[str, list[TokenLogprob]]]:
        """Yield (new text, logprobs of its tokens) as generated. With `request`, stops if the client left."""
        text, sent, pending = "", 0, []
        proc = self.seq.processor
        want_logprobs = proc is not None and proc.top_logprobs is not None
        self.state.scheduler.submit(self.seq)
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(self.queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if kind == "error":
                    raise APIError(500, f"generation failed: {value}", type="server_error")
                if kind == "prompt_logprobs":
                    self.prompt_logprobs = value
                    continue
                if kind == "done":
                    self.finish_reason = "length" if value == "length" else "stop"
                    if sent < len(text) or pending:
                        yield text[sent:], pending
                    return
                if self.completion_tokens == 0:
                    self.state.metrics.first_token.observe(time.perf_counter() - self.t0)
                self.completion_tokens += 1
                if want_logprobs and value not in self.stop_ids:  # the end-of-sequence token is not text
                    pending.append(proc.logprobs[self.completion_tokens - 1])
                text += self.detok.add(value) if self.detok else f"{value} "
                hits = [(i, s) for s in self.stops if (i := text.find(s, max(0, sent - len(s)))) >= 0]
                if hits:
                    cut, self.stop_string = min(hits)
                    self.finish_reason, text = "stop", text[:cut]
                    if sent < len(text) or pending:
                        yield text[sent:], pending
                    return
                safe = len(text) - self._held_back(text)
                if safe > sent:
                    yield text[sent:safe], pending
                    sent, pending = safe, []
        finally:
            self.seq.cancel()  # no-op once finished; otherwise frees the sequence's KV cache
            if self.counts_prompt:
                self.state.metrics.prompt_tokens.inc(self.prompt_tokens)
            self.state.metrics.completion_tokens.inc(self.completion_tokens)

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that could still grow into a stop string."""
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)  # fmt: skip


def usage(gens: list[Generation]) -> dict:
    p, c = gens[0].prompt_tokens, sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def collect(gens: list[Generation], request: Request) -> list[tuple[str, list[TokenLogprob]]]:
    async def one(g: Generation):
        text, lps = [], []
        async for delta, lp in g.deltas(request):
            text.append(delta)
            lps.extend(lp)
        return "".join(text), lps

    return list(await asyncio.gather(*(one(g) for g in gens)))


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, str | None, list[TokenLogprob]]]:
    """The deltas of every choice as they come: (index, text, logprobs); text None once choice `index` ends."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation):
        try:
            async for delta, lps in g.deltas():
                await out.put((i, delta, lps))
            await out.put((i, None, []))
        except APIError as e:
            await out.put((i, e, []))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        for _ in range(len(gens)):
            while True:
                i, delta, lps = await out.get()
                if isinstance(delta, APIError):
                    raise delta
                yield i, delta, lps
                if delta is None:
                    break
    finally:
        for t in tasks:
            t.cancel()


# --------------------------------------------------------------------------------------- logprobs as text


def _token_text(tok, tid: int) -> str:
    """A token as text; a special token (or an id past the tokenizer's vocabulary) by its name, never ""."""
    text = tok.decode([tid]) if tok else str(tid)
    if not text:
        raw = tok.tok.id_to_token(tid) if hasattr(tok, "tok") else None
        text = raw or f"<|token_{tid}|>"
    return text


def chat_logprobs(tok, lps: list[TokenLogprob]) -> dict:
    def entry(tid: int, lp: float) -> dict:
        text = _token_text(tok, tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps],
            "refusal": None}  # fmt: skip


def completion_logprobs(tok, lps: list[TokenLogprob], offset: int = 0) -> dict:
    tokens = [_token_text(tok, x.token) for x in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{_token_text(tok, t): v for t, v in x.top} for x in lps], "text_offset": offsets}  # fmt: skip


def sse(events: AsyncIterator[dict]) -> EventSourceResponse:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""

    async def wrapped():
        try:
            async for chunk in events:
                yield {"data": json.dumps(chunk)}
        except APIError as e:
            yield {"data": json.dumps(e.body())}
        yield {"data": "[DONE]"}

    return EventSourceResponse(wrapped(), ping=15)
