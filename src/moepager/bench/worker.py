"""The child side of a benchmark run: load one engine, generate, write what was measured as JSON.

`python .../moepager/bench/worker.py SPEC.json RESULT.json`, run as a file and not with -m, and importing
torch only for the engines that use it: `python -m moepager.bench.worker` would import the moepager
package, and torch with it (~245 MiB of RSS), and charge that to llama.cpp's memory cap. Every engine is timed by the same clock here:
time to first token (prefill + first sample), then the decode of the remaining tokens, with no stop token.
Every engine samples softmax(logits / temperature) with a seeded generator of its own (temperature 0:
greedy): moepager, naive and accelerate through moepager's sampler, llama.cpp through its own. Their tokens
differ (other logits, other samplers); what matters is that routing varies from token to token in each.
Disk bytes come from /proc/self/io (what the process really fetched from storage, whatever the engine
believes); expert-cache counters come from moepager's own stats where the engine has them.
Engines: moepager (paged, at a budget), resident (moepager with every expert in memory: the compute
floor), naive (torch.load of one .pt file per needed expert per token), accelerate (transformers with
disk offload), llamacpp (llama-cpp-python, mmap, on a GGUF file).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path


class Unavailable(Exception):
    """This engine cannot run here (a missing package or feature); the run is reported as skipped."""


def _disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


class Clock:
    """Marks the first token and the end; snapshots disk bytes and engine counters at both."""

    def __init__(self, counters=dict):
        self.counters = counters
        self.t0 = time.perf_counter()
        self.disk0 = _disk_read_bytes()

    def first_token(self) -> None:
        self.t1 = time.perf_counter()
        self.disk1, self.c1 = _disk_read_bytes(), self.counters()

    def done(self, n_tokens: int, prompt_tokens: int) -> dict:
        t2, disk2, c2 = time.perf_counter(), _disk_read_bytes(), self.counters()
        decode_tokens = n_tokens - 1
        out = {
            "ttft_s": self.t1 - self.t0,
            "prefill_tokens_per_s": prompt_tokens / (self.t1 - self.t0),
            "decode_tokens": decode_tokens,
            "decode_s": t2 - self.t1,
            "decode_tokens_per_s": decode_tokens / (t2 - self.t1) if decode_tokens else 0.0,
            "prefill_disk_bytes": self.disk1 - self.disk0,
            "decode_disk_bytes_per_token": (disk2 - self.disk1) / decode_tokens if decode_tokens else 0.0,
        }
        if self.c1 or c2:  # counters over the decode window only
            delta = {k: c2[k] - self.c1.get(k, 0) for k in c2}
            used = delta.get("hits", 0) + delta.get("prefetch_hits", 0) + delta.get("misses", 0)
            out["expert"] = {
                "hit_rate": delta.get("hits", 0) / used if used else None,  # true hits: no disk read
                "bytes_read_per_token": delta.get("bytes_read", 0) / decode_tokens if decode_tokens else 0.0,
                "wait_fraction": delta.get("wait_s", 0.0) / out["decode_s"] if out["decode_s"] else 0.0,
                **{k: v for k, v in delta.items() if k in ("hits", "prefetch_hits", "misses", "bytes_read",
                                                          "read_s", "wait_s")},
            }  # fmt: skip
        return out


_COUNTERS = ("hits", "prefetch_hits", "misses", "bytes_read", "read_s", "wait_s")


def _expert_counters(stats_fn):
    def get() -> dict:
        s = stats_fn() or {}
        return {k: s[k] for k in _COUNTERS if isinstance(s.get(k), (int, float))}

    return get


def _generate(step_first, step_next, spec: dict, clock: Clock) -> list[int]:
    """Shared loop: the first token from the prompt, then `tokens - 1` decode steps."""
    ids = [step_first()]
    clock.first_token()
    for _ in range(spec["tokens"] - 1):
        ids.append(step_next(ids[-1]))
    return ids


def _sampling(spec: dict):
    """moepager's SamplingParams for this run (no stop ids: every run generates all its tokens)."""
    from moepager.generation.generate import SamplingParams

    return SamplingParams(temperature=spec.get("temperature", 0.0), seed=spec.get("seed", 0), stop_ids=[])


def _torch(spec: dict):
    """torch, with the run's thread count (the same for every engine: the parent's torch default if unset)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return torch


def _logits_sampler(spec: dict):
    """logits [V] -> a token id: softmax(logits / T) and torch.multinomial with one seeded generator."""
    import torch

    from moepager.generation.generate import sample

    params = _sampling(spec)
    generator = torch.Generator().manual_seed(params.seed)
    return lambda logits: int(sample(logits[None].float(), params, generator)[0])


def run_moepager(spec: dict, resident: bool) -> dict:
    _torch(spec)
    import moepager

    if resident:
        options = {}
    elif spec["budget"] == "limit":  # what `moepager run --memory-limit CAP --max-context N` does
        context = len(spec["prompt"]) + spec["tokens"] + 8
        options = {
            "memory_limit": spec["cap_bytes"],
            "max_context": context,
            **spec.get("engine_options", {}),
        }
    else:
        options = {"expert_memory": spec["budget"], **spec.get("engine_options", {})}
    try:
        engine = moepager.load(spec["model"], dtype=spec.get("dtype"), **options)
    except TypeError as e:
        if (
            "unknown runtime options" in str(e)
            or "unknown engine options" in str(e)
            or "unexpected keyword" in str(e)
        ):
            raise Unavailable(f"this moepager build has no expert paging ({e})") from None
        raise
    load_s = time.perf_counter() - spec["_t_start"]
    stats = lambda: engine.stats().get("experts") or {}
    clock = Clock(_expert_counters(stats))
    p = _sampling(spec)
    stream = engine.stream(
        spec["prompt"], spec["tokens"], temperature=p.temperature, seed=p.seed, stop_ids=[]
    )
    ids = _generate(lambda: next(stream), lambda _: next(stream), spec, clock)
    out = clock.done(len(ids), len(spec["prompt"]))
    final = stats()
    out.update(load_s=load_s, token_ids=ids,
               cache={k: final.get(k) for k in ("budget_bytes", "resident_bytes", "peak_resident_bytes",
                                                "total_expert_bytes", "capacity", "policy")})  # fmt: skip
    return out


class NaiveExperts:
    """The naive way to page: torch.load each needed expert's own .pt file, every time it is needed."""

    def __init__(self, config, folder: Path):
        self.config, self.folder = config, folder
        self.bytes_read, self.read_s = 0, 0.0

    def __call__(self, layer, x, ids, weights):
        import torch

        from moepager.model.moe import expert_forward, group_by_expert

        def get(e: int):
            path = self.folder / f"{layer}_{e}.pt"
            t = time.perf_counter()
            w = torch.load(path, weights_only=True)
            self.read_s += time.perf_counter() - t
            self.bytes_read += path.stat().st_size
            return w

        y, flat_w = torch.zeros_like(x), weights.flatten()
        for e, rows, pos in group_by_expert(ids):  # one torch.load'ed expert at a time
            out = expert_forward(get(e), x[rows], self.config)
            y.index_add_(0, rows, out * flat_w[pos, None].to(out.dtype))
        return y

    def stats(self) -> dict:
        return {"bytes_read": self.bytes_read, "read_s": self.read_s, "wait_s": self.read_s}


def run_naive(spec: dict) -> dict:
    torch = _torch(spec)
    from moepager.generation.generate import generate_step
    from moepager.model.decoder import Transformer
    from moepager.store.open_model import open_source

    ckpt = open_source(spec["model"])
    state = ckpt.dense_state_dict()
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else state["embed.weight"].dtype
    with torch.device("meta"):
        net = Transformer(ckpt.config)
    net.load_state_dict(state, strict=True, assign=True)
    net.to(dtype=dtype)
    net.rotary.inv_freq = net.rotary.inv_freq.float()
    net.eval()
    experts = NaiveExperts(ckpt.config, Path(spec["naive_dir"]))
    net.set_experts(experts)
    load_s = time.perf_counter() - spec["_t_start"]
    clock = Clock(experts.stats)
    prompt = torch.tensor(spec["prompt"])
    stream = generate_step(net, prompt, spec["tokens"], _sampling(spec))
    ids = _generate(lambda: next(stream), lambda _: next(stream), spec, clock)
    out = clock.done(len(ids), len(spec["prompt"]))
    out["expert"].pop("hit_rate", None)
    out.update(load_s=load_s, token_ids=ids)
    return out


def run_accelerate(spec: dict) -> dict:
    torch = _torch(spec)
    try:
        import accelerate  # noqa: F401
        import transformers
    except ImportError as e:
        raise Unavailable(
            f"transformers/accelerate not installed ({e.name}); pip install -e '.[bench]'"
        ) from None
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else "auto"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model"], device_map="auto", max_memory={"cpu": spec["accelerate_cpu_bytes"]},
        offload_folder=spec["offload_dir"], dtype=dtype,
    ).eval()  # fmt: skip
    load_s = time.perf_counter() - spec["_t_start"]
    placed = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        placed[str(dev)] = placed.get(str(dev), 0) + 1
    clock = Clock()
    state, pick = {}, _logits_sampler(spec)

    @torch.inference_mode()
    def first() -> int:
        out = model(torch.tensor([spec["prompt"]]), use_cache=True)
        state["past"] = out.past_key_values
        return pick(out.logits[0, -1])

    @torch.inference_mode()
    def step(tid: int) -> int:
        out = model(torch.tensor([[tid]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return pick(out.logits[0, -1])

    ids = _generate(first, step, spec, clock)
    out = clock.done(len(ids), len(spec["prompt"]))
    out.update(load_s=load_s, token_ids=ids, device_map_modules=placed)
    return out


def run_llamacpp(spec: dict, repack: bool = True, lazy: bool = False) -> dict:
    """llama.cpp on the GGUF, mmapped. repack: its weight repacking into faster layouts (use_extra_bufts, its
    default; the repacked copy lives in anonymous memory, so a model larger than the cap needs it off). lazy:
    its own on-demand expert loading (lazy_mode; needs mmap)."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as low
    except ImportError:
        raise Unavailable("llama-cpp-python is not installed (it builds from source in ~17 min)") from None
    defaults = low.llama_model_default_params

    def model_params():  # Llama() exposes neither setting: set them where it takes its defaults
        p = defaults()
        p.use_extra_bufts = repack
        if lazy:
            p.lazy_mode = 2  # LLAMA_LAZY_MODE_ON
        return p

    low.llama_model_default_params = model_params
    gguf = spec.get("gguf")
    if not gguf or not Path(gguf).exists():
        raise Unavailable("no GGUF file of this model (give one with --gguf)")
    temp, seed = float(spec.get("temperature", 0.0)), int(spec.get("seed", 0))
    threads = spec.get("threads") or None  # None: llama-cpp-python's default (half the CPUs)
    try:
        llm = llama_cpp.Llama(model_path=gguf, use_mmap=True, n_ctx=len(spec["prompt"]) + spec["tokens"] + 8,
                              n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False)  # fmt: skip
    except ValueError as e:  # llama.cpp logs why only when verbose; say where to look
        raise RuntimeError(f"llama.cpp could not load {gguf} ({e}); load it with llama_cpp.Llama(model_path=..., "
                           "verbose=True) to see why") from None  # fmt: skip
    if max(spec["prompt"]) >= llm.n_vocab():
        raise RuntimeError(f"prompt id {max(spec['prompt'])} is past {gguf}'s vocabulary ({llm.n_vocab()})")
    load_s = time.perf_counter() - spec["_t_start"]
    clock = Clock()
    n = [0]

    def pick() -> int:
        # llama-cpp-python builds a new sampler (and its RNG, from the Llama's seed) on every call: without a
        # new seed per token every step would draw the same uniform number. top_k/top_p/min_p off: plain
        # softmax(logits / T), the distribution the other engines sample.
        llm.set_seed(seed + n[0])
        n[0] += 1
        return int(llm.sample(temp=temp, top_k=0, top_p=1.0, min_p=0.0))

    def first() -> int:
        llm.eval(spec["prompt"])
        return pick()

    def step(tid: int) -> int:
        llm.eval([tid])
        return pick()

    ids = _generate(first, step, spec, clock)
    out = clock.done(len(ids), len(spec["prompt"]))
    out.update(load_s=load_s, token_ids=ids, gguf=gguf)
    return out


ENGINES = {
    "moepager": lambda s: run_moepager(s, resident=False),
    "resident": lambda s: run_moepager(s, resident=True),
    "naive": run_naive,
    "accelerate": run_accelerate,
    "llamacpp": run_llamacpp,
    "llamacpp-norepack": lambda s: run_llamacpp(s, repack=False),
    "llamacpp-lazy": lambda s: run_llamacpp(s, repack=False, lazy=True),
}


def run(spec: dict) -> dict:
    spec["_t_start"] = time.perf_counter()
    try:
        out = {"status": "ok", **ENGINES[spec["engine"]](spec)}
    except Unavailable as e:
        out = {"status": "skipped", "message": str(e)}
    # any failure is reported in the results, not hidden: the run is marked as an error
    except Exception as e:  # noqa: BLE001
        out = {"status": "error", "message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = run(spec)
    Path(argv[1]).write_text(json.dumps(out))
    return 0 if out["status"] != "error" else 1


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # the tree the parent runs, not this folder
    sys.exit(main(sys.argv[1:]))
