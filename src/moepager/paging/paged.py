"""PagedExperts: the experts contract over an ExpertCache, so a model runs with any expert memory budget.

Owns the layer step: the layer's experts -> acquire them from the cache (in waves when they do not all fit)
-> compute them with moe.switch_glu over the cache's bank -> release. It also hands the residency API
(load/release/pin/unpin/resident) and the stats to the engine. Caching is cache.py's, guessing prefetch.py's.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..model.decoder import weight_storages
from ..model.kvcache import KVOptions
from ..model.moe import MoE, NotResident, grouped, sum_in_order, switch_glu
from ..system.process_memory import page_out_libraries, unique_bytes
from .cache import ExpertCache
from .guesses import fill_cache, reguess_from_prompt
from .hot_set import load_hot_set, save_hot_set
from .prefetch import Router, RouterPrefetcher


def _other_slots(slots: torch.Tensor, size: int) -> torch.Tensor:
    """slots [N, K], -1 for pairs of another wave -> each -1 a slot of the bank that its token does not use: the
    pair's output is dropped, and ggml's mul_mat_id takes an expert at most once a token (its row lists hold one
    entry per token and expert: a slot twice in a token's row wrote past them)."""
    rows = []
    for row in slots.tolist():
        free = (s for s in range(size) if s not in row)
        rows.append([s if s >= 0 else next(free) for s in row])
    return torch.tensor(rows, dtype=slots.dtype)


class PagedExperts:
    def __init__(self, config: ModelConfig, cache: ExpertCache, routers: dict[int, Router] | None = None,
                 prefetch: bool = True):  # fmt: skip
        self.config, self.cache = config, cache
        # expert -> slot of the layer step being computed (-1: not held)
        self._slot_of = torch.full((config.num_experts,), -1, dtype=torch.long, device=cache.device)
        # a cache that holds every expert misses each one once at most: a guess per layer step would cost more,
        # unless a miss is a network fetch (a remote source)
        slow = getattr(cache.source, "slow_misses", False)
        guessing = prefetch and routers and (cache.capacity < cache.num_keys or slow)
        self.prefetcher = RouterPrefetcher(routers, cache) if guessing else None
        self._draft_only: dict[int, set[int]] | None = None  # while drafting: the experts a layer may use
        self._prompt_counts: dict[int, list[int]] | None = None  # the first prompt's picks, while watched

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, K], weights [N, K] -> y [N, D]. One host decision per layer (which experts, which
        slots, which misses), then moe.switch_glu over the cache's bank, as resident experts compute."""
        pending = torch.unique(ids).tolist()  # experts ascending
        if self._draft_only is not None and not self._draft_only.get(layer, set()).issuperset(pending):
            raise NotResident(f"layer {layer}: a draft needed an expert that is not resident")
        if self.prefetcher is not None:
            self.prefetcher.observe(layer, pending)
        y, pairs, first = None, None, True
        bank = self.cache.banks[layer]
        while pending:  # one wave when the layer's experts fit; more when they do not
            guess = None
            if first and self.prefetcher is not None:
                guess = lambda: self.prefetcher.predict(layer, x)  # noqa: E731
            held = self.cache.acquire(layer, pending, before_wait=guess)  # {expert: slot}
            self._slot_of.fill_(-1)
            self._slot_of[list(held)] = torch.tensor(list(held.values()), device=self._slot_of.device)
            slots = self._slot_of[ids]  # [N, K]; -1: not in this wave
            if first and len(held) == len(pending):
                y = switch_glu(bank, x, ids, slots, weights, self.config)
            elif bank.fused_swiglu(self.config):
                # llama.cpp's graph in waves: each wave's (token, expert) outputs kept, summed in llama.cpp's order
                # once all are in (a sum per wave adds them in another order: other bits)
                wave = (slots >= 0)[..., None]
                part = bank.swiglu_pairs(x, _other_slots(slots, bank.size), self.config)  # [N, K, D]
                pairs = part if pairs is None else torch.where(wave, part, pairs)
            else:  # waves: each sums its own experts into y
                part = grouped(bank, x, ids, slots, weights, self.config)
                y = part if y is None else y + part
            first = False
            self.cache.release_held(layer, held)
            pending = [e for e in pending if e not in held]
        if self._prompt_counts is not None and ids.shape[0] > 1:
            self._count_prompt(layer, ids)
        return y if pairs is None else sum_in_order(pairs, weights)

    def watch_first_prompt(self) -> None:
        """After the first pass of several tokens (a prompt) has been through every MoE layer, place the cache's
        unused guesses again by its routing (guesses.py): a fill at load guesses every layer alike."""
        self._prompt_counts = {}

    def _count_prompt(self, layer: int, ids: torch.Tensor) -> None:
        self._prompt_counts[layer] = torch.bincount(ids.flatten(), minlength=self.config.num_experts).tolist()
        if layer == max(self.cache.banks):
            counts, self._prompt_counts = self._prompt_counts, None
            reguess_from_prompt(self.cache, counts, self.config.top_k)

    # what a caller that computes a layer's experts itself needs (model/ggml_decode.py: a token's graph, whose
    # host node at each router holds that layer's experts): the bank, and one token's experts held in it for a
    # layer step
    def step_fits(self) -> bool:
        """Whether a graph may compute from the cache's bank: on the CPU. One token's experts always fit its free
        slots at once (no waves): pin() keeps top_k slots unpinned, and a step releases a layer before the next."""
        return self.cache.device.type == "cpu"

    def step_bank(self, layer: int):
        return self.cache.banks[layer]

    def step_guesses(self) -> bool:
        """Whether hold_step wants the caller's guess of the next MoE layer's experts (prefetch is on)."""
        return self.prefetcher is not None

    def hold_step(self, layer: int, ids: list[int], guess: list[int] | None = None, done=None) -> list[int]:
        """The slots of one token's experts `ids` of `layer`, read in where missing and held until release_step:
        what __call__ does before it computes. guess: the next MoE layer's router's picks on this layer's
        experts' input (prefetch.py's guess, made by the caller), read in the background. done: (layer, ids)
        of the token's previous MoE layer, its products finished, let go of first (release_step's)."""
        pending = sorted(set(ids))
        start = None
        if self.prefetcher is not None:
            self.prefetcher.observe(layer, pending)
            if guess is not None:
                start = lambda: self.prefetcher.start_guess(layer, guess)  # noqa: E731
        held = self.cache.acquire(layer, pending, before_wait=start, done=done)
        if len(held) < len(pending):
            self.cache.release_held(layer, held)
            raise RuntimeError(
                f"expert cache: layer {layer}'s {len(pending)} experts do not fit its free slots"
            )
        return [held[e] for e in ids]

    def release_step(self, layer: int, ids: list[int]) -> None:
        self.cache.release_held(layer, set(ids))

    def step_table(self, layer: int) -> torch.Tensor | None:
        """Each of layer's experts' slot, -1 where not in the cache (int32 [E], kept up to date by the cache): a
        step graph finds a token's experts there without calling hold_step. None with prefetch on, whose guesses
        hold_step starts at every layer."""
        return self.cache.tables[layer] if self.prefetcher is None else None

    def step_found(self, layer: int, ids: list[int]) -> None:
        """A step graph found layer's experts `ids` in step_table: counted as hold_step would have."""
        self.cache.found(layer, sorted(set(ids)))

    @property
    def stepping(self):
        return self.cache.stepping

    @contextmanager
    def drafting(self, model):
        """Within this block every MoE layer of `model` routes only among the experts resident now, prefetch
        is off, and the cache's counters are left as they were: a draft forward reads nothing from disk
        (lossy on purpose: generation/speculate.py verifies its tokens with the full routing). A layer whose router
        still picks an expert that is not resident raises NotResident."""
        held: dict[int, set[int]] = {}
        for layer, e in self.cache.resident():
            held.setdefault(layer, set()).add(e)
        moes = [b.ffn for b in model.layers if isinstance(b.ffn, MoE)]
        saved = [m.router.absent for m in moes]
        counted = ("hits", "prefetch_hits", "misses")  # what a draft's layer steps add; reads stay counted
        with self.cache.lock:
            uses = dict(self.cache.uses)
            before = {n: {f: getattr(c, f) for f in counted} for n, c in self.cache.layer_stats.items()}
        prefetcher, self.prefetcher, self._draft_only = self.prefetcher, None, held
        try:
            for m in moes:
                mask = torch.ones(self.config.num_experts, dtype=torch.bool, device=m.router.weight.device)
                mask[list(held.get(m.layer, ()))] = False
                m.router.absent = mask if m.router.absent is None else mask | m.router.absent
            yield
        finally:
            for m, absent in zip(moes, saved):
                m.router.absent = absent
            self.prefetcher, self._draft_only = prefetcher, None
            with self.cache.lock:
                self.cache.uses = uses
                for n, c in self.cache.layer_stats.items():
                    for f, v in before.get(n, dict.fromkeys(counted, 0)).items():
                        setattr(c, f, v)

    # the residency API: engine.experts.load(layer, expert) and friends
    def load(self, layer: int, expert: int) -> None:
        self.cache.load(layer, expert)

    def release(self, layer: int, expert: int) -> None:
        self.cache.release(layer, expert)

    def pin(self, layer: int, expert: int) -> None:
        self.cache.pin(layer, expert)

    def unpin(self, layer: int, expert: int) -> None:
        self.cache.unpin(layer, expert)

    def resident(self) -> list[tuple[int, int]]:
        return self.cache.resident()

    def load_hot_set(self, path: str | Path) -> list[tuple[int, int]]:
        """Pin the experts listed in a hot set file."""
        keys = load_hot_set(path, self.config)
        for layer, e in keys:
            self.pin(layer, e)
        return keys

    def save_hot_set(self, path: str | Path, n: int | None = None) -> list[tuple[int, int]]:
        """Write the n most used experts so far (default: the pins plus half the unpinned slots)."""
        uses = self.cache.uses
        n = (
            n
            if n is not None
            else (self.cache.capacity - self.cache.min_slots) // 2 + len(self.cache.pinned())
        )
        keys = sorted(sorted(uses, key=lambda k: (-uses[k], k))[:n])
        save_hot_set(path, keys, self.config)
        return keys

    def nbytes(self) -> int:
        return self.cache.capacity * self.cache.slot_bytes

    def stats(self) -> dict:
        out = self.cache.stats()
        out["prefetch"] = self.prefetcher.stats() if self.prefetcher is not None else None
        return out


BUFFERS_FIXED = 32 * 2**20  # allocator slack and small working tensors, whatever the context
# of those, what ggml's cached graphs may keep under a limit where a prefill chunk's activations are less: a decode
# step's graphs, kept from token to token (a tiny model's chunk would leave room for none)
CACHED_GRAPHS_FIXED = 8 * 2**20
# what the first forward adds per layer beyond the RSS measured after loading (ggml's graphs and their work
# buffers, code its first products map): a 27-layer DeepSeek-V2-Lite file grew 68-73 MiB past a plan without
# it, over an 8 GiB limit, and thrashed under a cgroup cap of that size
FIRST_FORWARD_PER_LAYER = 4 * 2**20
# library pages a run maps back after the footprint dropped those its imports left (page_out_libraries): torch's
# and ggml's kernels, numpy, the tokenizer. A 299-token prefill and 128 sampled tokens mapped 13.2 MiB back on a
# Q4_0 GGUF and 16.5 MiB on the default model
LIBRARY_PAGES = 24 * 2**20
MIN_FITTED_CONTEXT = 256  # below this a fitted context is no use: the limit is refused instead
DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = KVOptions.prefill_chunk  # prompt tokens per forward where no memory limit bounds them
MIN_PREFILL_CHUNK = 16


def _kv_bytes_per_token(c: ModelConfig, itemsize: int, values_by_position: bool = False) -> int:
    """K/V of one position in every layer, and one layer's again: the buffers grow by doubling up to the
    planned context (KVCache's max_positions), each layer's old buffer freed as its new one is made.
    values_by_position: the values kept a second time, positions in rows, for llama.cpp's attention
    (KVCache.values_by_position)."""
    if c.attention == "mla":  # one latent and its rotated key, the latent again as the value (LatentKV)
        per_token = 2 * c.kv_lora_rank + c.rope_dim
    else:
        per_token = (3 if values_by_position else 2) * c.num_kv_heads * c.head_dim
    return per_token * itemsize * (c.num_layers + 1)


def fixed_buffers(c: ModelConfig) -> int:
    """Working memory a model needs whatever its context."""
    return BUFFERS_FIXED + FIRST_FORWARD_PER_LAYER * c.num_layers


def _activation_bytes_per_token(c: ModelConfig) -> int:
    """What a position of context is charged for activations when a limit chooses the context (fit_context)."""
    return 16 * c.hidden_size * 4


def prefill_bytes_per_token(c: ModelConfig, context: int) -> int:
    """fp32 bytes one prompt token holds while its prefill chunk runs at up to `context` positions: the hidden
    vectors a layer passes along, attention's projections and its scores and their softmax over the context, the
    routed experts' gate, up and product rows and outputs, and a shared expert's or dense MLP's. On the small Q4_0
    file (16 heads) its 490-token chunk's attention graph held 84 KiB a token and its experts' 31 KiB."""
    attention = 2 * c.num_heads * (context + c.head_dim) + 2 * c.num_kv_heads * c.head_dim
    experts = c.top_k * (6 * c.moe_intermediate_size + c.hidden_size)
    dense = 3 * max(c.shared_expert_size, c.intermediate_size)
    return 4 * (8 * c.hidden_size + attention + experts + dense)


def limited_prefill_chunk(c: ModelConfig, context: int) -> int:
    """The prompt tokens per forward under a memory limit: the largest power of two (16 to DEFAULT_PREFILL_CHUNK)
    whose activations (prefill_bytes_per_token) fit what the context is charged for them. Unbounded, a 490-token
    chunk of the small Q4_0 file peaked 34 MiB past a 400 MiB limit's plan, and a 240-token prompt thrashed
    under a 400 MiB cgroup cap; in chunks of 64 it peaked 55 MiB below the plan, its prefill 8% slower."""
    room = _activation_bytes_per_token(c) * context // prefill_bytes_per_token(c, context)
    chunk = MIN_PREFILL_CHUNK
    while chunk * 2 <= min(room, DEFAULT_PREFILL_CHUNK):
        chunk *= 2
    return chunk


def dense_footprint(model, config: ModelConfig, device: torch.device, max_context: int,
                    prefill_chunk: int | None = None) -> dict:  # fmt: skip
    """What the process needs besides the expert cache, measured after the dense weights are loaded:
    the runtime and dense weights (RSS, or allocated GPU memory for CUDA), the KV cache at max_context
    (its buffers grow by doubling up to it), and working buffers: those of any context, and the activations of a
    prefill chunk of `prefill_chunk` tokens (None: limited_prefill_chunk)."""
    if device.type == "cuda":
        process = torch.cuda.memory_allocated(device)
    else:
        from ..model.compact import MatvecLinear

        if any(isinstance(m, MatvecLinear) for m in model.modules()):  # fp32: decode runs the numba matvec
            from ..kernels.matvec import warm_up

            warm_up()  # what the first decode step would add to the RSS (the kernels' runtime), counted now
        # under a limit the page cache counts: what imports mapped and nothing runs again is dropped, and
        # pages another process maps too are that one's
        dropped = page_out_libraries()
        process = unique_bytes() + (LIBRARY_PAGES if dropped else 0)
    from ..kernels import ggml_float
    from ..model.compact import GgmlAttention
    from ..model.ggml_decode import GgmlDecodeTransformer

    by_position = isinstance(model, GgmlDecodeTransformer) or any(isinstance(m, GgmlAttention) for m in model.modules())  # fmt: skip
    kv_per_token = _kv_bytes_per_token(config, model.norm.weight.dtype.itemsize, by_position)
    per_token = kv_per_token + _activation_bytes_per_token(config)  # what each position of context costs
    # llama.cpp's attention (GgmlAttention, a step graph) runs over, and keeps, a multiple of KV_PAD positions
    kv = kv_per_token * (ggml_float.cached_positions(max_context) if by_position else max_context)
    chunk = prefill_chunk or limited_prefill_chunk(config, max_context)
    activations = prefill_bytes_per_token(config, max_context) * min(chunk, max_context)
    buffers = fixed_buffers(config) + activations
    return {"process": process, "kv_cache": kv, "buffers": buffers, "total": process + kv + buffers,
            "context": max_context, "context_bytes_per_token": per_token, "prefill_chunk": chunk,
            "activation_bytes": activations}  # fmt: skip


def fit_context(limit: int, model, config: ModelConfig, device: torch.device, max_context: int | None,
                min_experts: int, prefill_chunk: int | None = None) -> tuple[dict, str | None]:  # fmt: skip
    """The footprint under a whole-process limit, and a note when the context was lowered to fit.

    max_context given: refused (naming the context that fits) unless it fits with min_experts bytes of experts.
    Not given: DEFAULT_CONTEXT, or the largest multiple of 256 tokens whose K/V and activations take at most
    half of what the limit leaves for them and the experts, with a note saying so: the most context that fits
    would leave the expert cache min_experts, one layer's experts, so a decode would read nearly every expert
    it uses.
    """
    from ..errors import MoepagerError
    from ..system.sizes import format_bytes

    wanted = min(max_context or DEFAULT_CONTEXT, config.max_position_embeddings)
    footprint = dense_footprint(model, config, device, wanted, prefill_chunk)
    if limit >= footprint["total"] + min_experts:
        return footprint, None
    room = limit - footprint["process"] - fixed_buffers(config) - min_experts
    per_token = footprint["context_bytes_per_token"]
    fits = max(0, room // per_token) // 256 * 256
    if max_context is None and fits >= MIN_FITTED_CONTEXT:
        half = max(MIN_FITTED_CONTEXT, (room + min_experts) // 2 // per_token // 256 * 256)
        context = min(fits, half)
        note = (f"memory_limit {format_bytes(limit)} leaves room for a context of {context} tokens beside the "
                f"expert cache, not {wanted}: the KV cache is planned for {context} (--max-context chooses, up to "
                f"{fits})")  # fmt: skip
        footprint = dense_footprint(model, config, device, context, prefill_chunk)
        if limit >= footprint["total"] + min_experts:
            return footprint, note
    need = footprint["total"] + min_experts
    if prefill_chunk is not None:  # the chunk asked for is what does not fit: say which does
        spare = limit - min_experts - (footprint["total"] - footprint["activation_bytes"])
        chunk = max(0, spare) // prefill_bytes_per_token(config, footprint["context"])
        if chunk >= 1:
            raise MoepagerError(
                f"--prefill-chunk {prefill_chunk}: its activations at a context of {footprint['context']} tokens "
                f"({format_bytes(footprint['activation_bytes'])}) do not fit memory_limit {format_bytes(limit)} "
                f"beside the model; give --prefill-chunk {chunk} or less, or leave it out"
            )
    if fits >= MIN_FITTED_CONTEXT:
        fix = f"at this limit the context can be at most {fits} tokens (--max-context {fits}), or raise the limit "
        fix += f"to {format_bytes(need)}"
    else:
        floor = limit - room + MIN_FITTED_CONTEXT * footprint["context_bytes_per_token"]
        fix = f"raise the limit to at least {format_bytes(floor)} ({MIN_FITTED_CONTEXT} tokens of context)"
    raise MoepagerError(
        f"memory_limit {format_bytes(limit)} is below what the model needs at a context of {wanted} tokens: "
        f"{format_bytes(need)} (runtime and dense weights {format_bytes(footprint['process'])}, KV cache "
        f"{format_bytes(footprint['kv_cache'])}, buffers {format_bytes(footprint['buffers'])}, the smallest expert "
        f"cache {format_bytes(min_experts)}); {fix}"
    )


def min_expert_bytes(source, config: ModelConfig, dtype: torch.dtype | None) -> int:
    """Bytes of the smallest expert cache: one token's experts of one layer (top_k slots)."""
    from ..model.moe import bank_spec
    from ..sources.contract import expert_formats

    keys = source.expert_keys()
    if not keys:
        return 0
    slot = bank_spec(source.read_expert(*keys[0]), expert_formats(source), dtype).slot_bytes
    return slot * min(config.top_k, len(keys))


# a row read from the disk takes 0.06-0.15 ms (O_DIRECT, measured on the small Q4_0 file: 2-5% of its ~3 ms token);
# a model whose token reads fewer weight bytes than this keeps its table (~1% of a token at ~10 GB/s), one whose
# token reads more (Qwen3-30B-A3B's shape: 1.7 GiB) reads its rows from the file
ROWS_FROM_FILE_TOKEN_BYTES = 128 * 2**20


def token_bytes(model, source) -> int:
    """Weight bytes a decoded token reads: the model's own weights but its embedding table, and top_k experts of
    every MoE layer."""
    storages = weight_storages(model)
    storages.pop(model.embed.blocks.untyped_storage().data_ptr(), None)
    keys = source.expert_keys()
    c = model.config
    experts = source.expert_nbytes(*keys[0]) * c.top_k * c.num_moe_layers if keys else 0
    return sum(storages.values()) + experts


def embedding_from_file(model, source) -> None:
    """Under a memory limit a token's embedding row is read from the file (BlockEmbedding.rows_from_file)
    where the source can, and the table is freed for the expert cache; not where the output head computes from
    the same bytes (a tied head not repacked), nor where a row's read would be a noticeable part of a token
    (ROWS_FROM_FILE_TOKEN_BYTES)."""
    from ..model.compact import BlockEmbedding
    from ..system.process_memory import release_freed_heap

    embed, read_rows = model.embed, getattr(source, "embedding_rows", lambda: None)()
    if type(embed) is not BlockEmbedding or read_rows is None or embed.read_rows is not None:
        return
    table = embed.blocks.untyped_storage().data_ptr()
    others = (b for m in model.modules() if m is not embed for b in m.buffers(recurse=False))
    if any(b.untyped_storage().data_ptr() == table for b in others):
        return
    if token_bytes(model, source) < ROWS_FROM_FILE_TOKEN_BYTES:
        return
    embed.rows_from_file(read_rows)
    release_freed_heap()


def build_paged(model, source, device: torch.device, dtype: torch.dtype | None, expert_memory=None, memory_limit=None,
                policy=None, prefetch: bool | None = None, pins=(), hot_set=None, max_context: int | None = None,
                fill: bool | None = None, prefill_chunk: int | None = None):  # fmt: skip
    """The engine's paging path: an ExpertCache in the budget, with the model's routers for prefetch.
    dtype: the experts' compute dtype; None keeps the source's (converted or quantized experts). fill: read
    experts into the cache's free slots now (fill_cache; None: when a memory_limit is given). prefill_chunk: the
    prompt tokens per forward asked for; under a memory_limit the footprint plans the one it runs (None: the
    chunk its buffers hold, limited_prefill_chunk), and ggml keeps no more cached graphs than that chunk's
    activations (a long prompt's chunks each built graphs of their own, which stayed)."""
    import warnings

    from ..model.moe import MoE
    from ..system.sizes import parse_bytes

    config = model.config
    limit, footprint = None, None
    if memory_limit is not None and device.type == "cpu":
        embedding_from_file(model, source)
    if memory_limit is not None:
        total = parse_bytes(memory_limit, what="memory_limit")
        footprint, note = fit_context(
            total, model, config, device, max_context, min_expert_bytes(source, config, dtype), prefill_chunk
        )
        if note:
            warnings.warn(note, stacklevel=3)
        limit = total - footprint["total"]
        if device.type == "cpu":
            from ..kernels import ggml

            ggml.limit_cached_graph_bytes(max(footprint["activation_bytes"], CACHED_GRAPHS_FIXED))
    cache = ExpertCache(source, config, expert_memory if expert_memory is not None else (None if limit is None else "100%"),
                        device, dtype, policy, limit=limit)  # fmt: skip
    cache.footprint = footprint
    cache.memory_limit = None if memory_limit is None else total  # the whole-process limit, as given
    if prefetch is None:  # PagingOptions.prefetch
        prefetch = cache.device.type == "cuda"
    routers = {
        b.ffn.layer: (lambda x, r=b.ffn.router: r(x)[1]) for b in model.layers if isinstance(b.ffn, MoE)
    }
    experts = PagedExperts(config, cache, routers, prefetch)
    if cache.capacity < cache.num_keys:  # experts will be read while decoding: leave the readers the cores
        from ..kernels import ggml

        ggml.sleep_between_calls()
    for layer, e in pins:
        experts.pin(layer, e)
    if hot_set is not None:
        experts.load_hot_set(hot_set)
    if fill or (fill is None and memory_limit is not None):
        fill_cache(cache)
        experts.watch_first_prompt()
    if memory_limit is not None and device.type == "cpu":
        page_out_libraries()  # what building the cache faulted in (the run maps back what it runs: LIBRARY_PAGES)
    return experts
