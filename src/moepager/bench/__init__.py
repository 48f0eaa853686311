"""`moepager bench`: decode speed and memory against the expert budget, peers and the physical limit.

Owns the plan of a benchmark: which engines run at which budget under which memory cap, in alternating
rounds, plus the one-time preparation the peers need (per-expert .pt files for the naive peer). Each run
happens in its own child process (isolate.py) and is measured there (worker.py); the disk bandwidth is
measured between rounds (limits.py); report.py turns the records into tables, ratios and a plot.
MODEL is a Hugging Face checkpoint folder or a single GGUF file (then moepager and llama.cpp run the very
same file; naive and accelerate need a folder and are skipped). Decoding is sampled, seeded, in every
engine (temperature 0 = greedy): greedy decoding of a random-weight model soon repeats one token, and
then every token routes to the same experts and paging is never exercised.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import MoepagerError
from ..system.sizes import format_bytes, parse_size
from . import report
from .isolate import cgroup_unavailable_reason, drop_page_cache, run_isolated
from .limits import disk_bandwidth, machine
from .report import PEERS


@dataclass
class BenchOptions:
    model: str
    budgets: list[str] = field(default_factory=lambda: ["10%", "25%", "50%", "100%"])
    rounds: int = 3
    tokens: int = 16  # generated per run; the first comes from the prefill
    prompt_tokens: int = 32
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    memory_cap: str = "auto"  # "auto" = resident weights + expert budget + overhead, or a size for every run
    overhead: str = "1GiB"  # interpreter, torch, activations, KV cache: added to every engine's cap alike
    use_cgroup: bool = True
    work_dir: str | None = None  # peers' files; default: beside the model
    out: str = "benchmarks/results"
    name: str | None = None
    dtype: str | None = None
    engine_options: dict = field(default_factory=dict)  # extra moepager.load options (policy, prefetch...)
    gguf: str | None = None  # for the llama.cpp peer; default: MODEL itself when it is a GGUF file
    tokenizer: str | None = None  # folder with tokenizer.json for the prompt (default: MODEL's own, if any)
    temperature: float = 1.0  # every engine samples softmax(logits / T); 0 = greedy
    seed: int = 0  # of every engine's sampler and of a random prompt
    timeout_s: float = 1800
    threads: int | None = None  # torch threads in every run (default: torch's own choice)
    drop_caches: bool = True  # echo 3 > drop_caches before each run (root); else evict only the model files
    command: str = ""

    @classmethod
    def from_cli(cls, args) -> BenchOptions:
        peers = (
            [] if args.peers.strip().lower() in ("", "none") else [p.strip() for p in args.peers.split(",")]
        )
        bad = [p for p in peers if p not in PEERS]
        if bad:
            raise MoepagerError(f"--peers: unknown peer {bad[0]!r}; use any of {', '.join(PEERS)} or none")
        if args.rounds < 1 or args.tokens < 2 or args.prompt_tokens < 1:
            raise MoepagerError("--rounds must be >= 1, --tokens >= 2 and --prompt-tokens >= 1")
        if not args.temperature >= 0:
            raise MoepagerError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
        options = {}
        for item in getattr(args, "engine_option", None) or []:
            key, _, value = item.partition("=")
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
        return cls(model=args.model, budgets=[b.strip() for b in args.budgets.split(",") if b.strip()],
                   rounds=args.rounds, tokens=args.tokens, prompt_tokens=args.prompt_tokens, peers=peers,
                   memory_cap=args.memory_cap, overhead=args.overhead, use_cgroup=not args.no_cgroup,
                   work_dir=args.work_dir, out=args.out, name=args.name, dtype=args.dtype,
                   engine_options=options, gguf=args.gguf, tokenizer=args.tokenizer, temperature=args.temperature,
                   seed=args.seed, timeout_s=args.timeout, threads=args.threads,
                   command="moepager " + shlex.join(sys.argv[1:]))  # fmt: skip


def resolve_model(model: str | None) -> Path:
    from ..moefy.default_model import default_model_path, is_default

    if is_default(model):
        return Path(default_model_path())
    path = Path(model)
    if path.is_file():
        if path.suffix != ".gguf":  # moepager.load opens a single file as GGUF only by this name
            raise MoepagerError(f"{path}: a single model file must be a GGUF file named *.gguf")
        return path
    if not (path / "config.json").exists():
        raise MoepagerError(f"{path}: neither a checkpoint folder (no config.json) nor a .gguf file")
    return path


def is_gguf(path: Path) -> bool:
    return path.is_file()  # resolve_model lets through no other single file


def describe_model(path: Path) -> dict:
    """Sizes the caps are planned from: dense bytes (everything but routed experts) and expert bytes."""
    if is_gguf(path):
        import gguf

        from ..sources.gguf import GgufSource

        src = GgufSource(path)
        keys = src.expert_keys()
        expert_bytes = sum(src.expert_nbytes(*k) for k in keys)
        all_bytes = path.stat().st_size  # tensors + metadata (vocabulary): llama.cpp maps the whole file
        types = sorted(
            {gguf.GGMLQuantizationType(p[2]).name for parts in src.experts.values() for p in parts.values()}
        )
        kind, c, files = f"GGUF, experts {'/'.join(types)}", src.config, [path]
    else:
        from ..sources.checkpoint import Checkpoint

        ckpt = Checkpoint(path)
        keys = ckpt.expert_keys()
        expert_bytes = sum(ckpt.expert_nbytes(*k) for k in keys)
        all_bytes = sum(info.nbytes for info in ckpt.tensors.values())
        kind, c = "safetensors", ckpt.config
        files = sorted({Path(info.file) for info in ckpt.tensors.values()})
    desc = (f"{c.family} ({kind}), {c.num_layers} layers, D={c.hidden_size}, {c.num_experts} experts "
            f"top-{c.top_k} (I={c.moe_intermediate_size}), {all_bytes / 2**30:.2f} GiB on disk of which routed "
            f"experts {expert_bytes / 2**30:.2f} GiB ({len(keys)} x {expert_bytes / max(1, len(keys)) / 2**20:.2f} MiB)")  # fmt: skip
    return {"path": str(path), "format": "gguf" if is_gguf(path) else "safetensors", "description": desc,
            "family": c.family, "vocab_size": c.vocab_size, "dense_bytes": all_bytes - expert_bytes,
            "expert_bytes": expert_bytes, "experts": len(keys), "files": [str(f) for f in files]}  # fmt: skip


PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a screw press. Within fifty years printers worked in more than two "
    "hundred European towns, and the price of books fell so far that reading spread beyond monasteries and "
    "universities. Explain in plain words why this mattered for science, religion and politics. "
)


def make_prompt(path: Path | None, vocab_size: int, n: int, seed: int = 0) -> tuple[list[int], str]:
    """`n` ids of real English text through the tokenizer of `path` (real routing): a folder's tokenizer.json
    or a GGUF's own vocabulary; else seeded random ids."""
    from ..generation.tokenizer import Tokenizer
    from ..sources.contract import source_tokenizer
    from ..store.open_model import open_source

    tok = None
    if path is not None:
        tok = source_tokenizer(open_source(path)) if is_gguf(path) else Tokenizer.from_folder(path)
    if tok is not None:
        ids = tok.encode(PROMPT_TEXT * (1 + n // 40))[:n]
        if ids and max(ids) >= vocab_size:
            raise MoepagerError(f"the tokenizer of {path} gives id {max(ids)}, past the model's vocabulary "
                                f"({vocab_size}): not this model's tokenizer")  # fmt: skip
        if len(ids) == n:
            return ids, f"English text (benchmarks' PROMPT_TEXT) through the tokenizer of {path}"
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n,), generator=gen).tolist()
    return (
        ids,
        f"random token ids (seed {seed}): {'no tokenizer' if tok is None else 'the text is too short'}",
    )


def budget_bytes(budget: str, expert_bytes: int) -> int:
    if (
        budget == "limit"
    ):  # moepager --memory-limit CAP: it decides what stays resident (the cap is every run's)
        return expert_bytes
    if budget.endswith("%"):
        try:
            share = float(budget[:-1]) / 100
        except ValueError:
            share = -1
        if not 0 < share <= 1:
            raise MoepagerError(f"--budgets: {budget!r} must be a share in (0%, 100%]")
        return int(share * expert_bytes)
    return parse_size(budget)


def write_naive_files(model: Path, folder: Path, dtype: str | None) -> Path:
    """One torch.save file per (layer, expert), written once: what the naive peer loads per token."""
    from ..sources.checkpoint import Checkpoint

    marker = folder / "complete.json"
    if marker.exists() and json.loads(marker.read_text()).get("model") == str(model.resolve()):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ckpt = Checkpoint(model)
    cast = getattr(torch, dtype) if dtype else None
    keys = ckpt.expert_keys()
    print(f"bench: writing {len(keys)} per-expert .pt files for the naive peer to {folder}", file=sys.stderr)
    for layer, e in keys:
        w = {
            k: (v.to(cast) if cast else v).contiguous().clone() for k, v in ckpt.read_expert(layer, e).items()
        }
        torch.save(w, folder / f"{layer}_{e}.pt")
        fd = os.open(folder / f"{layer}_{e}.pt", os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    marker.write_text(json.dumps({"model": str(model.resolve()), "files": len(keys)}))
    return folder


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] bench: {msg}", file=sys.stderr, flush=True)


def main(opts: BenchOptions) -> dict:
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds, so runs clean up after them
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    path = resolve_model(opts.model)
    if opts.tokenizer and not (Path(opts.tokenizer) / "tokenizer.json").exists():
        raise MoepagerError(f"--tokenizer {opts.tokenizer}: no tokenizer.json in that folder")
    if opts.gguf and not Path(opts.gguf).is_file():
        raise MoepagerError(f"--gguf {opts.gguf}: no such file")
    info = describe_model(path)
    name = opts.name or (path.stem if is_gguf(path) else path.name)
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(opts.work_dir) if opts.work_dir else path.parent / f".{path.name}.bench"
    work.mkdir(parents=True, exist_ok=True)
    why_no_cgroup = cgroup_unavailable_reason() if opts.use_cgroup else "--no-cgroup was given"
    use_cgroup = why_no_cgroup is None
    if not use_cgroup:
        _log(f"no memory cgroup ({why_no_cgroup}): runs are not capped; peak memory = RSS + fincore")
    overhead = parse_size(opts.overhead)
    files = [Path(f) for f in info["files"]]
    prompt, prompt_source = make_prompt(
        Path(opts.tokenizer) if opts.tokenizer else path, info["vocab_size"], opts.prompt_tokens, opts.seed
    )

    peers = list(opts.peers)
    skip_forever: dict[str, str] = {}  # engine -> why it cannot run here (the same in every round)
    if is_gguf(path):
        for peer in ("naive", "accelerate"):
            skip_forever[peer] = f"{peer} needs a Hugging Face checkpoint folder; MODEL is a GGUF file"
    gguf_file = opts.gguf or (str(path) if is_gguf(path) else None)  # what the llama.cpp peer runs
    if "naive" in peers and "naive" not in skip_forever:
        write_naive_files(path, work / "naive", opts.dtype)
    cache_files = files + sorted((work / "naive").glob("*.pt"))  # evicted before each run
    if gguf_file and Path(gguf_file) not in files and Path(gguf_file).exists():
        cache_files.append(Path(gguf_file))

    m = machine(path)
    record = {
        "workload": name, "command": opts.command, "machine": m, "options": asdict(opts), "model": info,
        "machine_line": f"{m['cpu']}, {m['cpus']} CPUs, {m['ram_bytes'] / 2**30:.0f} GiB RAM, disk {m['disk']}, "
                        f"Linux {m['kernel']}, torch {m['torch']}",
        "memory_method": "cgroup v1 (memory.max_usage_in_bytes: RSS + page cache)" if use_cgroup
                         else f"RSS + fincore, no cap ({why_no_cgroup})",
        "prompt_source": prompt_source, "llamacpp_gguf": gguf_file, "bandwidth": [], "runs": [],
        "sampling": f"temperature {opts.temperature:g}, seed {opts.seed}" if opts.temperature > 0 else "greedy",
    }  # fmt: skip

    def cap_for(budget_b: int) -> int | None:
        if opts.memory_cap == "auto":
            return info["dense_bytes"] + budget_b + overhead
        return parse_size(opts.memory_cap)

    def spec(engine: str, budget: str, cap: int | None) -> dict:
        s = {"engine": engine, "model": str(path), "budget": budget, "prompt": prompt, "tokens": opts.tokens,
             "dtype": opts.dtype, "engine_options": opts.engine_options, "naive_dir": str(work / "naive"),
             "offload_dir": str(work / "offload"), "gguf": gguf_file,
             "threads": opts.threads or torch.get_num_threads(),  # torch's default, for llama.cpp too
             "temperature": opts.temperature, "seed": opts.seed, "cap_bytes": cap}  # fmt: skip
        if cap:
            s["accelerate_cpu_bytes"] = max(1 << 20, cap - overhead)
        else:
            s["accelerate_cpu_bytes"] = info["dense_bytes"] + budget_bytes(budget, info["expert_bytes"])
        return s

    def one(engine: str, budget: str, rnd: int) -> None:
        b = info["expert_bytes"] if engine == "resident" else budget_bytes(budget, info["expert_bytes"])
        cap = cap_for(b)
        too_big = resident_cannot_fit(info, cap) if engine == "resident" and use_cgroup else None
        if too_big:
            record["runs"].append({"engine": engine, "budget": budget, "round": rnd, "status": "skipped",
                                   "message": too_big, "budget_bytes": b, "cap_bytes": cap})  # fmt: skip
            _log(f"round {rnd} {engine:10s} {budget:>6s}: skipped ({too_big})")
            return
        t = time.perf_counter()
        r = run_isolated(
            spec(engine, budget, cap), cap, use_cgroup, cache_files, work, opts.timeout_s, opts.drop_caches
        )
        shutil.rmtree(work / "offload", ignore_errors=True)
        r.update(
            engine=engine, budget=budget, budget_bytes=b, cap_bytes=cap if use_cgroup else None, round=rnd
        )
        r.pop("traceback", None) if r.get("status") == "ok" else None
        record["runs"].append(r)
        rate = r.get("decode_tokens_per_s")
        _log(f"round {rnd} {engine:10s} {budget:>6s}: {r.get('status')}"
             + (f" {rate:.3f} tok/s" if rate else f" ({r.get('message', '')[:200]})")
             + f" [{time.perf_counter() - t:.0f} s]")  # fmt: skip

    if "limit" in opts.budgets and opts.memory_cap == "auto":
        raise MoepagerError(
            "--budgets limit runs moepager with --memory-limit set to the cap: give --memory-cap"
        )
    for rnd in range(opts.rounds):
        drop_page_cache(cache_files, opts.drop_caches)
        bw = disk_bandwidth(files)
        record["bandwidth"].append(bw["bytes_per_s"])
        record["bandwidth_method"] = bw["method"]
        _log(f"round {rnd} disk bandwidth {bw['bytes_per_s'] / 1e9:.2f} GB/s ({bw['method']})")
        engines = ["moepager"] + peers
        if rnd % 2:
            engines.reverse()  # alternate the order, so slow drift in the machine hits every engine alike
        one("resident", "100%", rnd)
        for budget in opts.budgets:
            for engine in engines:
                if engine in skip_forever:  # a missing package does not appear between rounds
                    record["runs"].append({"engine": engine, "budget": budget, "round": rnd, "status": "skipped",
                                           "message": skip_forever[engine]})  # fmt: skip
                    continue
                one(engine, budget, rnd)
                if record["runs"][-1].get("status") == "skipped":
                    skip_forever[engine] = record["runs"][-1]["message"]
        record["summary"] = report.summarize(record["runs"], record["bandwidth"],
                                             info["expert_bytes"] / max(1, info["experts"]))  # fmt: skip
        written = write_outputs(record, out_dir / name)
    _log("wrote " + ", ".join(str(f) for f in written))
    print(report.markdown(record))
    return record


def resident_cannot_fit(info: dict, cap: int | None) -> str | None:
    """Why every expert resident cannot run under the cap (its weights alone pass it), or None. Such a run
    thrashes until --timeout (a 17 GB file under 8 GiB: 5 minutes for nothing), so it is not started."""
    weights = info["dense_bytes"] + info["expert_bytes"]
    if not cap or weights <= cap:
        return None
    return (f"every expert resident needs {format_bytes(weights)} of weights, more than the "
            f"{format_bytes(cap)} cap: not run")  # fmt: skip


def write_outputs(record: dict, stem: Path) -> list[Path]:
    """Write the result files; returns those written (the plot only where matplotlib is installed)."""
    out = lambda ext: stem.with_name(stem.name + ext)  # not with_suffix: a name may hold dots (x.q4_0)
    out(".json").write_text(json.dumps(record, indent=1, default=str))
    out(".md").write_text(report.markdown(record))
    try:
        report.plot(record, out(".png"))
    except ImportError:
        _log("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return [out(".json"), out(".md")]
    return [out(".json"), out(".md"), out(".png")]
