"""`convert`, `verify`, `experts`, `export`, `tune`, `moefy`, `eval`: writing, editing and checking models."""

from __future__ import annotations

import json

from ..errors import MoepagerError
from .model_options import model_or_default, parse_pins


def cmd_convert(args) -> None:
    from ..store.convert import convert

    out = convert(args.model, args.out, force=args.force, progress=not args.quiet,
                  experts_dtype=args.experts_dtype, dense_dtype=args.dense_dtype)  # fmt: skip
    print(f"wrote {out}")


def cmd_verify(args) -> None:
    from ..errors import CorruptFile
    from ..store.verify import format_report, verify

    report = verify(args.store, args.source, progress=not args.quiet)
    print(format_report(report))
    if not report.ok:
        raise CorruptFile(
            f"{report.store}: verify found {len(report.problems)} problem(s); re-convert the store"
        )


def add_convert_verify(sub) -> None:
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
    from .experts import run

    print(run(args.store, args.action, args.args, args.message or "", args.router, args.keep))


def cmd_export(args) -> None:
    from ..store.export import export

    print(f"wrote {export(args.store, args.out, force=args.force)}")


def add_experts(sub) -> None:
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

    from ..store.format import is_store
    from ..training.tune import TuneOptions, summary, tune

    model = model_or_default(args.model)
    store = model
    if not is_store(Path(model)):
        if args.store is None:
            raise MoepagerError(f"{model} is a checkpoint; give --store OUT: it is converted there and tuned")
        from ..store.convert import convert

        store = str(convert(model, args.store, progress=not args.quiet))
    experts = parse_pins(args.experts) if args.experts else None
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    o = TuneOptions(text=args.text, store=store, experts=experts, auto=args.auto, layers=layers, router=args.router,
                    steps=args.steps, seq_len=args.seq_len, lr=args.lr, expert_memory=args.expert_memory,
                    save_every=args.save_every, seed=args.seed, progress=not args.quiet)  # fmt: skip
    print(summary(tune(o), store))


def add_tune(sub) -> None:
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


def cmd_moefy(args) -> None:
    from ..moefy.build import Plan, moefy

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
    from ..bench.evaluate import main as eval_main

    args.model = model_or_default(args.model)
    r = eval_main(args.model, args.text, args.reference, args.max_tokens, args.window, args.device)
    if args.json:
        print(json.dumps(r.as_dict()))
        return
    line = f"perplexity {r.perplexity:.3f} over {r.tokens} tokens"
    print(
        line + (f"; greedy agreement with the reference {r.agreement:.2%}" if r.agreement is not None else "")
    )


def add_moefy(sub) -> None:
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
