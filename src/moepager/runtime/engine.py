"""`load(model, options)` -> Engine: a model loaded with its experts, ready to generate.

Builds the decoder on the meta device, loads the resident weights, and plugs in an implementation of the
experts contract (resident, paged or on Ray actors). Runtime choices arrive as one EngineOptions
(runtime/options.py); the model config never carries them.
"""

from __future__ import annotations

import gc
import resource
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import MoepagerError
from ..generation import sessions
from ..generation.generate import SamplingParams, Timings, generate_step
from ..generation.tokenizer import Tokenizer
from ..model.compact import (
    huge_page_weights,
    repack_block_weights,
    swap_compact,
    swap_llama_cpp_ops,
    swap_matvec,
)
from ..model.decoder import Transformer
from ..model.fused_decode import swap_fused_decode
from ..model.ggml_decode import swap_ggml_decode
from ..model.kvcache import BlockKVCache, KVOptions
from ..model.layers import KVCache
from ..model.moe import ExpertBank, ResidentExperts, bank_spec
from ..sources.contract import expert_formats, source_tokenizer
from ..store.open_model import open_source
from ..system.process_memory import current_rss, release_freed_heap
from .options import EngineOptions

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:  # a name torch does not know at all ("tpu")
        raise MoepagerError(f"device {device!r} is not supported; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoepagerError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MoepagerError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def _as_batch(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    return ids[None] if ids.dim() == 1 else ids


class Engine:
    def __init__(self, model: Transformer, experts, tokenizer: Tokenizer | None, path: Path, device: torch.device,
                 kv: KVOptions | None = None):  # fmt: skip
        self.model, self.experts, self.tokenizer = model, experts, tokenizer
        self.config, self.path, self.device = model.config, path, device
        self.timings = Timings()
        self.kv = kv or KVOptions()
        self.kv_stats: dict = {}  # the last generation's KV cache stats
        self.session_reused_tokens: int | None = (
            None  # prompt tokens the last resumed session did not recompute
        )
        self._identity: str | None = None
        self.source = None  # the ModelSource the weights came from (set by load)
        # the runtime floor: resident bytes of the process before any weight was loaded (set by load), and
        # once the first token was computed (kernels' libraries, thread pools and caches set up)
        self.rss_before_weights: int | None = None
        self.rss_after_first_token: int | None = None
        self.speculation = None  # a speculate.Speculation when drafts are verified (set by load)

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """A full forward without cache: ids [B, T] (or [T]) -> logits [B, T, V] (float32, on the CPU)."""
        return self.model(_as_batch(input_ids).to(self.device)).float().cpu()

    def stream(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop_ids: list[int] | None = None,
               cache: KVCache | None = None) -> Iterator[int]:  # fmt: skip
        """Yield generated ids one by one. stop_ids defaults to the model's end-of-sequence ids."""
        if stop_ids is None:
            stop_ids = list(self.config.eos_token_ids) + (self.tokenizer.eos_ids if self.tokenizer else [])
        params = SamplingParams(temperature, top_p, top_k, seed, stop_ids)
        prompt = torch.as_tensor(input_ids, dtype=torch.long).flatten().to(self.device)
        if prompt.numel() == 0:
            raise MoepagerError("the prompt is empty")
        cache = cache if cache is not None else self.new_cache()
        if self.speculation is not None:
            from ..generation.speculate import speculative_generate_step

            steps = speculative_generate_step(self.model, prompt, max_new_tokens, params, self.speculation, cache,
                                              self.timings, self.kv.prefill_chunk)  # fmt: skip
        else:
            steps = generate_step(self.model, prompt, max_new_tokens, params, cache, self.timings,
                                  self.kv.prefill_chunk)  # fmt: skip
        for tid in steps:
            if self.rss_after_first_token is None:
                self.rss_after_first_token = current_rss()
            yield tid
        if hasattr(cache, "stats"):
            self.kv_stats = cache.stats()

    def generate(self, input_ids, max_new_tokens: int = 64, **sampling) -> list[int]:
        return list(self.stream(input_ids, max_new_tokens, **sampling))

    # -------------------------------------------------------------------------------- KV cache, sessions

    def new_cache(self) -> KVCache | BlockKVCache:
        """An empty cache: blocked and spilling past kv_memory when that was given, else the in-RAM KVCache."""
        if self.kv.memory_bytes is None:
            return KVCache(self.config.num_layers, self.planned_context())
        return self._blocked_cache()

    def planned_context(self) -> int | None:
        """The context a memory limit planned the KV cache for (paging/paged.fit_context), if one did."""
        footprint = getattr(getattr(self.experts, "cache", None), "footprint", None)
        return footprint["context"] if footprint else None

    def _blocked_cache(self) -> BlockKVCache:
        kv = self.kv
        return BlockKVCache(self.config.num_layers, kv.block_size, kv.memory_bytes, kv.spill_dir)

    def identity(self) -> str:
        """Hash of the config and dense weights that session files are checked against (computed once)."""
        if self._identity is None:
            self._identity = sessions.model_identity(self.model)
        return self._identity

    def save_session(self, path: str | Path, cache: KVCache | BlockKVCache, token_ids: list[int]) -> None:
        """Save a cache and the ids of the positions it holds (len(token_ids) == cache.seq_len)."""
        sessions.save(path, cache, [int(i) for i in token_ids], self.identity())

    def load_session(self, path: str | Path) -> tuple[BlockKVCache, list[int]]:
        """(cache, token ids) from a session file; a file from another model or format is refused."""
        return sessions.load(path, self.identity(), self.model.norm.weight.dtype, self._blocked_cache)

    def stream_session(
        self, path: str | Path, input_ids, max_new_tokens: int = 64, **sampling
    ) -> Iterator[int]:
        """Like stream, continuing the session at `path` if it exists, and saving it when generation ends.

        input_ids is the whole conversation so far; the longest prefix it shares with the saved ids is
        reused, and only the rest is computed (at least one token, for the next-token logits).
        """
        ids = [int(i) for i in torch.as_tensor(input_ids, dtype=torch.long).flatten().tolist()]
        if not ids:
            raise MoepagerError("the prompt is empty")
        reuse, cache = 0, None
        if Path(path).exists():
            cache, saved = self.load_session(path)
            while reuse < min(len(saved), len(ids) - 1) and saved[reuse] == ids[reuse]:
                reuse += 1
            cache.truncate(reuse)
        cache = cache if cache is not None else self.new_cache()
        self.session_reused_tokens = reuse
        out: list[int] = []
        for tid in self.stream(ids[reuse:], max_new_tokens, cache=cache, **sampling):
            out.append(tid)
            yield tid
        self.save_session(
            path, cache, (ids + out)[: cache.seq_len]
        )  # the last id yielded is not in the cache
        if hasattr(cache, "close"):
            cache.close()

    def stats(self) -> dict:
        out = self.timings.as_dict()
        out["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["rss_before_weights_bytes"] = self.rss_before_weights
        out["rss_after_first_token_bytes"] = self.rss_after_first_token
        if torch.cuda.is_available() and self.device.type == "cuda":
            out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if hasattr(self.experts, "stats"):
            out["experts"] = self.experts.stats()
        if self.kv_stats:
            out["kv_cache"] = self.kv_stats
        if self.speculation is not None:
            out["speculation"] = {"draft": self.speculation.kind, "draft_tokens": self.speculation.k,
                                  **self.speculation.stats.as_dict()}  # fmt: skip
        if self.session_reused_tokens is not None:
            out["session_reused_tokens"] = self.session_reused_tokens
        if hasattr(self.source, "tier_stats"):  # tiers below the expert cache (a remote source)
            out["tiers"] = self.source.tier_stats()
        from ..kernels import ggml_library

        if ggml_library.loaded():  # which library computed the GGUF blocks (and whose sums they are)
            out["gguf_kernels"] = ggml_library.library().describe()
        return out


def _kv_bytes(kv_memory: int | str | None) -> int | None:
    if kv_memory is None or isinstance(kv_memory, int):
        return kv_memory
    from ..system.sizes import parse_size

    return parse_size(kv_memory)


def resident_experts(source, device: torch.device, dtype: torch.dtype | None) -> ResidentExperts:
    """Every routed expert read once into its layer's bank (slot = expert id), in the form its format is
    computed from (quantized experts stay quantized)."""
    keys = source.expert_keys()
    banks: dict[int, ExpertBank] = {}
    if keys:
        spec = bank_spec(source.read_expert(*keys[0]), expert_formats(source), dtype)
        for layer in sorted({layer for layer, _ in keys}):
            banks[layer] = spec.for_layer(layer).allocate(source.config.num_experts, device, layer)
        for layer, e in keys:
            source.read_expert(layer, e, out=banks[layer].slots[e])
            banks[layer].repack_slot(e)
    return ResidentExperts(source.config, banks)


def load(model, options: EngineOptions | None = None, **flat) -> Engine:
    """Load a checkpoint folder, store, GGUF file or cached hub id (or an opened ModelSource) with `options`
    (runtime/options.py: device, dtype, paging, KV cache, quantized experts, Ray, speculation), or the same
    options by their flat names: load(model, expert_memory="25%", kv_memory="64MiB"). dtype defaults to the
    checkpoint's own; without paging options every expert is loaded into memory. The embedded default model is
    resolved above this, by moepager.load and the command line.
    """
    o = EngineOptions.of(options, **flat)
    paging, dist, spec = o.paging, o.distributed, o.speculation
    experts_dtype, device, dtype = o.quant.experts_dtype, o.device, o.dtype
    if spec.speculate is not None and not (isinstance(spec.draft_tokens, int) and spec.draft_tokens >= 1):
        raise MoepagerError(f"--draft-tokens {spec.draft_tokens!r}: give a positive number of tokens")
    gc.collect()  # "before weights" measured as the footprint after loading is: garbage freed, heap trimmed
    release_freed_heap()
    rss_before_weights = current_rss()
    dev = parse_device(device)
    # GGUF blocks are computed by CPU kernels; on CUDA they are dequantized to the compute dtype as read
    ckpt = model if hasattr(model, "expert_keys") else open_source(model, compact=dev.type == "cpu")
    if experts_dtype is not None:
        from ..store.encoding import QuantizingSource

        ckpt = QuantizingSource(ckpt, experts_dtype)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise MoepagerError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    state = ckpt.dense_state_dict()
    compact = ckpt.compact_dense() if hasattr(ckpt, "compact_dense") else {}  # GGUF blocks kept as they are
    dtype = dtype or (state["embed.weight"].dtype if "embed.weight" in state else torch.float32)
    with torch.device("meta"):
        net = Transformer(ckpt.config)
        state.update(swap_compact(net, compact, dtype))
    missing = set(net.state_dict()) - set(state)
    if missing:
        raise MoepagerError(
            f"{ckpt.path}: tensors missing for this {ckpt.config.family} model: {sorted(missing)[:5]}"
        )
    net.load_state_dict(state, strict=True, assign=True)
    gguf_blocks = bool(compact)
    del state, compact  # the model holds the weights: each is freed as soon as it is moved below
    net.to(device=dev, dtype=dtype)
    if gguf_blocks and dtype == torch.float32:
        swap_llama_cpp_ops(net)  # the float ops between the block products as llama.cpp runs them
    if gguf_blocks:
        repack_block_weights(net)  # before huge pages, so that a tied head's own copy moves too
    huge_page_weights(net)
    swap_matvec(net)  # fp32 CPU decode: our matvec reads weights faster than torch's sgemv
    # a decode step as one ggml graph: a GGUF model's, or a plain float32 checkpoint's
    if dtype == torch.float32:
        swap_ggml_decode(net)
    swap_fused_decode(net)  # the other fp32 CPU decoders of the plain families: one compiled call per layer
    net.rotary.inv_freq = net.rotary.inv_freq.float()  # frequencies stay fp32, as in the reference
    net.eval()
    # before the paging budget is split: --memory-limit measures the process's RSS, which must include this
    tokenizer = source_tokenizer(ckpt)
    gc.collect()
    release_freed_heap()  # the tokenizer's and the loaders' temporaries
    if dist.ray is not None:
        from ..distributed.ray_experts import build_ray

        if paging.memory_limit is not None or paging.pins or paging.hot_set is not None:
            raise MoepagerError("with ray, give each actor's expert budget as expert_memory (memory_limit, "
                                "pins and hot sets apply to one process)")  # fmt: skip
        experts = build_ray(ckpt, dist.ray, dist.ray_actors, dist.ray_placement, dist.ray_replicate,
                            paging.expert_memory, None if experts_dtype else dtype, experts_dtype, paging.policy)  # fmt: skip
    elif paging.enabled:
        from ..paging.paged import build_paged

        expert_dtype = None if experts_dtype else dtype  # converted experts are kept as converted, as below
        experts = build_paged(net, ckpt, dev, expert_dtype, paging.expert_memory, paging.memory_limit, paging.policy,
                              paging.prefetch, list(paging.pins), paging.hot_set, paging.max_context, paging.fill,
                              o.kv.prefill_chunk)  # fmt: skip
    else:
        # experts_dtype, when given, is kept
        experts = resident_experts(ckpt, dev, None if experts_dtype else dtype)
    recorder = None
    if paging.record_trace:
        from ..paging.trace import TraceRecorder

        recorder = TraceRecorder(experts, ckpt.config)
    net.set_experts(recorder or experts)
    footprint = getattr(getattr(experts, "cache", None), "footprint", None)  # a memory limit chose the chunk
    chunk = footprint["prefill_chunk"] if footprint else o.kv.prefill_chunk or KVOptions.prefill_chunk
    kv = KVOptions(_kv_bytes(o.kv.kv_memory), o.kv.kv_block_size, o.kv.kv_spill_dir, chunk)
    engine = Engine(net, experts, tokenizer, ckpt.path, dev, kv)
    engine.trace = recorder.trace if recorder else None
    engine.rss_before_weights = rss_before_weights
    engine.source = model if hasattr(model, "expert_keys") else ckpt
    if spec.speculate is not None:
        engine.speculation = _speculation(engine, spec.speculate, spec.draft_tokens, device, dtype)
    return engine


def _speculation(engine: Engine, speculate: str, draft_tokens: int, device: str, dtype):
    from ..generation.speculate import ModelDrafter, NgramDrafter, SelfDrafter, Speculation

    if not isinstance(speculate, str) or not speculate:
        raise MoepagerError(f"--speculate {speculate!r}: give ngram, self or a draft model")
    if speculate == "ngram":
        drafter = NgramDrafter()
    elif speculate == "self":
        drafter = SelfDrafter(engine.experts)
    else:  # a draft model: small, every expert resident
        drafter = ModelDrafter(
            load(speculate, EngineOptions(device=device, dtype=dtype)), engine.config.vocab_size, speculate
        )
    experts = engine.experts

    def reads() -> tuple[int, int]:
        if not hasattr(experts, "stats"):
            return 0, 0
        s = experts.stats()
        return s.get("misses", 0) + s.get("prefetch_reads", 0), s.get("bytes_read", 0)

    return Speculation(drafter, draft_tokens, reads)
