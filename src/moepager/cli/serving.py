"""`serve`, `top`, `fetch` and `list`: the HTTP server, its live panel in a terminal, hub models fetched ahead
of time, the models found here."""

from __future__ import annotations

import argparse
import sys

from ..errors import MoepagerError
from .model_options import (
    add_ray,
    add_remote_options,
    add_speculation,
    check_speculation,
    engine_options,
    model_or_default,
)


def cmd_serve(args) -> None:
    from .. import load
    from ..serving.server import reserve_port, serve

    check_speculation(args)
    sock = reserve_port(args.host, args.port)  # a taken port fails now, not after loading the model
    engine = load(*engine_options(args, model_or_default(args.model)))
    name = args.model_name or (str(args.model) if args.model else "default")
    serve(engine, name, host=args.host, port=args.port, api_key=args.api_key, sock=sock)


def add_serve(sub) -> None:
    import os

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    s.add_argument(
        "model", nargs="?", help="checkpoint folder or hub id (default: the embedded default model)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind; the default is loopback only")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--api-key", default=os.environ.get("MOEPAGER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MOEPAGER_API_KEY, else none)")  # fmt: skip
    s.add_argument("--model-name", help="the model id clients send (default: MODEL as given)")
    s.add_argument(
        "--expert-memory",
        help="expert cache budget, as for run (e.g. 25%% or 4GiB; default: every expert resident)",
    )
    s.add_argument("--memory-limit", help="whole-process memory limit, as for run (default: none)")
    s.add_argument("--max-context", type=int, help="context the KV cache is planned for under --memory-limit "
                   "(default: 4096, or what fits the limit)")  # fmt: skip
    s.add_argument(
        "--policy", choices=["lru", "lfu", "nextuse"], help="expert eviction policy (default: nextuse)"
    )
    s.add_argument("--prefetch", action=argparse.BooleanOptionalAction, help="read the next layer's likely "
                   "experts ahead, in the background (default: where a GPU computes; on the CPU every core computes)")  # fmt: skip
    s.add_argument("--fill", action=argparse.BooleanOptionalAction, help="read experts into the whole expert "
                   "cache at load, in large reads, as llama.cpp reads its mapped file (default: under --memory-limit)")  # fmt: skip
    s.add_argument(
        "--kv-memory",
        help="RAM for each sequence's KV cache (e.g. 64MiB); older blocks spill to disk (default: all in RAM)",
    )
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    add_speculation(s)
    add_ray(s)
    add_remote_options(s)
    s.set_defaults(func=cmd_serve)


def cmd_top(args) -> None:
    from ..serving.top import main as top_main

    if not args.url.startswith(("http://", "https://")):
        raise MoepagerError(
            f"top: {args.url!r} is not an http:// URL; give the server's, e.g. http://127.0.0.1:8000"
        )
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise MoepagerError(
            "top draws on a terminal: run it in one (stdin and stdout are not terminals here)"
        )
    top_main(args.url)


def add_top(sub) -> None:
    t = sub.add_parser(
        "top", help="the live expert cache panel of a running `moepager serve`, in the terminal"
    )
    t.add_argument("url", nargs="?", default="http://127.0.0.1:8000", help="the server's URL")
    t.set_defaults(func=cmd_top)


def cmd_fetch(args) -> None:
    from .fetch import fetch

    print(fetch(args.model, args.experts, args.local_store, args.revision, args.disk_budget, args.hot_set,
                args.text, args.tokens, args.verify, progress=not args.quiet))  # fmt: skip


def add_list_fetch(sub) -> None:
    ls = sub.add_parser("list", help="runnable MoE models in the Hugging Face cache and ollama's store")
    ls.add_argument("--json", action="store_true", help="one JSON list: name, where, family, size, path")
    ls.set_defaults(func=cmd_list)
    f = sub.add_parser("fetch", help="fill the local store of a hub model ahead of time (see run --remote)")
    f.add_argument("model", help="hub model id, ORG/NAME")
    f.add_argument("--experts", choices=["hot", "all"], default="all", help="all experts, or the hot ones: those "
                   "of --hot-set, else those a calibration text routes to (default: all)")  # fmt: skip
    f.add_argument(
        "--hot-set", help="a hot set file (run --save-hot-set) naming the experts to fetch (default: none)"
    )
    f.add_argument(
        "--text", help="calibration text for --experts hot (default: the packaged evaluation text)"
    )
    f.add_argument("--tokens", type=int, default=512, help="calibration tokens for --experts hot")
    f.add_argument(
        "--verify", action="store_true", help="check the stored experts' checksums; refetch bad ones"
    )
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    add_remote_options(f, flag=False)
    f.set_defaults(func=cmd_fetch)


def cmd_list(args) -> None:
    from ..moefy.default_model import listing
    from ..sources.catalog import main as list_main

    list_main(args.json, embedded=listing())
