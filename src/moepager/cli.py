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
            raise MoepagerError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        bad = [i for i in ids if not 0 <= i < engine.config.vocab_size]
        if bad:
            raise MoepagerError(f"--prompt-ids: {bad[0]} is outside the vocabulary (0..{engine.config.vocab_size - 1})")
        return ids
    if args.prompt is None:
        raise MoepagerError("give --prompt TEXT or --prompt-ids 1,2,3")
    if engine.tokenizer is None:
        raise MoepagerError(f"{engine.path} has no tokenizer.json; use --prompt-ids 1,2,3 instead of --prompt")
    if engine.tokenizer.chat_template and not args.raw:
        return engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    return engine.tokenizer.encode(args.prompt)


def cmd_run(args) -> None:
    from . import load
    from .tokenizer import StreamingDetokenizer

    if args.model is None:
        raise MoepagerError("give a model: a checkpoint folder or a hub id in the local Hugging Face cache")
    engine = load(args.model, device=args.device, dtype=args.dtype)
    ids = _prompt_ids(engine, args)
    detok = StreamingDetokenizer(engine.tokenizer) if engine.tokenizer else None
    out_ids, text = [], []
    for tid in engine.stream(ids, args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed):  # fmt: skip
        out_ids.append(tid)
        piece = detok.add(tid) if detok else f"{tid} "
        text.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": out_ids, "stats": engine.stats()}))
    else:
        print()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moepager", description="Run MoE language models larger than memory.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="generate text from a prompt, streaming it to the terminal")
    r.add_argument("model", nargs="?", help="checkpoint folder or a hub id in the local Hugging Face cache")
    r.add_argument("--prompt", help="prompt text (the chat template is applied when the model has one)")
    r.add_argument("--prompt-ids", help="comma-separated token ids, for models without a tokenizer")
    r.add_argument("--raw", action="store_true", help="do not apply the chat template")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--seed", type=int)
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    r.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MoepagerError as e:
        print(f"moepager: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
