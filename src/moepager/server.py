"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Owns OpenAI's response, chunk and error shapes, text (detokenizing, stop strings, logprobs as text),
`n` choices, structured output and tool calls in responses, the body size limit and server-sent events.
Request fields are server_fields.py's, tool formats tools.py's, metrics metrics.py's. Handlers only enqueue
Sequences and await their events; the one worker thread in batching.py owns the model.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .batching import Scheduler, Sequence
from .constrain import Grammars
from .engine import Engine
from .errors import MoepagerError
from .generate import SamplingParams
from .metrics import MeasureRequests, Metrics
from .sampling import LogitsProcessor, TokenLogprob
from .server_fields import (
    APIError,
    ChatBody,
    CompletionBody,
    LimitBody,
    RequestBody,
    adjustments,
    chat_grammar,
    content_text,
    parse,
)
from .tokenizer import StreamingDetokenizer
from .tools import parse_tool_calls, template_messages

MAX_BODY_BYTES = 2 * 2**20  # larger request bodies get a 413 before they are read into memory
_LARGE_TEXT = 16 * 1024  # characters of prompt above which tokenizing runs off the event loop


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
                cut = min(
                    (i for i in (text.find(s, max(0, sent - len(s))) for s in self.stops) if i >= 0),
                    default=-1,
                )
                if cut >= 0:
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


def _usage(gens: list[Generation]) -> dict:
    p, c = gens[0].prompt_tokens, sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _collect(gens: list[Generation], request: Request) -> list[tuple[str, list[TokenLogprob]]]:
    async def one(g: Generation):
        text, lps = [], []
        async for delta, lp in g.deltas(request):
            text.append(delta)
            lps.extend(lp)
        return "".join(text), lps

    return list(await asyncio.gather(*(one(g) for g in gens)))


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, str | None, list[TokenLogprob]]]:
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


# --------------------------------------------------------------------------------------------- app


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine: Engine, model_id: str, api_key: str | None = None, max_batch: int = 32,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:  # fmt: skip
    """The FastAPI app; its lifespan starts and stops the worker that owns `engine`."""
    from contextlib import asynccontextmanager

    scheduler = Scheduler(engine, max_batch=max_batch)
    metrics = Metrics(scheduler, engine)
    context = engine.config.max_position_embeddings
    created = int(time.time())
    tok = engine.tokenizer
    stop_ids = list(engine.config.eos_token_ids) + (tok.eos_ids if tok else [])
    # a text longer than this cannot fit the context whatever its tokens: refused before tokenizing it
    longest = (
        max(map(len, tok.tok.get_vocab(with_added_tokens=True)), default=1) if hasattr(tok, "tok") else None
    )
    max_chars = context * longest if longest else None
    grammars = Grammars(tok.tok.to_str(), engine.config.vocab_size, stop_ids) if hasattr(tok, "tok") else None

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="moepager", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(MeasureRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return _error_response(APIError(400, str(e)))

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(
            APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind)
        )

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "moepager"}

    def check_common(
        body: RequestBody, prompt: list[int], default_max: int | None
    ) -> tuple[int, SamplingParams, list[str]]:
        if body.model != model_id:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has {model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = context - len(prompt)
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                           f"{len(prompt)}", param="messages", code="context_length_exceeded")  # fmt: skip
        for i in (min(prompt), max(prompt)):
            if not 0 <= i < engine.config.vocab_size:
                raise APIError(400, f"token id {i} is outside the vocabulary", param="prompt")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max or room, room)
        if not 1 <= max_tokens <= room:
            raise APIError(400, f"max_tokens must be between 1 and {room} (context {context} minus a "
                           f"{len(prompt)}-token prompt), got {max_tokens}", param="max_tokens")  # fmt: skip
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop strings", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        return max_tokens, SamplingParams(temperature, top_p, body.top_k or 0, body.seed, stop_ids), stops

    async def generations(body: RequestBody, prompt: list[int], default_max: int | None,
                          top_logprobs: int | None = None, grammar: tuple[str, str] | None = None) -> list[Generation]:  # fmt: skip
        """The request's `n` choices; grammar is (llguidance grammar, the request field it came from)."""
        max_tokens, params, stops = check_common(body, prompt, default_max)
        adjust = adjustments(body, engine.config.vocab_size)
        constraints = [None] * (body.n or 1)
        if grammar is not None:
            try:  # compiling (and llguidance's tokenizer, the first time) stays off the event loop
                constraints = await run_in_threadpool(
                    lambda: [grammars.matcher(grammar[0]) for _ in constraints]
                )
            except MoepagerError as e:
                raise APIError(400, f"{grammar[1]}: {e}", param=grammar[1]) from None
        gens = []
        for i, constraint in enumerate(constraints):
            seed = params.seed
            if seed is not None and i:  # choice i samples from its own seed: distinct, reproducible
                seed = seed + i if seed + i < 2**64 else seed + i - 2**64
            processor = None
            if adjust.any or constraint is not None or top_logprobs is not None:
                processor = LogitsProcessor(prompt, adjust, constraint, top_logprobs)
            p = SamplingParams(params.temperature, params.top_p, params.top_k, seed, params.stop_ids)
            gens.append(Generation(app.state, prompt, max_tokens, p, stops, processor, counts_prompt=i == 0))
        return gens

    def check_length(chars: int) -> None:
        if max_chars is not None and chars > max_chars:
            raise APIError(400, f"this model's maximum context length is {context} tokens; a {chars}-character "
                           "prompt cannot fit", param="messages", code="context_length_exceeded")  # fmt: skip

    def include_usage(body: RequestBody) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        body = await parse(request, CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported (use n for several choices)",
                               param="prompt")  # fmt: skip
            prompt = prompt[0]
        if isinstance(prompt, str):
            if tok is None:
                raise APIError(
                    400, "this model has no tokenizer.json; send the prompt as token ids", param="prompt"
                )
            check_length(len(prompt))
            prompt = await _off_loop(len(prompt) > _LARGE_TEXT, tok.encode, prompt)
        gens = await generations(body, prompt, 16, top_logprobs=body.logprobs)
        rid, kind, created = f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time())
        want = body.logprobs is not None

        def response(choices: list, usage: dict | None = None) -> dict:
            out = {"id": rid, "object": kind, "created": created, "model": model_id, "choices": choices}
            return out if usage is None else {**out, "usage": usage}

        if body.stream:
            offsets = [0] * len(gens)

            async def events():
                async for i, delta, lps in _merged(gens):
                    if delta is None:
                        yield response([{"index": i, "text": "", "logprobs": None,
                                         "finish_reason": gens[i].finish_reason}])  # fmt: skip
                        continue
                    lp = completion_logprobs(tok, lps, offsets[i]) if want else None
                    offsets[i] += len(delta)
                    yield response([{"index": i, "text": delta, "logprobs": lp, "finish_reason": None}])
                if include_usage(body):
                    yield response([], _usage(gens))

            return _sse(events())
        results = await _collect(gens, request)
        choices = [{"index": i, "text": text, "logprobs": completion_logprobs(tok, lps) if want else None,
                    "finish_reason": g.finish_reason} for i, ((text, lps), g) in enumerate(zip(results, gens))]  # fmt: skip
        return response(choices, _usage(gens))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        body = await parse(request, ChatBody)
        if tok is None or not tok.chat_template:
            raise APIError(
                400, "this model's tokenizer has no chat template; use /v1/completions", param="messages"
            )
        messages = [
            {**m.model_dump(exclude_none=True), "content": content_text(m.content)} for m in body.messages
        ]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        grammar, fmt = chat_grammar(body, tools, tok, grammars is not None)
        chars = sum(len(m["content"]) for m in messages)
        check_length(chars)
        try:
            prompt = await _off_loop(
                chars > _LARGE_TEXT, tok.encode_chat, template_messages(messages), tools=tools
            )
        except Exception as e:  # a template may reject a conversation (e.g. roles that do not alternate)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        gens = await generations(body, prompt, None, top, grammar)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def response(choices: list, usage: dict | None = None, kind: str = "chat.completion.chunk") -> dict:
            out = {"id": rid, "object": kind, "created": created, "model": model_id, "choices": choices}
            return out if usage is None else {**out, "usage": usage}

        def message(text: str, finish: str | None) -> tuple[dict, str | None]:
            calls = parse_tool_calls(text, fmt) if fmt is not None and finish == "stop" else None
            if calls is None:
                return {"role": "assistant", "content": text}, finish
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"

        def logprobs(lps):
            return chat_logprobs(tok, lps) if body.logprobs else None

        if body.stream:
            buffered = [[] for _ in gens]  # tool calls are parsed from the whole text, then sent at once

            async def events():
                for i in range(len(gens)):
                    yield response([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}])  # fmt: skip
                async for i, delta, lps in _merged(gens):
                    if delta is None:
                        finish = gens[i].finish_reason
                        if fmt is not None:
                            msg, finish = message("".join(buffered[i]), finish)
                            msg.pop("role")
                            if msg.get("tool_calls"):
                                msg["tool_calls"] = [
                                    {"index": k, **c} for k, c in enumerate(msg["tool_calls"])
                                ]
                            yield response(
                                [{"index": i, "delta": msg, "logprobs": None, "finish_reason": None}]
                            )
                        yield response([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
                    elif fmt is not None:
                        buffered[i].append(delta)
                    else:
                        yield response([{"index": i, "delta": {"content": delta}, "logprobs": logprobs(lps),
                                         "finish_reason": None}])  # fmt: skip
                if include_usage(body):
                    yield response([], _usage(gens))

            return _sse(events())
        results = await _collect(gens, request)
        choices = []
        for i, ((text, lps), g) in enumerate(zip(results, gens)):
            msg, finish = message(text, g.finish_reason)
            choices.append({"index": i, "message": msg, "logprobs": logprobs(lps), "finish_reason": finish})
        return response(choices, _usage(gens), kind="chat.completion")

    return app


async def _off_loop(large: bool, fn, *args, **kwargs):
    """fn(*args) on a worker thread when its input is large, so the event loop keeps answering meanwhile."""
    return await run_in_threadpool(fn, *args, **kwargs) if large else fn(*args, **kwargs)


def _sse(events: AsyncIterator[dict]) -> EventSourceResponse:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""

    async def wrapped():
        try:
            async for chunk in events:
                yield {"data": json.dumps(chunk)}
        except APIError as e:
            yield {"data": json.dumps(e.body())}
        yield {"data": "[DONE]"}

    return EventSourceResponse(wrapped(), ping=15)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind host:port now, before the model loads, so a taken port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MoepagerError(f"cannot listen on {host}:{port}: {e.strerror}; pass a free --port") from None
    return sock


def serve(engine: Engine, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info", sock: socket.socket | None = None) -> None:  # fmt: skip
    """Run the server until interrupted, on `sock` when one was reserved with reserve_port."""
    import uvicorn

    app = create_app(engine, model_id, api_key)
    if sock is None:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[sock])
