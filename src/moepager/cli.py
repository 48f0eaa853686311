"""Command line: parses argv, builds objects, calls one module's function. Nothing below sees argparse."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MoepagerError


def _prompt_ids(engine, args) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise MoepagerError(
                f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}"
            ) from None
        bad = [i for i in ids if not 0 <= i < engine.config.vocab_size]
        if bad:
            raise MoepagerError(
                f"--prompt-ids: {bad[0]} is outside the vocabulary (0..{engine.config.vocab_size - 1})"
            )
        return ids
    if args.prompt is None:
        raise MoepagerError("give --prompt TEXT or --prompt-ids 1,2,3")
    if engine.tokenizer is None:
        raise MoepagerError(
            f"{engine.path} has no tokenizer.json; use --prompt-ids 1,2,3 instead of --prompt"
        )
    if engine.tokenizer.chat_template and not args.raw:
        return engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    return engine.tokenizer.encode(args.prompt)


def _model_or_default(model: str | None) -> str:
    """MODEL as given, or the embedded default: SmolLM2 carved into a MoE, built on first use."""
    if model is not None:
        return model
    from .default_model import default_model_path

    return str(default_model_path())


def _check_before_load(args) -> None:
    """Refuse what can be refused before the model is loaded: nothing is loaded or written for bad input."""
    from .engine import parse_device
    from .generate import check_sampling

    parse_device(args.device)
    check_sampling(args.max_tokens, args.temperature, args.top_p, args.top_k, cli=True)
    for flag, value in (("--max-context", args.max_context), ("--prefill-chunk", args.prefill_chunk)):
        if value is not None and value < 1:
            raise MoepagerError(f"{flag} {value}: give a positive number of tokens")


def _load(args):
    from . import load

    args.model = _model_or_default(args.model)
    kv = {"kv_memory": args.kv_memory, "prefill_chunk": args.prefill_chunk, "kv_spill_dir": args.kv_spill_dir}
    model, paging = open_remote(args, args.model, _paging_options(args))
    return load(
        model,
        device=args.device,
        dtype=args.dtype,
        experts_dtype=args.experts_dtype,
        **paging,
        **kv,
        **_ray_options(args),
    )


def _context(engine, args) -> int:
    """Positions a generation may reach: the model's context length, or less: --max-context, or the context a
    --memory-limit was planned for."""
    planned = getattr(getattr(engine.experts, "cache", None), "footprint", None) or {}
    given = [args.max_context, planned.get("context"), engine.config.max_position_embeddings]
    return min(n for n in given if n)


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}


def cmd_run(args) -> None:
    from .generate import check_sampling
    from .summary import DecodeReads, summary_line
    from .tokenizer import StreamingDetokenizer, check_utf8

    _check_before_load(args)
    if args.prompt is not None:
        check_utf8(args.prompt, "--prompt")
    engine = _load(args)
    ids = _prompt_ids(engine, args)
    check_sampling(args.max_tokens, prompt_tokens=len(ids), context=_context(engine, args), cli=True)
    detok = StreamingDetokenizer(engine.tokenizer) if engine.tokenizer else None
    out_ids, text = [], []
    if args.session:  # resumes the file if it exists (reusing the shared prefix), saves it at the end
        tokens = engine.stream_session(args.session, ids, args.max_tokens, **_sampling(args))
    else:
        tokens = engine.stream(ids, args.max_tokens, **_sampling(args))
    reads = DecodeReads(engine)
    for tid in reads.count(tokens):
        out_ids.append(tid)
        piece = detok.add(tid) if detok else f"{tid} "
        text.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    _save_paging_outputs(engine, args)
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": out_ids, "stats": engine.stats()}))
    else:
        print(flush=True)  # the text's line ends before the summary's begins
    print(summary_line(engine.stats(), reads), file=sys.stderr)


def cmd_chat(args) -> None:
    from .chat import Conversation
    from .chat import main as chat_main

    _check_before_load(args)
    engine = _load(args)
    conversation = Conversation(engine, args.max_tokens, _sampling(args), _context(engine, args), args.system)
    chat_main(conversation)
    _save_paging_outputs(engine, args)


def cmd_plan(args) -> None:
    from .engine import parse_device
    from .plan import format_plan, plan

    parse_device(args.device)
    if args.max_context is not None and args.max_context < 1:
        raise MoepagerError(f"--max-context {args.max_context}: give a positive number of tokens")
    if not args.seconds > 0:
        raise MoepagerError(f"--seconds {args.seconds}: give a positive time to measure for")
    model = _model_or_default(args.model)
    print(format_plan(plan(model, args.memory, args.max_context, device=args.device, dtype=args.dtype,
                           seconds=args.seconds, model_arg=args.model)))  # fmt: skip


def _add_chat_plan(sub) -> None:
    c = sub.add_parser("chat", help="talk with a model: streaming replies, history, the chat template; "
                       "/reset, /stats, /exit (stdin may be piped: one user turn per line)")  # fmt: skip
    c.add_argument("model", nargs="?", help="as for run (default: the embedded default model)")
    c.add_argument("--system", help="a system message opening the conversation (default: none)")
    add_model_options(c)
    c.set_defaults(func=cmd_chat)
    p = sub.add_parser("plan", help="before loading the experts: the memory a budget leaves them, measured disk "
                       "and compute speed, the decode speed to expect, and the flags to pass")  # fmt: skip
    p.add_argument("model", nargs="?", help="as for run (default: the embedded default model)")
    p.add_argument("--memory", required=True, help="the whole process's memory budget, e.g. 8GiB")
    p.add_argument("--max-context", type=int, help="tokens of context to plan the KV cache for "
                   "(default: 4096, or the most that fits)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument(
        "--seconds", type=float, default=1.0, help="time spent measuring the disk, and the compute"
    )
    p.set_defaults(func=cmd_plan)


def cmd_serve(args) -> None:
    from . import load
    from .server import reserve_port, serve

    sock = reserve_port(args.host, args.port)  # a taken port fails now, not after loading the model
    model = _model_or_default(args.model)
    given = {"expert_memory": args.expert_memory, "memory_limit": args.memory_limit, "policy": args.policy,
             "max_context": args.max_context, "prefetch": False if args.no_prefetch else None,
             "kv_memory": args.kv_memory}  # fmt: skip
    options = {k: v for k, v in given.items() if v is not None}  # load's own defaults for the rest
    source, options = open_remote(args, model, options)
    engine = load(source, device=args.device, dtype=args.dtype, **options, **_ray_options(args))
    name = args.model_name or (str(args.model) if args.model else "default")
    serve(engine, name, host=args.host, port=args.port, api_key=args.api_key, sock=sock)


def _add_serve(sub) -> None:
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
    s.add_argument(
        "--no-prefetch", action="store_true", help="do not read the next layer's likely experts ahead"
    )
    s.add_argument(
        "--kv-memory",
        help="RAM for each sequence's KV cache (e.g. 64MiB); older blocks spill to disk (default: all in RAM)",
    )
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    _add_ray(s)
    add_remote_options(s)
    s.set_defaults(func=cmd_serve)


def add_remote_options(p: argparse.ArgumentParser, flag: bool = True) -> None:
    """--remote and its settings, for any command that loads a model (run, serve, chat, fetch)."""
    g = p.add_argument_group("models from the hub, fetched as used (HF_ENDPOINT and HF_TOKEN apply)")
    if flag:
        g.add_argument("--remote", action="store_true", help="MODEL is a hub id (ORG/NAME): fetch config, "
                       "tokenizer and dense weights, then each expert by range when first needed, into a local "
                       "store that later runs read (offline too)")  # fmt: skip
    g.add_argument("--revision", help="branch, tag or commit of the hub model (default: main)")
    g.add_argument("--local-store", help="folder of the local stores (default: $HF_HOME/moepager)")
    g.add_argument("--disk-budget", help="disk for fetched experts (20GiB, or 50%% of the model's experts); "
                   "the least used are evicted from disk (default: no limit)")  # fmt: skip


def open_remote(args, model, paging: dict) -> tuple:
    """With --remote: the RemoteSource to load instead of MODEL, and paging on (experts fetched as used)."""
    if not getattr(args, "remote", False):
        return model, paging
    from .store.remote import RemoteSource

    source = RemoteSource(model, args.local_store, args.revision, args.disk_budget)
    if not any(paging.get(k) for k in ("expert_memory", "memory_limit", "pins", "hot_set")):
        paging = {**paging, "expert_memory": "100%"}  # every expert may stay in RAM, fetched when first used
    return source, paging


def cmd_fetch(args) -> None:
    from .fetch import fetch

    print(fetch(args.model, args.experts, args.local_store, args.revision, args.disk_budget, args.hot_set,
                args.text, args.tokens, args.verify, progress=not args.quiet))  # fmt: skip


def _add_fetch(sub) -> None:
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


def _add_ray(p) -> None:
    p.add_argument("--ray", metavar="ADDRESS", help="spread the routed experts over actors of this Ray cluster "
                   "(auto, 127.0.0.1:6379, local); --expert-memory is then each actor's budget (default: one process)")  # fmt: skip
    p.add_argument("--ray-actors", type=int, help="expert actors (default: one per node of the cluster)")
    p.add_argument("--ray-placement", metavar="TRACE", help="place experts by their usage in this routing trace "
                   "(from --trace) instead of round-robin (default: round-robin)")  # fmt: skip
    p.add_argument(
        "--ray-replicate", type=int, default=0, help="hottest experts per layer held by two actors"
    )


def _ray_options(args) -> dict:
    if args.ray is None:
        if args.ray_actors is not None or args.ray_placement or args.ray_replicate:
            raise MoepagerError("--ray-actors, --ray-placement and --ray-replicate need --ray ADDRESS")
        return {}
    return {"ray": args.ray, "ray_actors": args.ray_actors, "ray_placement": args.ray_placement,
            "ray_replicate": args.ray_replicate}  # fmt: skip


def cmd_synth(args) -> None:
    from .synth import SynthSpec, parse_size, synth

    spec = SynthSpec(family=args.family, hidden=args.hidden, intermediate=args.intermediate, experts=args.experts,
                     top_k=args.top_k, layers=args.layers or 0, dtype=args.dtype, seed=args.seed)  # fmt: skip
    size = parse_size(args.size) if args.size else None
    print(synth(args.out, spec, size, progress_bar=not args.quiet))


def cmd_bench(args) -> None:
    from .bench import BenchOptions
    from .bench import main as bench_main

    bench_main(BenchOptions.from_cli(args))


def _add_synth_bench(sub) -> None:
    s = sub.add_parser(
        "synth", help="write a large random MoE checkpoint (Hugging Face layout) for benchmarks"
    )
    s.add_argument("out", help="folder to create")
    s.add_argument("--family", default="mixtral", help="mixtral or qwen3_moe")
    s.add_argument("--size", help="target size, e.g. 8GiB (sets the number of layers; default: --layers)")
    s.add_argument("--layers", type=int, help="number of layers (instead of --size; default: from --size)")
    s.add_argument("--hidden", type=int, default=2048, help="hidden size D")
    s.add_argument("--intermediate", type=int, default=6144, help="intermediate size of one expert")
    s.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    s.add_argument("--top-k", type=int, default=2, help="experts per token")
    s.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    s.add_argument("--seed", type=int, default=0, help="of the random weights")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser("bench", help="tokens/s and memory vs expert budget, against peers and the disk limit")
    b.add_argument("model", help="checkpoint folder or MoE .gguf file (moepager and llama.cpp run the same)")
    b.add_argument("--budgets", default="10%,25%,50%,100%", help="expert memory budgets: percents or sizes")
    b.add_argument("--rounds", type=int, default=3, help="alternating rounds; median and range are reported")
    b.add_argument("--tokens", type=int, default=16, help="tokens to generate per run")
    b.add_argument("--prompt-tokens", type=int, default=32, help="tokens of the prompt")
    b.add_argument("--peers", default="accelerate,naive,llamacpp", help="comma list, or 'none'")
    b.add_argument("--memory-cap", default="auto",
                   help="total memory cap per run incl. page cache: auto (resident + budget + overhead) or a size")  # fmt: skip
    b.add_argument("--overhead", default="1GiB", help="added to resident + budget by --memory-cap auto")
    b.add_argument("--no-cgroup", action="store_true", help="do not use a cgroup even when one is available")
    b.add_argument(
        "--work-dir",
        help="where peers' files go (per-expert .pt files, offload folder; default: beside MODEL)",
    )
    b.add_argument("--out", default="benchmarks/results", help="folder for the JSON, markdown and PNG")
    b.add_argument("--name", help="file stem of the results (default: the model folder's name)")
    b.add_argument("--dtype", help="compute dtype (default: the checkpoint's)")
    b.add_argument(
        "--engine-option",
        action="append",
        metavar="KEY=VALUE",
        help="extra moepager.load option for the moepager runs, e.g. policy=lru (repeatable; default: none)",
    )
    b.add_argument("--gguf", help="GGUF file of the same model for the llamacpp peer (default: a GGUF MODEL)")
    b.add_argument(
        "--tokenizer",
        metavar="FOLDER",
        help="folder with tokenizer.json for the prompt text (default: MODEL's, else random ids)",
    )
    b.add_argument("--temperature", type=float, default=1.0, help="every engine samples at it (0 = greedy)")
    b.add_argument("--seed", type=int, default=0, help="of every engine's sampler and of a random prompt")
    b.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    b.add_argument("--threads", type=int, help="torch threads in every run (default: torch's choice)")
    b.set_defaults(func=cmd_bench)


def cmd_convert(args) -> None:
    from .store.convert import convert

    out = convert(args.model, args.out, force=args.force, progress=not args.quiet,
                  experts_dtype=args.experts_dtype, dense_dtype=args.dense_dtype)  # fmt: skip
    print(f"wrote {out}")


def cmd_verify(args) -> None:
    from .errors import CorruptFile
    from .store.verify import format_report, verify

    report = verify(args.store, args.source, progress=not args.quiet)
    print(format_report(report))
    if not report.ok:
        raise CorruptFile(
            f"{report.store}: verify found {len(report.problems)} problem(s); re-convert the store"
        )


def _add_store(sub) -> None:
    c = sub.add_parser("convert", help="write an expert-aligned store (one O_DIRECT read per expert)")
    c.add_argument("model", help="checkpoint folder or a hub id in the local Hugging Face cache")
    c.add_argument("out", help="folder to create; written beside it first and renamed when complete")
    c.add_argument("--force", action="store_true", help="replace OUT if it is an existing moepager store")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--experts-dtype", choices=["bf16", "fp16", "int8", "int4"],
                   help="routed experts in this dtype (default: the checkpoint's); int8/int4 are lossy: "
                   "measure them with `moepager eval`")  # fmt: skip
    c.add_argument(
        "--dense-dtype",
        choices=["bf16", "fp16", "fp32"],
        help="floating-point resident weights in this dtype (default: the checkpoint's)",
    )
    c.set_defaults(func=cmd_convert)
    v = sub.add_parser("verify", help="check a store's checksums, or compare it bit for bit with its source")
    v.add_argument("store", help="a folder written by `moepager convert`")
    v.add_argument(
        "--source",
        help="the checkpoint it was converted from: compare every tensor (default: checksums only)",
    )
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_verify)


def cmd_experts(args) -> None:
    from .store.expert_commands import run

    print(run(args.store, args.action, args.args, args.message or "", args.router, args.keep))


def cmd_export(args) -> None:
    from .store.export import export

    print(f"wrote {export(args.store, args.out, force=args.force)}")


def _add_experts(sub) -> None:
    x = sub.add_parser(
        "experts", help="list, show, export, import, add, remove experts of a store; generations"
    )
    x.add_argument("store", help="a folder written by `moepager convert`")
    x.add_argument("action", choices=["list", "show", "export", "import", "add", "remove", "disable", "enable",
                                      "generations", "rollback", "gc"])  # fmt: skip
    x.add_argument("args", nargs="*", help="show/export/import/remove/disable/enable: LAYER EXPERT [FILE]; "
                   "add: LAYER FILE; rollback: GENERATION")  # fmt: skip
    x.add_argument("-m", "--message", help="what the new generation is (default: the edit)")
    x.add_argument("--router", action="store_true", help="import: set the router row from the file too")
    x.add_argument("--keep", help="gc: generations to keep besides the current one, e.g. 1,3 (default: none)")
    x.set_defaults(func=cmd_experts)
    e = sub.add_parser("export", help="write a store's current generation as a Hugging Face checkpoint")
    e.add_argument("store")
    e.add_argument("out", help="folder to create (config.json, sharded safetensors, tokenizer files)")
    e.add_argument("--force", action="store_true", help="replace OUT if it is a checkpoint moepager wrote")
    e.set_defaults(func=cmd_export)


def cmd_tune(args) -> None:
    from pathlib import Path

    from .store.format import is_store
    from .tune import TuneOptions, summary, tune

    model = _model_or_default(args.model)
    store = model
    if not is_store(Path(model)):
        if args.store is None:
            raise MoepagerError(f"{model} is a checkpoint; give --store OUT: it is converted there and tuned")
        from .store.convert import convert

        store = str(convert(model, args.store, progress=not args.quiet))
    experts = _pins(args.experts) if args.experts else None
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    o = TuneOptions(text=args.text, store=store, experts=experts, auto=args.auto, layers=layers, router=args.router,
                    steps=args.steps, seq_len=args.seq_len, lr=args.lr, expert_memory=args.expert_memory,
                    save_every=args.save_every, seed=args.seed, progress=not args.quiet)  # fmt: skip
    print(summary(tune(o), store))


def _add_tune(sub) -> None:
    t = sub.add_parser("tune", help="fine-tune chosen experts of a store on text, the rest frozen and paged")
    t.add_argument("model", nargs="?", help="a store, or a checkpoint converted to --store first (default: the "
                   "embedded default model)")  # fmt: skip
    t.add_argument("--text", required=True, help="training text file")
    t.add_argument(
        "--store",
        help="where a checkpoint MODEL is converted to before tuning (default: none; needed for a checkpoint)",
    )
    t.add_argument(
        "--experts", help="experts to train, as LAYER:EXPERT pairs: 0:3,5:7 (default: none; or --auto)"
    )
    t.add_argument(
        "--auto",
        type=int,
        help="train the N experts the text routes the most tokens to (default: none; or --experts)",
    )
    t.add_argument("--layers", help="choose only among these layers: 3,4,5 (default: every MoE layer)")
    t.add_argument("--router", action="store_true", help="also train the chosen experts' router rows")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    t.add_argument("--expert-memory", default="25%", help="cache budget for the frozen experts")
    t.add_argument(
        "--save-every", type=int, default=0, help="steps between generations (default: at the end)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the training windows' order")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tune)


def _pins(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return []
    try:
        return [(int(a), int(b)) for a, b in (p.split(":") for p in text.split(",") if p.strip())]
    except ValueError:
        raise MoepagerError(
            f"--pin must be LAYER:EXPERT pairs separated by commas (e.g. 0:3,1:7), got {text!r}"
        ) from None


def _paging_options(args) -> dict:
    """moepager.load's paging options from `run`'s flags."""
    return {"expert_memory": args.expert_memory, "memory_limit": args.memory_limit, "policy": args.policy,
            "prefetch": not args.no_prefetch, "pins": _pins(args.pin), "hot_set": args.hot_set,
            "record_trace": args.trace is not None, "max_context": args.max_context}  # fmt: skip


def _save_paging_outputs(engine, args) -> None:
    if args.trace is not None:
        engine.trace.save(args.trace)
    if args.save_hot_set is not None:
        if not hasattr(engine.experts, "save_hot_set"):
            raise MoepagerError("--save-hot-set needs paging: give --expert-memory or --memory-limit")
        engine.experts.save_hot_set(args.save_hot_set)


def cmd_replay(args) -> None:
    from .paging.trace import capacity_for, compare, load_trace, plot

    trace = load_trace(args.trace)
    if args.top_k:
        trace = trace.top(args.top_k)
    if args.per_token:
        trace = trace.per_token()
    budgets = [b.strip() for b in args.budget.split(",") if b.strip()]
    rows = {b: compare(trace, capacity_for(b, trace)) for b in budgets}
    if args.json:
        print(json.dumps({"trace": args.trace, "hit_rate": rows}))
    else:
        names = list(next(iter(rows.values())))
        print(f"{'budget':>8} " + " ".join(f"{n:>8}" for n in names))
        for b, r in rows.items():
            print(f"{b:>8} " + " ".join(f"{r[n]:8.3f}" for n in names))
    if args.plot:
        plot(trace, args.plot)


def cmd_stats(args) -> None:
    from .paging.paged import render_stats

    try:
        record = json.loads(open(args.record).read())
    except FileNotFoundError:
        raise MoepagerError(
            f"{args.record} does not exist; save one with moepager run ... --json > FILE"
        ) from None
    except json.JSONDecodeError as e:
        raise MoepagerError(f"{args.record}: not a JSON record of moepager run --json ({e})") from None
    stats = record.get("stats", record) if isinstance(record, dict) else None
    if not isinstance(stats, dict) or "experts" not in stats:
        raise MoepagerError(
            f"{args.record}: no expert stats in it; record a run with --expert-memory ... --json"
        )
    print(render_stats(stats))


def _add_paging(sub) -> None:
    p = sub.add_parser(
        "replay", help="hit rate of each eviction policy on a routing trace, with Belady's bound"
    )
    p.add_argument("trace", help="a trace file from moepager run ... --trace FILE")
    p.add_argument("--budget", default="10%,25%,50%", help="share of all experts (25%%) or a count of experts; "
                   "several separated by commas")  # fmt: skip
    p.add_argument("--per-token", action="store_true", help="replay each multi-token forward (a prefill, an eval "
                   "window) one token at a time, as decode would ask for it")  # fmt: skip
    p.add_argument(
        "--top-k",
        type=int,
        help="keep each token's first K experts: the same text routed top-K (default: all)",
    )
    p.add_argument("--json", action="store_true", help="print the hit rates as one JSON object")
    p.add_argument("--plot", help="write a PNG of hit rate vs budget (needs matplotlib; default: none)")
    p.set_defaults(func=cmd_replay)
    s = sub.add_parser("stats", help="render the expert cache stats of a saved moepager run --json record")
    s.add_argument("record", help="a file holding the output of moepager run ... --json")
    s.set_defaults(func=cmd_stats)


def cmd_moefy(args) -> None:
    from .moefy.build import Plan, moefy

    plan = Plan.load(args.plan) if args.plan else None
    text = None
    if args.calibration:
        try:
            text = open(args.calibration, errors="replace").read()
        except FileNotFoundError:
            raise MoepagerError(f"no such calibration text file: {args.calibration}") from None
    out = moefy(args.dense, args.out, args.experts, args.top_k, seed=args.seed, shared=args.shared,
                calibration_text=text, tokens=args.tokens, plan=plan)  # fmt: skip
    print(out)


def cmd_eval(args) -> None:
    from .evaluate import main as eval_main

    args.model = _model_or_default(args.model)
    r = eval_main(args.model, args.text, args.reference, args.max_tokens, args.window, args.device)
    if args.json:
        print(json.dumps(r.as_dict()))
        return
    line = f"perplexity {r.perplexity:.3f} over {r.tokens} tokens"
    print(
        line + (f"; greedy agreement with the reference {r.agreement:.2%}" if r.agreement is not None else "")
    )


def _add_moefy(sub) -> None:
    m = sub.add_parser("moefy", help="carve a dense llama-family model into a Qwen2-MoE checkpoint")
    m.add_argument("dense", help="dense checkpoint folder (llama family) or a llama GGUF file")
    m.add_argument("out", help="folder to create")
    m.add_argument("--experts", type=int, default=16, help="routed experts per layer (E)")
    m.add_argument(
        "--top-k", type=int, default=8, help="experts per token (K); K = E reproduces the dense model"
    )
    m.add_argument("--seed", type=int, default=0, help="of the clustering and the router fit")
    m.add_argument("--shared", type=int, help="neurons of the always-on shared expert (default: about half)")
    m.add_argument("--calibration", help="calibration text file (default: the Python reference topics)")
    m.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    m.add_argument(
        "--plan",
        help="reuse a learned plan (OUT/moefy/plan.safetensors of an earlier run; default: learn one)",
    )
    m.set_defaults(func=cmd_moefy)
    e = sub.add_parser("eval", help="perplexity on a text file, and greedy agreement with a reference model")
    e.add_argument("model", nargs="?", help="checkpoint folder (default: the embedded default model)")
    e.add_argument("--text", required=True, help="a plain text file")
    e.add_argument(
        "--reference", help="a model with the same tokenizer, e.g. the dense original (default: none)"
    )
    e.add_argument(
        "--max-tokens", type=int, help="evaluate at most this many tokens of the text (default: all)"
    )
    e.add_argument("--window", type=int, default=512, help="tokens per independently scored window")
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.set_defaults(func=cmd_eval)


def cmd_list(args) -> None:
    from .catalog import main as list_main

    list_main(args.json)


def add_model_options(r: argparse.ArgumentParser) -> None:
    """The options of every command that loads a model and generates (run, chat): sampling, device, memory."""
    r.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (per reply in chat)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "reaching this probability (1 = all)")  # fmt: skip
    r.add_argument(
        "--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = no limit)"
    )
    r.add_argument("--seed", type=int, help="seed of the sampler (default: not seeded)")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    r.add_argument("--experts-dtype", choices=["bf16", "fp16", "int8", "int4"],
                   help="convert routed experts as they are read; int8/int4 are lossy (default: as stored)")  # fmt: skip
    r.add_argument("--expert-memory", help="memory for routed experts: 512MiB, 2GB or a share of them (25%%); "
                   "turns paging on (default: every expert resident)")  # fmt: skip
    r.add_argument("--memory-limit", help="whole-process budget (e.g. 1GiB): experts get what the rest leaves "
                   "(default: none; `moepager plan` shows what a budget gives)")  # fmt: skip
    r.add_argument("--max-context", type=int, help="the most positions (prompt and new tokens) a generation may "
                   "reach; the KV cache is planned for it under --memory-limit (default: the model's context; "
                   "4096 under --memory-limit, or what fits the limit)")  # fmt: skip
    r.add_argument(
        "--policy", choices=["lru", "lfu", "nextuse"], help="expert eviction policy (default: nextuse)"
    )
    r.add_argument(
        "--no-prefetch", action="store_true", help="do not read the next layer's likely experts ahead"
    )
    r.add_argument("--pin", help="experts never evicted, as LAYER:EXPERT pairs: 0:3,1:7 (default: none)")
    r.add_argument(
        "--hot-set", help="pin the experts listed in this file (see --save-hot-set; default: none)"
    )
    r.add_argument(
        "--save-hot-set", help="at the end, save the most used experts to this file (default: not saved)"
    )
    r.add_argument("--trace", help="save the routing trace (experts chosen per token and layer) to this file "
                   "(default: not recorded)")  # fmt: skip
    r.add_argument("--kv-memory", help="RAM for the KV cache (e.g. 64MiB); older blocks spill to disk beyond it "
                   "(default: all in RAM)")  # fmt: skip
    r.add_argument("--kv-spill-dir", help="folder for the KV spill file (default: the system temp folder)")
    r.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward pass")
    _add_ray(r)
    add_remote_options(r)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it (as for None defaults)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default:" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="moepager", description="Run MoE language models larger than memory.")
    p.add_argument("--version", action="version", version=f"moepager {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="generate text from a prompt, streaming it to the terminal")
    r.add_argument("model", nargs="?", help="checkpoint folder, store, GGUF file, ollama model name (qwen3:30b-a3b) "
                   "or a hub id in the local Hugging Face cache (see `moepager list`; default: the embedded default "
                   "model)")  # fmt: skip
    r.add_argument(
        "--prompt", help="prompt text (the chat template is applied when the model has one; default: none)"
    )
    r.add_argument(
        "--prompt-ids", help="comma-separated token ids, for models without a tokenizer (default: none)"
    )
    r.add_argument("--raw", action="store_true", help="do not apply the chat template")
    r.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    r.add_argument("--session", help="session file: resumed if it exists (the prompt is the whole conversation; "
                   "its saved prefix is not recomputed), saved after generating (default: none)")  # fmt: skip
    add_model_options(r)
    r.set_defaults(func=cmd_run)
    _add_paging(sub)
    _add_fetch(sub)
    _add_synth_bench(sub)
    _add_store(sub)
    _add_serve(sub)
    _add_moefy(sub)
    ls = sub.add_parser("list", help="runnable MoE models in the Hugging Face cache and ollama's store")
    ls.add_argument("--json", action="store_true", help="one JSON list: name, where, family, size, path")
    ls.set_defaults(func=cmd_list)
    _add_chat_plan(sub)
    _add_experts(sub)
    _add_tune(sub)
    for parser in [p, *sub.choices.values()]:
        parser.formatter_class = _DefaultsFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # a warning is one line, as an error is
            warnings.showwarning = lambda message, *_, **__: print(
                f"moepager: warning: {message}", file=sys.stderr
            )
            args.func(args)
    except MoepagerError as e:
        print(f"moepager: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
