"""`moepager plan`: the speed a memory budget gives, predicted from the start of the very run it describes.

Owns the prediction. It loads the model exactly as `moepager run --memory-limit LIMIT --no-prefetch --no-fill` will
(the same footprint, the same expert cache, the same policy, the cache empty at the start: a fill at load is not
modelled), then generates the first `trace_tokens` tokens of that
run: the same prompt, temperature and seed, so the same tokens and routing (output is exact). From them:
- time to first token: the prefill, measured as the run will pay it: its compute and its reads into the cold
  cache (the prefill is measured, not modelled: it is the run's own first step);
- compute per decode token: the traced decode steps less the time they waited on reads, so attention, dense
  weights, routing, each layer's host decisions and the paged experts' own memory are all counted;
- the price of a miss: the traced steps' waiting time per expert read (from the prefill's reads when the
  decode read none);
- the misses of the rest of the run: the cold-start fill model (paging/fill.py) continues the traced routing
  with per-layer Pólya urns fitted to it, and replays prompt, traced and continued tokens through the cache's
  policy with the cache's slots, from cold to warm.
Decode time of the run = the traced steps as measured + for each later token (compute + its misses x the price
of a miss); the steady state (the cache warm) is shown beside it. Assumed: reads do not overlap compute
(prefetch off), and later tokens route like the traced ones.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..system.sizes import format_bytes, parse_bytes

DEFAULT_PROMPT = list(range(1, 17))  # when no prompt is given: 16 token ids


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
    embedding_from_file: bool  # the token embedding's rows are read from the file as looked up, not held
    kv_bytes: int  # KV cache at `context` tokens
    buffer_bytes: int  # activations and allocator slack
    prefill_chunk: int  # prompt tokens per forward: the chunk whose activations the buffers hold
    staging_bytes: int  # the cache's read staging buffers (0 when reads land in the slots)
    expert_budget_bytes: int  # what the limit leaves the expert cache
    slot_bytes: int  # one expert in the cache
    expert_read_bytes: int  # one expert on disk
    cache_experts: int  # slots the budget holds (at least top_k)
    total_experts: int
    moe_layers: int
    top_k: int
    prompt_flag: str  # how `run` is given the same prompt
    prompt_tokens: int
    temperature: float  # of the traced decoding, and of the run (0: greedy)
    seed: int | None
    run_tokens: int  # tokens the run generates (its --max-tokens, or fewer where the traced tokens stopped)
    traced_tokens: int  # decode steps generated to measure (the run's first ones)
    disk_bytes_per_s: float  # the traced reads: bytes over the time spent reading them
    disk_bytes_measured: int
    disk_seconds: float
    read_s_per_miss: float  # what compute waits per expert read on demand while decoding
    compute_s_per_token: float  # a decode step through the paged path, waits on reads taken out
    prefill_compute_s: float
    prefill_read_s: float  # the prefill's wait on reads into the cold cache
    prefill_misses: int
    ttft_s: float  # time to first token: prefill compute + its reads
    run_misses_per_token: float  # misses per decode step over the run (measured, then the fill model)
    run_decode_s: float
    decode_tokens_per_s: float  # over the run: what `run` reports as decode tok/s
    hit_rate: float  # steady state: once the cache is warm (fill model)
    uniform_hit_rate: float  # what routing spread uniformly over the experts would give: slots / all
    misses_per_token: float  # steady state
    read_s_per_token: float  # steady state
    steady_tokens_per_s: float
    alpha: float  # the fill model's urn prior (small: routing concentrated on few experts)

    def as_dict(self) -> dict:
        return asdict(self)


def _waited(cache) -> tuple[float, int, int, float]:
    """(seconds waited on reads, misses, bytes read, seconds reading) so far."""
    s = cache.stats()
    return s["wait_s"], s["misses"], s["bytes_read"], s["read_s"]


def trace_start(engine, prompt: list[int], tokens: int, temperature: float, seed: int | None,
                seconds: float) -> dict:  # fmt: skip
    """Generate the run's first tokens (up to `tokens`; decoding stops after `seconds`, at two steps at least)
    and measure the prefill and the decode steps apart, with the reads each waited on."""
    cache, timings = engine.experts.cache, engine.timings
    start, first, end = _waited(cache), None, None
    decoded, t0, cut, step1_s, step1 = 0, time.perf_counter(), False, 0.0, start
    stream = engine.stream(prompt, tokens, temperature=temperature, seed=seed)
    for i, _ in enumerate(stream):
        if i == 0:
            first, prefill_s, t0 = _waited(cache), timings.prefill_s, time.perf_counter()
        else:
            decoded = i
            if i == 1:  # the first decode step also sets up what later ones reuse (kernels' graphs, buffers)
                step1_s, step1 = timings.decode_s, _waited(cache)
            if decoded >= 2 and time.perf_counter() - t0 > seconds:
                cut = True
                break
    stream.close()
    end = _waited(cache)
    return {
        "generated": decoded + 1,
        "stopped": not cut and decoded + 1 < tokens,  # a stop id ended it
        "prefill_s": prefill_s, "prefill_wait_s": first[0] - start[0], "prefill_misses": first[1] - start[1],
        "decode_s": timings.decode_s, "decode_wait_s": end[0] - first[0], "decode_misses": end[1] - first[1],
        "decoded": decoded, "bytes_read": end[2] - start[2], "read_s": end[3] - start[3],
        # decode steps after the first: the compute per token the rest of the run will see
        "later_compute_s": (timings.decode_s - step1_s) - (end[0] - step1[0]) if decoded >= 2 else None,
    }  # fmt: skip


def plan(model: str, memory: str | int, max_context: int | None = None, device: str = "cpu",
         dtype: str | None = None, seconds: float = 60.0, model_arg: str | None = None,
         prompt: list[int] | Callable | None = None, prompt_flag: str | None = None, max_tokens: int = 64,
         temperature: float = 0.0, seed: int | None = None, trace_tokens: int = 16) -> Plan:  # fmt: skip
    """prompt: token ids, or a function of the loaded engine giving them (default: DEFAULT_PROMPT)."""
    from ..generation.generate import check_sampling
    from ..model.decoder import weight_storages
    from ..paging.fill import RoutingSample, forecast
    from ..paging.policies import make_policy
    from .engine import load

    limit = parse_bytes(memory, what="--memory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = load(model, device=device, dtype=dtype, memory_limit=limit, prefetch=False, fill=False,
                      max_context=max_context, record_trace=True)  # fmt: skip
    note = next((str(w.message) for w in caught if "leaves room for a context" in str(w.message)), None)
    paged, cfg = engine.experts, engine.config
    cache = paged.cache
    fp = cache.footprint
    dense = sum(weight_storages(engine.model).values())
    ids = prompt(engine) if callable(prompt) else list(prompt or DEFAULT_PROMPT)
    flag = prompt_flag or "--prompt-ids " + ",".join(map(str, ids))
    # what run refuses, plan refuses: the prompt and the tokens must fit the context the limit plans for
    check_sampling(max_tokens, temperature, prompt_tokens=len(ids), context=fp["context"])

    m = trace_start(engine, ids, min(max_tokens, trace_tokens + 1), temperature, seed, seconds)
    run_tokens = m["generated"] if m["stopped"] and (temperature <= 0 or seed is not None) else max_tokens
    n = m["decoded"]
    if n >= 2:
        compute = m["later_compute_s"] / (n - 1)
    else:
        compute = (m["decode_s"] - m["decode_wait_s"]) / n if n else m["prefill_s"] - m["prefill_wait_s"]
    if m["decode_misses"]:
        per_miss = m["decode_wait_s"] / m["decode_misses"]
    else:  # the decode read nothing: the prefill's reads are the price (larger batches: a lower bound)
        per_miss = m["prefill_wait_s"] / m["prefill_misses"] if m["prefill_misses"] else 0.0

    sample = RoutingSample.from_steps(engine.trace.steps, cfg.num_experts, cfg.top_k)
    steps = max(0, run_tokens - 1)  # decode steps: the first token comes from the prefill
    fc = forecast(sample, cache.capacity, steps, make_policy(None), seed=0)
    later = fc.misses[n:steps]
    run_decode_s = m["decode_s"] + sum(compute + x * per_miss for x in later)
    read_bytes = cache.source.expert_nbytes(*cache.source.expert_keys()[0])
    steady_read = fc.steady_misses * per_miss
    return Plan(
        model=model_arg or "", memory=str(memory), memory_bytes=limit, device=str(engine.device),
        dtype=str(engine.model.norm.weight.dtype).removeprefix("torch."), context=fp["context"], context_note=note,
        runtime_bytes=max(0, fp["process"] - dense), dense_bytes=min(dense, fp["process"]),
        embedding_from_file=getattr(engine.model.embed, "read_rows", None) is not None,
        kv_bytes=fp["kv_cache"], buffer_bytes=fp["buffers"], prefill_chunk=fp["prefill_chunk"],
        staging_bytes=cache.staging_bytes,
        expert_budget_bytes=cache.budget_bytes, slot_bytes=cache.slot_bytes, expert_read_bytes=read_bytes,
        cache_experts=cache.capacity, total_experts=cache.num_keys, moe_layers=cfg.num_moe_layers,
        top_k=cfg.top_k, prompt_flag=flag, prompt_tokens=len(ids), temperature=temperature, seed=seed,
        run_tokens=run_tokens, traced_tokens=n,
        disk_bytes_per_s=m["bytes_read"] / m["read_s"] if m["read_s"] else 0.0,
        disk_bytes_measured=m["bytes_read"], disk_seconds=m["read_s"], read_s_per_miss=per_miss,
        compute_s_per_token=compute, prefill_compute_s=m["prefill_s"] - m["prefill_wait_s"],
        prefill_read_s=m["prefill_wait_s"], prefill_misses=m["prefill_misses"], ttft_s=m["prefill_s"],
        run_misses_per_token=(m["decode_misses"] + sum(later)) / steps if steps else 0.0,
        run_decode_s=run_decode_s, decode_tokens_per_s=steps / run_decode_s if run_decode_s > 0 else 0.0,
        hit_rate=fc.steady_hit_rate, uniform_hit_rate=min(1.0, cache.capacity / cache.num_keys),
        misses_per_token=fc.steady_misses, read_s_per_token=steady_read,
        steady_tokens_per_s=1 / (compute + steady_read), alpha=fc.alpha,
    )  # fmt: skip


def run_command(p: Plan) -> str:
    """The `moepager run` the plan describes: the same limit, context, prompt, length and sampling."""
    model = f" {p.model}" if p.model else ""
    sampling = "" if p.temperature <= 0 else f" --temperature {p.temperature:g}"
    sampling += "" if p.seed is None or p.temperature <= 0 else f" --seed {p.seed}"
    return (f"moepager run{model} --memory-limit {p.memory} --max-context {p.context} --no-prefetch --no-fill "
            f"--max-tokens {p.run_tokens}{sampling} {p.prompt_flag}")  # fmt: skip


def format_plan(p: Plan) -> str:
    model = f" {p.model}" if p.model else ""
    b = format_bytes
    rows = [
        ("runtime (python, torch, libraries)", b(p.runtime_bytes), "pages only it holds (idle library pages dropped), less the dense weights"),
        ("dense weights", b(p.dense_bytes), "attention, norms, routers, shared experts, output head, "
         + ("the embedding's rows read from the file as tokens come" if p.embedding_from_file else "embedding")),
        (f"KV cache at {p.context} tokens", b(p.kv_bytes), "its buffers grow by doubling, up to this context"),
        ("buffers", b(p.buffer_bytes), f"activations of a {p.prefill_chunk}-token prefill chunk, allocator slack"),
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
    how = "greedy" if p.temperature <= 0 else f"sampled at temperature {p.temperature:g}"
    seed = "" if p.temperature <= 0 else (f", seed {p.seed}" if p.seed is not None else ", not seeded")
    out.append(f"measured: the run's first {p.traced_tokens + 1} tokens ({how}{seed}) after a prompt of "
               f"{p.prompt_tokens} tokens, in this limit and this expert cache")  # fmt: skip
    if p.disk_bytes_measured:
        out.append(f"  disk: {p.disk_bytes_per_s / 1e9:.2f} GB/s per reading thread, reading "
                   f"{b(p.disk_bytes_measured)} of this model's "
                   f"experts (O_DIRECT, {p.disk_seconds:.1f} s); compute waited {p.read_s_per_miss * 1e3:.1f} ms "
                   "per expert missed")  # fmt: skip
    else:
        out.append("  disk: nothing was read (every expert it needed was resident)")
    out.append(f"  compute: {p.compute_s_per_token * 1e3:.1f} ms per token through the paged path (waits on reads "
               f"taken out), over decode steps 2 to {p.traced_tokens}")  # fmt: skip
    out.append(f"time to first token: {p.ttft_s:.2f} s = {p.prefill_compute_s:.2f} s prefill compute + "
               f"{p.prefill_read_s:.2f} s reading {p.prefill_misses} experts into the cold cache")  # fmt: skip
    out.append(f"predicted decode: {p.decode_tokens_per_s:.2f} tokens/s over a run of {p.run_tokens} tokens "
               f"(--max-tokens; the cache fills from cold: {p.run_misses_per_token:.1f} experts read per token "
               "on average)")  # fmt: skip
    out.append(f"  steady state (cache warm): {p.steady_tokens_per_s:.2f} tokens/s = 1 / "
               f"({p.compute_s_per_token * 1e3:.1f} ms compute + {p.read_s_per_token * 1e3:.1f} ms reading "
               f"{p.misses_per_token:.1f} experts of {b(p.expert_read_bytes)} per token), hit rate "
               f"{p.hit_rate:.2f} (routing spread uniformly would give {p.uniform_hit_rate:.2f})")  # fmt: skip
    out.append(f"  misses after the measured tokens: the measured routing continued by per-layer urns fitted to "
               f"it (alpha {p.alpha:.3g}) and replayed through the default policy with these {p.cache_experts} "
               f"slots; {p.top_k} experts per token in each of {p.moe_layers} layers; assumes later tokens route "
               "like the measured ones and reads do not overlap compute (prefetch off)")  # fmt: skip
    out.append(f"run with: {run_command(p)}")
    out.append(f"  (the same expert cache: --expert-memory {p.cache_experts * p.slot_bytes})")
    return "\n".join(out)
