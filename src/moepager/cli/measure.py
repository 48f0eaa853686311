"""`synth`, `bench`, `replay`, `stats`: benchmark models, measurements, the expert cache's records."""

from __future__ import annotations

import json

from ..errors import MoepagerError


def cmd_synth(args) -> None:
    if args.format == "gguf":
        from ..synth.gguf import synth_gguf

        if args.shape is None:
            raise MoepagerError(
                "synth --format gguf needs --shape (qwen3-30b-a3b, mixtral-8x7b, gpt-oss-20b, deepseek-v2-lite or qwen3-64x4)"
            )
        print(synth_gguf(args.out, args.shape, args.quant, seed=args.seed, progress_bar=not args.quiet))
        return
    if args.shape is not None:
        raise MoepagerError("--shape is for --format gguf; a checkpoint folder takes --family and sizes")
    from ..synth.checkpoint import SynthSpec, synth
    from ..system.sizes import parse_size

    spec = SynthSpec(family=args.family, hidden=args.hidden, intermediate=args.intermediate, experts=args.experts,
                     top_k=args.top_k, layers=args.layers or 0, dtype=args.dtype, seed=args.seed)  # fmt: skip
    size = parse_size(args.size) if args.size else None
    print(synth(args.out, spec, size, progress_bar=not args.quiet))


def cmd_bench(args) -> None:
    from ..bench import BenchOptions
    from ..bench import main as bench_main

    bench_main(BenchOptions.from_cli(args))


def add_synth_bench(sub) -> None:
    s = sub.add_parser(
        "synth", help="write a large random MoE checkpoint (Hugging Face layout or GGUF) for benchmarks"
    )
    s.add_argument("out", help="folder to create (a .gguf file with --format gguf)")
    s.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf: a safetensors checkpoint; gguf: a GGUF at a real model's --shape (default: hf)",
    )
    s.add_argument(
        "--shape",
        help="with --format gguf: qwen3-30b-a3b, mixtral-8x7b, gpt-oss-20b, deepseek-v2-lite or qwen3-64x4 (default: none)",
    )
    s.add_argument(
        "--quant", default="Q4_K_M", help="with --format gguf: Q4_K_M, Q4_0 or Q8_0 (default: Q4_K_M)"
    )
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
    b.add_argument("model", nargs="?", default="default", help="checkpoint folder or MoE .gguf file (moepager "
                   "and llama.cpp run the same), or default: the embedded default model")  # fmt: skip
    b.add_argument(
        "--budgets",
        default="10%,25%,50%,100%",
        help="expert memory budgets: percents, sizes, or limit (moepager --memory-limit set to --memory-cap)",
    )
    b.add_argument("--rounds", type=int, default=3, help="alternating rounds; median and range are reported")
    b.add_argument("--tokens", type=int, default=16, help="tokens to generate per run")
    b.add_argument("--prompt-tokens", type=int, default=32, help="tokens of the prompt")
    b.add_argument("--peers", default="accelerate,naive,llamacpp",
                   help="comma list of accelerate, naive, llamacpp (weights repacked, its default), "
                        "llamacpp-norepack, llamacpp-lazy (its lazy expert loading), or 'none'")  # fmt: skip
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


def cmd_replay(args) -> None:
    from ..paging.trace import capacity_for, check_plot, compare, load_trace, plot

    if args.plot:
        check_plot(args.plot)  # before the replay: it may take minutes on a long trace
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
    from ..paging.cache_stats import render_stats

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


def add_replay_stats(sub) -> None:
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
