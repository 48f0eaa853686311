"""Options and loading shared by the commands that load a model (run, chat, serve, fetch): sampling,
device, memory, paging, --remote and --ray, and the checks made before anything is loaded."""

from __future__ import annotations

import argparse

from ..errors import MoepagerError
from ..system.output_paths import check_output_file


def model_or_default(model: str | None) -> str:
    """MODEL as given, or the embedded default (MODEL left out or "default"): SmolLM2 carved into a MoE, built
    on first use."""
    from ..moefy.default_model import default_model_path, is_default

    if not is_default(model):
        return model

    return str(default_model_path())


def check_before_load(args) -> None:
    """Refuse what can be refused before the model is loaded: nothing is loaded or written for bad input."""
    from ..generation.generate import check_sampling
    from ..runtime.engine import parse_device

    parse_device(args.device)
    check_sampling(args.max_tokens, args.temperature, args.top_p, args.top_k)
    for flag, value in (("--max-context", args.max_context), ("--prefill-chunk", args.prefill_chunk)):
        if value is not None and value < 1:
            raise MoepagerError(f"{flag} {value}: give a positive number of tokens")
    check_speculation(args)
    if args.threads is not None and args.threads < 1:
        raise MoepagerError(f"--threads {args.threads}: give a positive number of threads")
    # files written at the end: a folder that cannot take them is found now, not after the generation
    for flag in ("--trace", "--save-hot-set", "--session"):
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if path is not None:
            check_output_file(path, flag)


def load_engine(args):
    from .. import load

    args.model = model_or_default(args.model)
    if args.threads is not None:  # torch's count, which GGUF kernels take over (kernels/ggml.py)
        import torch

        torch.set_num_threads(args.threads)
    return load(*engine_options(args, args.model))


def engine_options(args, model) -> tuple:
    """(what to load, EngineOptions) from a command's flags: the one place the command line builds the engine's
    options (run, chat, serve). MODEL becomes a RemoteSource with --remote; flags a command lacks, or leaves
    unset, keep the engine's defaults."""
    from ..runtime.options import EngineOptions

    flat = {"device": args.device, "dtype": args.dtype, "experts_dtype": getattr(args, "experts_dtype", None),
            **paging_options(args), "kv_memory": args.kv_memory, "prefill_chunk": getattr(args, "prefill_chunk", None),
            "kv_spill_dir": getattr(args, "kv_spill_dir", None), **ray_options(args), **speculation_options(args)}  # fmt: skip
    source, flat = open_remote(args, model, flat)
    return source, EngineOptions.of(**{k: v for k, v in flat.items() if v is not None})


def generation_context(engine, args) -> int:
    """Positions a generation may reach: the model's context length, or less: --max-context, or the context a
    --memory-limit was planned for."""
    given = [args.max_context, engine.planned_context(), engine.config.max_position_embeddings]
    return min(n for n in given if n)


def sampling_options(args) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}


def parse_pins(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return []
    try:
        return [(int(a), int(b)) for a, b in (p.split(":") for p in text.split(",") if p.strip())]
    except ValueError:
        raise MoepagerError(
            f"--pin must be LAYER:EXPERT pairs separated by commas (e.g. 0:3,1:7), got {text!r}"
        ) from None


def paging_options(args) -> dict:
    """The engine's paging options from a command's flags (flat names: runtime/options.py)."""
    return {"expert_memory": args.expert_memory, "memory_limit": args.memory_limit, "policy": args.policy,
            "prefetch": args.prefetch, "fill": getattr(args, "fill", None), "pins": parse_pins(getattr(args, "pin", None)),
            "hot_set": getattr(args, "hot_set", None), "record_trace": getattr(args, "trace", None) is not None,
            "max_context": args.max_context}  # fmt: skip


def save_paging_outputs(engine, args) -> None:
    if args.trace is not None:
        engine.trace.save(args.trace)
    if args.save_hot_set is not None:
        if not hasattr(engine.experts, "save_hot_set"):
            raise MoepagerError("--save-hot-set needs paging: give --expert-memory or --memory-limit")
        engine.experts.save_hot_set(args.save_hot_set)


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
    r.add_argument("--threads", type=int, help="CPU threads for the math (default: torch's, one per core); on a "
                   "machine shared with other busy processes fewer can be faster")  # fmt: skip
    r.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    r.add_argument("--experts-dtype", choices=["bf16", "fp16", "int8", "int4"],
                   help="convert routed experts as they are read; int8/int4 are lossy (default: as stored)")  # fmt: skip
    r.add_argument("--expert-memory", help="memory for routed experts: 512MiB, 2GB or a share of them (25%%); "
                   "turns paging on (default: every expert resident)")  # fmt: skip
    r.add_argument("--memory-limit", help="whole-process budget (e.g. 1GiB): experts get what the rest leaves "
                   "(default: none; `moepager plan` shows what a budget gives)")  # fmt: skip
    r.add_argument("--max-context", type=int, help="the most positions (prompt and new tokens) a generation may "
                   "reach; the KV cache is planned for it under --memory-limit (default: the model's context; "
                   "4096 under --memory-limit, or what fits in half of what the limit leaves the KV cache and experts)")  # fmt: skip
    r.add_argument(
        "--policy", choices=["lru", "lfu", "nextuse"], help="expert eviction policy (default: nextuse)"
    )
    r.add_argument("--prefetch", action=argparse.BooleanOptionalAction, help="read the next layer's likely "
                   "experts ahead, in the background (default: where a GPU computes; on the CPU every core computes)")  # fmt: skip
    r.add_argument("--fill", action=argparse.BooleanOptionalAction, help="read experts into the whole expert "
                   "cache at load, in large reads, as llama.cpp reads its mapped file (default: under --memory-limit)")  # fmt: skip
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
    r.add_argument(
        "--prefill-chunk",
        type=int,
        help="prompt tokens per forward pass (default: 512, or under "
        "--memory-limit the chunk its buffers hold)",
    )
    add_speculation(r)
    add_ray(r)
    add_remote_options(r)


def add_speculation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", metavar="ngram|self|MODEL", help="draft tokens and verify them in one forward "
                   "(the experts they need are read once); output unchanged: ngram looks the draft up in the "
                   "text so far, self drafts with the resident experts only, MODEL is a small draft model with "
                   "the same tokenizer (default: no drafts)")  # fmt: skip
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per step with --speculate")


def check_speculation(args) -> None:
    if getattr(args, "draft_tokens", 1) < 1:
        raise MoepagerError(f"--draft-tokens {args.draft_tokens}: give a positive number of tokens")


def speculation_options(args) -> dict:
    if getattr(args, "speculate", None) is None:
        return {}
    return {"speculate": args.speculate, "draft_tokens": args.draft_tokens}


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
    from ..sources.hub import RemoteSource

    source = RemoteSource(model, args.local_store, args.revision, args.disk_budget)
    if not any(paging.get(k) for k in ("expert_memory", "memory_limit", "pins", "hot_set")):
        paging = {**paging, "expert_memory": "100%"}  # every expert may stay in RAM, fetched when first used
    return source, paging


def add_ray(p) -> None:
    p.add_argument("--ray", metavar="ADDRESS", help="spread the routed experts over actors of this Ray cluster "
                   "(auto, 127.0.0.1:6379, local); --expert-memory is then each actor's budget (default: one process)")  # fmt: skip
    p.add_argument("--ray-actors", type=int, help="expert actors (default: one per node of the cluster)")
    p.add_argument("--ray-placement", metavar="TRACE", help="place experts by their usage in this routing trace "
                   "(from --trace) instead of round-robin (default: round-robin)")  # fmt: skip
    p.add_argument(
        "--ray-replicate", type=int, default=0, help="hottest experts per layer held by two actors"
    )


def ray_options(args) -> dict:
    if args.ray is None:
        if args.ray_actors is not None or args.ray_placement or args.ray_replicate:
            raise MoepagerError("--ray-actors, --ray-placement and --ray-replicate need --ray ADDRESS")
        return {}
    return {"ray": args.ray, "ray_actors": args.ray_actors, "ray_placement": args.ray_placement,
            "ray_replicate": args.ray_replicate}  # fmt: skip
