"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics, and
the routes of serving/responses.py (/v1/responses), serving/messages.py (Anthropic's /v1/messages) and
serving/live_routes.py (the page at / and its event stream /events).

Owns the app (its state, errors, the body size limit), checking the fields every request shares, making a
request's `n` choices, and /v1/completions (with echo and the prompt's logprobs). The chat path is
serving/chat.py's, text, logprobs and events from tokens serving/choices.py's, request fields
serving/fields.py's, tool formats generation/tools.py's, metrics serving/metrics.py's. Handlers only enqueue Sequences
and await their events; the one worker thread in generation/batching.py owns the model.
"""

from __future__ import annotations

import socket
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import MoepagerError
from ..generation.batching import Scheduler
from ..generation.constrain import Grammars
from ..generation.generate import SamplingParams
from ..generation.sampling import LogitsProcessor, TokenLogprob
from ..generation.tools import template_roles
from ..runtime.engine import Engine
from .chat import LARGE_TEXT, chat_completion
from .choices import Generation, collect, completion_logprobs, merged, sse, usage
from .fields import (
    MESSAGES_PATH,
    APIError,
    ChatBody,
    CompletionBody,
    LimitBody,
    RequestBody,
    adjustments,
    parse,
)
from .live import LiveFeed
from .live_routes import add_live_routes
from .messages import add_messages_routes
from .metrics import MeasureRequests, Metrics
from .responses import add_responses_routes

MAX_BODY_BYTES = 2 * 2**20  # larger request bodies get a 413 before they are read into memory


# --------------------------------------------------------------------------------------------- app


def _error_response(e: APIError, path: str = "") -> JSONResponse:
    body = e.anthropic_body() if path == MESSAGES_PATH else e.body()  # each API's own error shape
    return JSONResponse(body, status_code=e.status)


def create_app(engine: Engine, model_id: str, api_key: str | None = None, max_batch: int = 32,
               max_body_bytes: int = MAX_BODY_BYTES, announce: str | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI app; its lifespan starts and stops the worker that owns `engine` (and prints `announce`,
    when given, once that worker runs)."""
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
        if announce is not None:  # the model is loaded and the worker runs: clients may come
            print(announce, flush=True)
        yield
        scheduler.stop()

    app = FastAPI(title="moepager", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
    app.state.grammars, app.state.model_id, app.state.off_loop = grammars, model_id, _off_loop
    app.state.api_key = api_key
    app.state.template_roles = template_roles(tok) if tok is not None and tok.chat_template else (True, True)
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(MeasureRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return _error_response(APIError(400, str(e)), request.url.path)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(
            APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind),
            request.url.path,
        )

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        error = APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
        return _error_response(error, request.url.path)

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
        least = 0 if getattr(body, "echo", None) else 1  # echo with 0 new tokens: the prompt's logprobs only
        if not least <= max_tokens <= room:
            raise APIError(400, f"max_tokens must be between {least} and {room} (context {context} minus a "
                           f"{len(prompt)}-token prompt), got {max_tokens}", param="max_tokens")  # fmt: skip
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop strings", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        return max_tokens, SamplingParams(temperature, top_p, body.top_k or 0, body.seed, stop_ids), stops

    async def generations(body: RequestBody, prompt: list[int], default_max: int | None,
                          top_logprobs: int | None = None, grammar: tuple[str, str] | None = None,
                          prompt_logprobs: int | None = None) -> list[Generation]:  # fmt: skip
        """The request's `n` choices; grammar is (llguidance grammar, the request field it came from);
        prompt_logprobs: the top alternatives of each prompt token's logprob (None: no prompt logprobs)."""
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
            gens[-1].seq.prompt_logprobs = prompt_logprobs
        return gens

    def check_length(chars: int) -> None:
        if max_chars is not None and chars > max_chars:
            raise APIError(400, f"this model's maximum context length is {context} tokens; a {chars}-character "
                           "prompt cannot fit", param="messages", code="context_length_exceeded")  # fmt: skip

    app.state.generations, app.state.check_length = generations, check_length

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
        text_prompt = prompt if isinstance(prompt, str) else None
        if text_prompt is not None:
            if tok is None:
                raise APIError(
                    400, "this model has no tokenizer.json; send the prompt as token ids", param="prompt"
                )
            check_length(len(prompt))
            prompt = await _off_loop(len(prompt) > LARGE_TEXT, tok.encode, prompt)
        want = body.logprobs is not None
        echo_logprobs = body.logprobs if body.echo and want else None
        gens = await generations(body, prompt, 16, top_logprobs=body.logprobs, prompt_logprobs=echo_logprobs)
        rid, kind, created = f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time())
        echoed = "" if not body.echo else text_prompt if text_prompt is not None else _decode(tok, prompt)

        def response(choices: list, usage: dict | None = None) -> dict:
            out = {"id": rid, "object": kind, "created": created, "model": model_id, "choices": choices}
            return out if usage is None else {**out, "usage": usage}

        def echo_logprobs_json(g: Generation) -> dict | None:
            """The prompt's tokens with their logprobs; the first has none (nothing comes before it)."""
            if not want:
                return None
            out = completion_logprobs(tok, [TokenLogprob(prompt[0], None, [])] + (g.prompt_logprobs or []))
            out["top_logprobs"][0] = None
            return out

        if body.stream:
            offsets, started = [0] * len(gens), [False] * len(gens)

            async def events():
                async for i, delta, lps in merged(gens):
                    if body.echo and not started[i]:  # the prompt first, once its logprobs have come
                        started[i] = True
                        lp = echo_logprobs_json(gens[i])
                        offsets[i] = len(echoed)
                        yield response([{"index": i, "text": echoed, "logprobs": lp, "finish_reason": None}])
                    if delta is None:
                        yield response([{"index": i, "text": "", "logprobs": None,
                                         "finish_reason": gens[i].finish_reason}])  # fmt: skip
                        continue
                    lp = completion_logprobs(tok, lps, offsets[i]) if want else None
                    offsets[i] += len(delta)
                    yield response([{"index": i, "text": delta, "logprobs": lp, "finish_reason": None}])
                if include_usage(body):
                    yield response([], usage(gens))

            return sse(events())
        results = await collect(gens, request)
        choices = []
        for i, ((text, lps), g) in enumerate(zip(results, gens)):
            logprobs = completion_logprobs(tok, lps, len(echoed)) if want else None
            if body.echo and want:
                head = echo_logprobs_json(g)
                logprobs = {k: head[k] + logprobs[k] for k in logprobs}
            choices.append(
                {"index": i, "text": echoed + text, "logprobs": logprobs, "finish_reason": g.finish_reason}
            )
        return response(choices, usage(gens))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        body = await parse(request, ChatBody)
        return await chat_completion(request, body, model_id)

    add_responses_routes(app, authorize)
    add_messages_routes(app, authorize)
    add_live_routes(app, LiveFeed(engine, scheduler, model_id))
    return app


async def _off_loop(large: bool, fn, *args, **kwargs):
    """fn(*args) on a worker thread when its input is large, so the event loop keeps answering meanwhile."""
    return await run_in_threadpool(fn, *args, **kwargs) if large else fn(*args, **kwargs)


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids) if tok else " ".join(map(str, ids))


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

    shown = f"[{host}]" if ":" in host else host
    app = create_app(
        engine,
        model_id,
        api_key,
        announce=f"moepager: serving {model_id} at http://{shown}:{port}/v1 (live view: http://{shown}:{port}/)",
    )
    if sock is None:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[sock])
