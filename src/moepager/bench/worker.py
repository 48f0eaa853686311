"""The child side of a benchmark run: load one engine, generate, write what was measured as JSON.

`python -m moepager.bench.worker SPEC.json RESULT.json`. Every engine is timed by the same clock here:
time to first token (prefill + first sample), then the decode of the remaining tokens, greedy, with no
stop token. Disk bytes come from /proc/self/io (what the process really fetched from storage, whatever
the engine believes); expert-cache counters come from moepager's own stats where the engine has them.
Engines: moepager (paged, at a budget), resident (moepager with every expert in memory: the compute
floor), naive (torch.load of one .pt file per needed expert per token), accelerate (transformers with
disk offload), llamacpp (llama-cpp-python, mmap).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch


class Unavailable(Exception):
    """This engine cannot run here (a missing package or feature); the run is reported as skipped."""


def _disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


class Clock:
    """Marks the first token and the end; snapshots disk bytes and engine counters at both."""

    def __init__(self, counters=lambda: {}):
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
                "hit_rate": (delta.get("hits", 0) + delta.get("prefetch_hits", 0)) / used if used else None,
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


def run_moepager(spec: dict, resident: bool) -> dict:
    import moepager

    options = {} if resident else {"expert_memory": spec["budget"], **spec.get("engine_options", {})}
    try:
        engine = moepager.load(spec["model"], dtype=spec.get("dtype"), **options)
    except TypeError as e:
        if "unknown runtime options" in str(e) or "unexpected keyword" in str(e):
            raise Unavailable(f"this moepager build has no expert paging ({e})") from None
        raise
    load_s = time.perf_counter() - spec["_t_start"]
    stats = lambda: (engine.stats().get("experts") or {})  # noqa: E731
    clock = Clock(_expert_counters(stats))
    stream = engine.stream(spec["prompt"], spec["tokens"], stop_ids=[])
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
        from moepager.moe import expert_forward, group_by_expert

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
    from moepager.generate import SamplingParams, generate_step
    from moepager.model import Transformer
    from moepager.store.source import open_source

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
    stream = generate_step(net, prompt, spec["tokens"], SamplingParams(stop_ids=[]))
    ids = _generate(lambda: next(stream), lambda _: next(stream), spec, clock)
    out = clock.done(len(ids), len(spec["prompt"]))
    out["expert"].pop("hit_rate", None)
    out.update(load_s=load_s, token_ids=ids)
    return out


def run_accelerate(spec: dict) -> dict:
    try:
        import accelerate  # noqa: F401
        import transformers
    except ImportError as e:
        raise Unavailable(f"transformers/accelerate not installed ({e.name}); pip install -e '.[bench]'") from None
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
    state = {}

    @torch.inference_mode()
    def first() -> int:
        out = model(torch.tensor([spec["prompt"]]), use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def step(tid: int) -> int:
        out = model(torch.tensor([[tid]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    ids = _generate(first, step, spec, clock)
    out = clock.done(len(ids), len(spec["prompt"]))
    out.update(load_s=load_s, token_ids=ids, device_map_modules=placed)
    return out


def run_llamacpp(spec: dict) -> dict:
    try:
        import llama_cpp
    except ImportError:
        raise Unavailable("llama-cpp-python is not installed (it builds from source in ~17 min)") from None
    gguf = spec.get("gguf")
    if not gguf or not Path(gguf).exists():
        raise Unavailable("no GGUF file of this model (give one with --gguf)")
    llm = llama_cpp.Llama(model_path=gguf, use_mmap=True, n_ctx=len(spec["prompt"]) + spec["tokens"] + 8,
                          n_threads=torch.get_num_threads(), verbose=False)  # fmt: skip
    load_s = time.perf_counter() - spec["_t_start"]
    clock = Clock()

    def first() -> int:
        llm.eval(spec["prompt"])
        return int(llm.sample(temp=0.0))

    def step(tid: int) -> int:
        llm.eval([tid])
        return int(llm.sample(temp=0.0))

    ids = _generate(first, step, spec, clock)
    out = clock.done(len(ids), len(spec["prompt"]))
    out.update(load_s=load_s, token_ids=ids)
    return out


ENGINES = {
    "moepager": lambda s: run_moepager(s, resident=False),
    "resident": lambda s: run_moepager(s, resident=True),
    "naive": run_naive,
    "accelerate": run_accelerate,
    "llamacpp": run_llamacpp,
}


def run(spec: dict) -> dict:
    spec["_t_start"] = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        out = {"status": "ok", **ENGINES[spec["engine"]](spec)}
    except Unavailable as e:
        out = {"status": "skipped", "message": str(e)}
    except Exception as e:  # reported in the results, not hidden: the run is marked as an error
        out = {"status": "error", "message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = run(spec)
    Path(argv[1]).write_text(json.dumps(out))
    return 0 if out["status"] != "error" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
