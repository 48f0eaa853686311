"""`run`, `chat` and `plan`: the commands that load a model and generate, or predict how fast it would."""

from __future__ import annotations

import json
import sys

from ..errors import MoepagerError
from .model_options import (
    add_model_options,
    check_before_load,
    generation_context,
    load_engine,
    model_or_default,
    sampling_options,
    save_paging_outputs,
)


def prompt_ids(engine, args) -> list[int]:
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
            f"{engine.path} has no tokenizer (no tokenizer.json beside it, or a GGUF without tokenizer.ggml.tokens); "
            "use --prompt-ids 1,2,3 instead of --prompt"
        )
    if engine.tokenizer.chat_template and not args.raw:
        return engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    return engine.tokenizer.encode(args.prompt)


def cmd_run(args) -> None:
    from ..generation.generate import check_sampling
    from ..generation.tokenizer import StreamingDetokenizer, check_utf8
    from ..runtime.summary import DecodeReads, summary_line

    check_before_load(args)
    if args.prompt is not None and args.prompt_ids is not None:
        raise MoepagerError("--prompt and --prompt-ids were both given: give one of them")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise MoepagerError(f"--prompt {args.prompt!r} is empty: give the text to continue")
        check_utf8(args.prompt, "--prompt")
    engine = load_engine(args)
    ids = prompt_ids(engine, args)
    check_sampling(args.max_tokens, prompt_tokens=len(ids), context=generation_context(engine, args))
    detok = StreamingDetokenizer(engine.tokenizer) if engine.tokenizer else None
    out_ids, text = [], []
    if args.session:  # resumes the file if it exists (reusing the shared prefix), saves it at the end
        tokens = engine.stream_session(args.session, ids, args.max_tokens, **sampling_options(args))
    else:
        tokens = engine.stream(ids, args.max_tokens, **sampling_options(args))
    reads = DecodeReads(engine)
    for tid in reads.count(tokens):
        out_ids.append(tid)
        piece = detok.add(tid) if detok else f"{tid} "
        text.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    save_paging_outputs(engine, args)
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": out_ids, "stats": engine.stats()}))
    else:
        print(flush=True)  # the text's line ends before the summary's begins
    print(summary_line(engine.stats(), reads), file=sys.stderr)


def cmd_chat(args) -> None:
    from .chat import Conversation
    from .chat import main as chat_main

    check_before_load(args)
    engine = load_engine(args)
    conversation = Conversation(
        engine, args.max_tokens, sampling_options(args), generation_context(engine, args), args.system
    )
    chat_main(conversation)
    save_paging_outputs(engine, args)


def cmd_plan(args) -> None:
    import shlex

    from ..generation.generate import check_sampling
    from ..runtime.engine import parse_device
    from ..runtime.plan import format_plan, plan, run_command

    parse_device(args.device)
    check_sampling(args.max_tokens, args.temperature)
    if args.max_context is not None and args.max_context < 1:
        raise MoepagerError(f"--max-context {args.max_context}: give a positive number of tokens")
    if not args.seconds > 0:
        raise MoepagerError(f"--seconds {args.seconds}: give a positive time to measure for")
    if args.trace_tokens < 1:
        raise MoepagerError(f"--trace-tokens {args.trace_tokens}: give a positive number of tokens")
    if args.prompt is not None and args.prompt_ids is not None:
        raise MoepagerError("--prompt and --prompt-ids were both given: give one of them")
    prompt, flag = None, None
    if args.prompt is not None or args.prompt_ids is not None:
        prompt = lambda engine: prompt_ids(engine, args)  # noqa: E731
        if args.prompt is not None:
            flag = f"--prompt {shlex.quote(args.prompt)}" + (" --raw" if args.raw else "")
        else:
            flag = f"--prompt-ids {args.prompt_ids}"
    model = model_or_default(args.model)
    p = plan(model, args.memory, args.max_context, device=args.device, dtype=args.dtype, seconds=args.seconds,
             model_arg=args.model, prompt=prompt, prompt_flag=flag, max_tokens=args.max_tokens,
             temperature=args.temperature, seed=args.seed, trace_tokens=args.trace_tokens)  # fmt: skip
    print(json.dumps({**p.as_dict(), "run_command": run_command(p)}) if args.json else format_plan(p))


def add_chat_plan(sub) -> None:
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
                   "(default: 4096, or what fits in half of what the limit leaves the KV cache and experts)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--prompt", help="the run's prompt text, chat template applied as run does (default: "
                   "--prompt-ids 1..16)")  # fmt: skip
    p.add_argument("--prompt-ids", help="the run's prompt as comma-separated token ids (default: 1..16)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to --prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens the run generates (default: run's, 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="the run's sampling temperature; the "
                   "measured tokens are decoded at it (default: run's, 0.0 = greedy)")  # fmt: skip
    p.add_argument("--seed", type=int, help="the run's sampler seed (default: not seeded)")
    p.add_argument("--trace-tokens", type=int, default=16, help="decode steps of the run generated to measure "
                   "compute, reads and routing; the rest of the run is modelled (default: 16)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="stop measuring decode steps after this long (at two steps at least; default: 60.0)")  # fmt: skip
    p.set_defaults(func=cmd_plan)


def add_run(sub) -> None:
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
