"""`moepager plan`: what a memory budget costs and gives, measured before any run, without loading the experts.

Owns the prediction. It loads what every run loads (the runtime and the dense weights) under the memory limit,
with the smallest expert cache (one token's experts of one layer), and measures on this machine:
- the memory breakdown the limit is split by (paging/paged.py's own footprint and context fitting);
- the disk: the cache's own read path (O_DIRECT, batched, coalesced) reading random experts of the model, in
  steps of as many misses as a layer step is expected to have, for about `seconds`;
- the compute: decode steps in which every expert is a hit (each layer computes its experts from resident
  slots through the paging path), so attention, dense weights, routing and host decisions are all counted.
- the routing: the experts the model's own routers chose in those decode steps, replayed through the default
  eviction policy (paging/trace.py) with the cache's slots; the first half of the steps warms the cache, the
  hit rate is that of the second half.
Then decode time per token = compute + misses per token x expert bytes / disk bandwidth. The assumptions,
printed with the plan: the routing of the measured steps (a prompt of token ids 1..8, then sampled tokens) is
like the run's, and reads do not overlap compute (prefetch off: on a small CPU the reads compete with compute).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from .paging.cache import format_bytes, parse_bytes


@dataclass
class Plan:
    model: str  # as the user named it ("" for the default model)
    memory: str  # the limit as given
    memory_bytes: int
    device: str
    dtype: str
    context: int  # tokens the KV cache is planned for
    context_note: str | None  # set when the context was lowered to fit the limit
    runtime_bytes: int  # the process before the model (python, torch, libraries) and what loading adds
    dense_bytes: int  # resident weights: attention, norms, routers, shared experts, embedding, output
    kv_bytes: int  # KV cache at `context` tokens
    buffer_bytes: int  # activations and allocator slack
    staging_bytes: int  # the cache's read staging buffers (0 when reads land in the slots)
    expert_budget_bytes: int  # what the limit leaves the expert cache
    slot_bytes: int  # one expert in the cache
    expert_read_bytes: int  # one expert on disk
    cache_experts: int  # slots the budget holds (at least top_k)
    total_experts: int
    moe_layers: int
    top_k: int
    disk_bytes_per_s: float
    disk_bytes_measured: int
    disk_seconds: float
    compute_s_per_token: float  # a decode step with every expert a hit
    compute_tokens_measured: int
    hit_rate: float  # replayed from the measured steps' routing
    uniform_hit_rate: float  # what routing spread uniformly over the experts would give: slots / all
    routing_steps: int  # decode layer steps the hit rate was replayed over
    misses_per_token: float
    read_s_per_token: float
    decode_tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


class _AllHits:
    """The experts contract for timing compute alone: each layer's experts are renamed to experts 0..n-1 of one
    layer, which stay resident, and computed through the paging path (acquire, switch_glu, release). The
    routing asked for is recorded, (layer, ids [N][K]) per layer step, as a trace records it."""

    def __init__(self, paged, layer: int):
        self.paged, self.layer, self.steps = paged, layer, []

    def __call__(self, layer, x, ids, weights):
        self.steps.append((layer, ids.tolist()))
        ranks = torch.searchsorted(torch.unique(ids), ids)  # [N, K] in 0..n-1
        return self.paged(self.layer, x, ranks, weights)


def _replayed_hit_rate(steps: list, slots: int) -> tuple[float, int]:
    """The default policy's hit rate with `slots` over the decode steps' routing, counted over the second half
    (the first warms the cache, as a run's prefill and first tokens do), and the layer steps replayed."""
    from .paging.policies import make_policy
    from .paging.trace import replay

    requests = [(layer, sorted(set(ids[0]))) for layer, ids in steps if len(ids) == 1]  # decode: one token
    half = len(requests) // 2
    asked = lambda reqs: sum(len(e) for _, e in reqs)  # noqa: E731
    hits = replay(requests, slots, make_policy(None)) * asked(requests)
    hits -= replay(requests[:half], slots, make_policy(None)) * asked(requests[:half])
    later = asked(requests) - asked(requests[:half])
    return (hits / later if later else 1.0), len(requests) - half


def _time_compute(engine, paged, seconds: float) -> tuple[float, int, list]:
    """Seconds per decode step with every expert a hit, the steps timed (after two warm-up steps), and the
    routing of every step (at least 32 decode steps, for the replay)."""
    first = min(layer for layer, _ in paged.cache.source.expert_keys())
    experts = _AllHits(paged, first)
    engine.model.set_experts(experts)
    prompt = list(range(1, 9))
    most = max(8, min(256, engine.config.max_position_embeddings - 16))  # steps, within the model's context
    timed, t_start, steps = 0.0, None, 0
    # sampled, so the tokens vary as in a real run; decode_s counts only the decode steps
    for i, _ in enumerate(engine.stream(prompt, 1 << 30, temperature=1.0, seed=0, stop_ids=[])):
        if i == 2:
            t_start, d0 = time.perf_counter(), engine.timings.decode_s
        elif i > 2:
            steps += 1
            if (time.perf_counter() - t_start >= seconds and steps >= 32) or steps >= most:
                timed = engine.timings.decode_s - d0
                break
    engine.model.set_experts(paged)
    return timed / steps, steps, experts.steps


def _time_disk(cache, misses_per_step: int, seconds: float) -> tuple[float, int, float]:
    """(bytes/s, bytes, seconds) of the cache reading random experts, misses_per_step of one layer at a time."""
    keys = cache.source.expert_keys()
    by_layer: dict[int, list[int]] = {}
    for layer, e in keys:
        by_layer.setdefault(layer, []).append(e)
    layers, rng = sorted(by_layer), random.Random(0)
    n = max(1, min(misses_per_step, cache.capacity))
    before = cache.stats()["bytes_read"]
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        layer = rng.choice(layers)
        held = cache.acquire(layer, sorted(rng.sample(by_layer[layer], min(n, len(by_layer[layer])))))
        cache.release_held(layer, held)
    elapsed = time.perf_counter() - t0
    done = cache.stats()["bytes_read"] - before
    return done / elapsed, done, elapsed


def plan(model: str, memory: str | int, max_context: int | None = None, device: str = "cpu",
         dtype: str | None = None, seconds: float = 1.0, model_arg: str | None = None) -> Plan:  # fmt: skip
    from . import load

    limit = parse_bytes(memory, what="--memory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the smallest cache (raised to top_k slots): the limit's footprint is measured as for any run
        engine = load(model, device=device, dtype=dtype, memory_limit=limit, expert_memory=1, prefetch=False,
                      max_context=max_context)  # fmt: skip
    note = next((str(w.message) for w in caught if "leaves room for a context" in str(w.message)), None)
    paged, cfg = engine.experts, engine.config
    cache = paged.cache
    fp = cache.footprint
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # tied weights share one
                for t in [*engine.model.parameters(), *engine.model.buffers()]}  # fmt: skip
    dense = sum(storages.values())
    left = limit - fp["total"]
    budget = max(0, min(cache.total_bytes, left - cache.staging_bytes))  # as ExpertCache splits a limit
    slots = max(cache.min_slots, min(budget // cache.slot_bytes, cache.num_keys))
    compute_s, steps, routing = _time_compute(engine, paged, seconds)
    hit_rate, routing_steps = _replayed_hit_rate(routing, slots)
    if slots >= cache.num_keys:  # every expert fits: each is read once at most, then always hits
        hit_rate = 1.0
    misses_per_step = cfg.top_k * (1 - hit_rate)
    read_bytes = cache.source.expert_nbytes(*cache.source.expert_keys()[0])
    bw, done, disk_s = (0.0, 0, 0.0)
    if misses_per_step > 0:
        bw, done, disk_s = _time_disk(cache, math.ceil(misses_per_step), seconds)
    misses = misses_per_step * cfg.num_moe_layers
    read_s = misses * read_bytes / bw if misses > 0 else 0.0
    return Plan(
        model=model_arg or "", memory=str(memory), memory_bytes=limit, device=str(engine.device),
        dtype=str(engine.model.norm.weight.dtype).removeprefix("torch."), context=fp["context"], context_note=note,
        runtime_bytes=max(0, fp["process"] - dense), dense_bytes=min(dense, fp["process"]),
        kv_bytes=fp["kv_cache"], buffer_bytes=fp["buffers"], staging_bytes=cache.staging_bytes,
        expert_budget_bytes=budget, slot_bytes=cache.slot_bytes, expert_read_bytes=read_bytes,
        cache_experts=slots, total_experts=cache.num_keys, moe_layers=cfg.num_moe_layers, top_k=cfg.top_k,
        disk_bytes_per_s=bw, disk_bytes_measured=done, disk_seconds=disk_s, compute_s_per_token=compute_s,
        compute_tokens_measured=steps, hit_rate=hit_rate, uniform_hit_rate=slots / cache.num_keys,
        routing_steps=routing_steps, misses_per_token=misses, read_s_per_token=read_s,
        decode_tokens_per_s=1 / (compute_s + read_s),
    )  # fmt: skip


def format_plan(p: Plan) -> str:
    model = f" {p.model}" if p.model else ""
    b = format_bytes
    rows = [
        ("runtime (python, torch, libraries)", b(p.runtime_bytes), "measured RSS less the dense weights"),
        ("dense weights", b(p.dense_bytes), "attention, norms, routers, shared experts, embeddings"),
        (f"KV cache at {p.context} tokens", b(p.kv_bytes), "its buffers grow by doubling: up to twice the K/V"),
        ("buffers", b(p.buffer_bytes), "activations of a prefill chunk, allocator slack"),
        ("expert read staging", b(p.staging_bytes), "0 when reads land straight in the cache's slots"),
        ("expert cache", b(p.cache_experts * p.slot_bytes),
         f"{p.cache_experts} of {p.total_experts} experts ({p.cache_experts / p.total_experts:.0%}) of {b(p.slot_bytes)}"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    out = [f"plan for{model or ' the default model'} in {b(p.memory_bytes)} ({p.device}, {p.dtype}):"]
    out += [f"  {name:<{width}}  {size:>10}  {why}" for name, size, why in rows]
    all_in = p.memory_bytes - p.expert_budget_bytes + p.total_experts * p.slot_bytes
    if p.context_note:
        out.append(f"  note: {p.context_note}")
    if p.cache_experts < p.total_experts:
        out.append(f"  every expert would be resident from about {b(all_in)}")
    if p.disk_bytes_measured:
        out.append(f"disk: {p.disk_bytes_per_s / 1e9:.2f} GB/s, measured by reading {b(p.disk_bytes_measured)} of "
                   f"this model's experts in {p.disk_seconds:.1f} s through the cache (O_DIRECT)")  # fmt: skip
    else:
        out.append("disk: not measured (every expert fits: nothing is read while decoding)")
    out.append(f"compute: {p.compute_s_per_token * 1e3:.1f} ms per token with every expert resident "
               f"(measured over {p.compute_tokens_measured} decode steps)")  # fmt: skip
    out.append(f"predicted decode: {p.decode_tokens_per_s:.1f} tokens/s = 1 / ({p.compute_s_per_token * 1e3:.1f} ms "
               f"compute + {p.read_s_per_token * 1e3:.1f} ms reading {p.misses_per_token:.1f} experts of "
               f"{b(p.expert_read_bytes)} per token)")  # fmt: skip
    out.append(f"  hit rate {p.hit_rate:.2f}: the routing of the measured decode steps replayed through the "
               f"default policy with this cache ({p.routing_steps} layer steps after as many to warm it; routing "
               f"spread uniformly would give {p.uniform_hit_rate:.2f}); {p.top_k} experts per token in each of "
               f"{p.moe_layers} layers; assumes the run's text routes like these steps and reads do not overlap "
               "compute (prefetch off; on it may overlap reads, or compete with compute)")  # fmt: skip
    out.append(
        f"run with: moepager run{model} --memory-limit {p.memory} --max-context {p.context} --no-prefetch"
    )
    out.append(f"  (the same expert cache: --expert-memory {p.cache_experts * p.slot_bytes})")
    return "\n".join(out)
