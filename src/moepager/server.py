"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Owns: request validation, OpenAI's response, chunk and error schemas, text (detokenizing, stop strings)
and server-sent events. Metrics are metrics.py's. Handlers only enqueue a Sequence and await its events; the one
worker thread in batching.py owns the model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from .batching import Scheduler, Sequence
from .engine import Engine
from .generate import SamplingParams
from .metrics import MeasureRequests, Metrics
from .tokenizer import StreamingDetokenizer

# ------------------------------------------------------------------------------------- request schema


class _Body(BaseModel):
    # strict: "5" is not an int here, as in OpenAI's API; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class APIError(Exception):
    """An error in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _parse(request: Request, schema: type[BaseModel]):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None  # the top-level field, as OpenAI reports it
        where = ".".join(str(p) for p in first["loc"])
        kind = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"{where}: {first['msg']}", param=param, code=kind) from None


# ---------------------------------------------------------------------------------------- generation


class Generation:
    """One request's sequence, seen as text: detokenizes, applies stop strings, counts usage."""

    def __init__(
        self, app_state, prompt: list[int], max_tokens: int, params: SamplingParams, stops: list[str]
    ):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def on_event(event):  # called on the worker thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop has closed: the server is shutting down
                pass

        self.state, self.stops = app_state, [s for s in stops if s]
        self.seq = Sequence(prompt, max_tokens, params, on_event)
        tok = app_state.engine.tokenizer
        self.detok = StreamingDetokenizer(tok) if tok else None
        self.prompt_tokens, self.completion_tokens = len(prompt), 0
        self.finish_reason: str | None = None
        self.t0 = time.perf_counter()

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def deltas(self, request: Request | None = None) -> AsyncIterator[str]:
        """Yield new text as it is generated. With `request`, polls for a client that went away."""
        text, sent = "", 0
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
                    if sent < len(text):
                        yield text[sent:]
                    return
                if self.completion_tokens == 0:
                    self.state.metrics.observe("first_token", time.perf_counter() - self.t0)
                self.completion_tokens += 1
                text += self.detok.add(value) if self.detok else f"{value} "
                cut = min(
                    (i for i in (text.find(s, max(0, sent - len(s))) for s in self.stops) if i >= 0),
                    default=-1,
                )
                if cut >= 0:
                    self.finish_reason, text = "stop", text[:cut]
                    if sent < len(text):
                        yield text[sent:]
                    return
                safe = len(text) - self._held_back(text)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
        finally:
            self.seq.cancel()  # no-op once finished; otherwise frees the sequence's KV cache
            self.state.metrics.prompt_tokens += self.prompt_tokens
            self.state.metrics.completion_tokens += self.completion_tokens

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that could still grow into a stop string."""
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)  # fmt: skip


# --------------------------------------------------------------------------------------------- app


def create_app(engine: Engine, model_id: str, api_key: str | None = None, max_batch: int = 32) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the worker that owns `engine`."""
    from contextlib import asynccontextmanager

    scheduler = Scheduler(engine, max_batch=max_batch)
    metrics = Metrics()
    context = engine.config.max_position_embeddings
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="moepager", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
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
        body: _Body, prompt: list[int], default_max: int | None
    ) -> tuple[int, SamplingParams, list[str]]:
        if body.model != model_id:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has {model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        bad = [i for i in prompt if not 0 <= i < engine.config.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
        room = context - len(prompt)
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                           f"{len(prompt)}", param="messages", code="context_length_exceeded")  # fmt: skip
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max or room, room)
        if not 1 <= max_tokens <= room:
            raise APIError(400, f"max_tokens must be between 1 and {room} (context {context} minus a "
                           f"{len(prompt)}-token prompt), got {max_tokens}", param="max_tokens")  # fmt: skip
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop strings", param="stop")
        stop_ids = list(engine.config.eos_token_ids) + (engine.tokenizer.eos_ids if engine.tokenizer else [])
        return max_tokens, SamplingParams(body.temperature, body.top_p, 0, body.seed, stop_ids), stops

    def include_usage(body: _Body) -> bool:
        return bool((body.stream_options or {}).get("include_usage"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(scheduler, engine), media_type="text/plain; version=0.0.4")

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
        body = await _parse(request, CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported (n=1)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if engine.tokenizer is None:
                raise APIError(
                    400, "this model has no tokenizer.json; send the prompt as token ids", param="prompt"
                )
            prompt = engine.tokenizer.encode(prompt)
        max_tokens, params, stops = check_common(body, prompt, default_max=16)
        gen = Generation(app.state, prompt, max_tokens, params, stops)
        rid, kind = f"cmpl-{uuid.uuid4().hex}", "text_completion"

        def choice(text: str, finish: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if body.stream:
            return _stream(gen, rid, kind, model_id, choice, "", include_usage(body))
        text = "".join([d async for d in gen.deltas(request)])
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_id,
                "choices": [choice(text, gen.finish_reason)], "usage": gen.usage()}  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        body = await _parse(request, ChatBody)
        tok = engine.tokenizer
        if tok is None or not tok.chat_template:
            raise APIError(
                400, "this model's tokenizer has no chat template; use /v1/completions", param="messages"
            )
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in body.messages]
        try:
            prompt = tok.encode_chat(messages)
        except Exception as e:  # a template may reject a conversation (e.g. roles that do not alternate)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        max_tokens, params, stops = check_common(body, prompt, default_max=None)
        gen = Generation(app.state, prompt, max_tokens, params, stops)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def choice(text: str | None, finish: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if body.stream:
            first = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            return _stream(gen, rid, "chat.completion.chunk", model_id, choice, first, include_usage(body))
        text = "".join([d async for d in gen.deltas(request)])
        message = {"role": "assistant", "content": text}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": gen.finish_reason}],
                "usage": gen.usage()}  # fmt: skip

    return app


def _content_text(content: str | list[dict] | None) -> str:
    if isinstance(content, list):  # content parts: only text is understood
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(parts)
    return content or ""


def _stream(gen: Generation, rid: str, kind: str, model_id: str, choice, first, with_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created = int(time.time())

    def chunk(choices: list, usage: dict | None = None) -> dict:
        body = {"id": rid, "object": kind, "created": created, "model": model_id, "choices": choices}
        if with_usage:
            body["usage"] = usage
        return {"data": json.dumps(body)}

    async def events():
        try:
            if isinstance(first, dict):  # chat opens with the assistant role
                yield chunk([first])
            async for delta in gen.deltas():
                yield chunk([choice(delta, None)])
            yield chunk([choice("" if kind == "text_completion" else None, gen.finish_reason)])
            if with_usage:
                yield chunk([], gen.usage())
        except APIError as e:
            yield {"data": json.dumps(e.body())}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)


def serve(engine: Engine, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info") -> None:  # fmt: skip
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine, model_id, api_key), host=host, port=port, log_level=log_level)
